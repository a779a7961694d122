"""mxguard: an inbound email protection gateway.

Senders on the internet connect to mxguard (the organization's MX); while the
sender is still connected mxguard opens a second SMTP connection to the
organization's own (downstream) mail server, filters the message in memory and
relays the downstream server's answer.
"""

__version__ = "0.1.0"
