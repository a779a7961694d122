"""SMTP: the inbound front door (aiosmtpd), the per-connection proxy, downstream delivery (aiosmtplib)."""
