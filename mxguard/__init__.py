"""mxguard: an inbound email protection gateway.

Senders on the internet connect to mxguard (the organization's MX); while the
sender is still connected mxguard opens a second SMTP connection to the
organization's own (downstream) mail server, filters the message in memory and
relays the downstream server's answer.
"""

__version__ = "0.1.0"


def _no_dns_over_https() -> None:
    """mxguard asks its resolvers over UDP and TCP only. dnspython imports its DNS-over-HTTPS
    client (httpx2, h2: about 14 MB in every gateway process) whenever those packages happen
    to be installed; switched off before ``dns.query`` is first imported."""
    try:
        import dns._features
        dns._features.force("doh", False)
    except (ImportError, AttributeError, KeyError):  # another dnspython: it may not have the switch
        pass


_no_dns_over_https()
