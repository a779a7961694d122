"""The TLS policy vocabulary stored per domain.

Downstream modes follow Postfix's ``smtp_tls_security_level`` words, mapped to
what a gateway administrator picks per domain:

* ``off`` – plain SMTP, STARTTLS never attempted.
* ``opportunistic`` – STARTTLS when offered; if it is not offered, or the
  handshake fails, deliver in clear (Postfix ``may``; RFC 3207 section 4.1).
* ``required`` – STARTTLS or nothing; the certificate is not checked
  (Postfix ``encrypt``). Nothing is ever sent in clear.
* ``verify`` – ``required`` plus a chain that verifies against the system
  trust store or the domain's CA file, and a matching name; or a pinned
  SHA-256 certificate fingerprint (Postfix ``secure`` / ``fingerprint``).
* ``dane`` – DANE (RFC 7672) when the server has DNSSEC-validated, usable TLSA
  records: TLS is then mandatory and the certificate must match them;
  otherwise ``opportunistic`` (Postfix ``dane``). A bogus (failed-validation)
  TLSA answer defers the delivery.
* ``dane-only`` – DANE or nothing (Postfix ``dane-only``).
* ``mta-sts`` – the recipient domain's MTA-STS policy (RFC 8461): ``enforce``
  means TLS with a PKIX-valid certificate to an MX host its ``mx`` patterns
  match, or nothing; ``testing``, ``none`` or no policy mean ``opportunistic``.

Which of these applies to one server is decided by :mod:`mxguard.tls.resolver`.
"""

from __future__ import annotations

from enum import StrEnum


class DownstreamTls(StrEnum):
    OFF = "off"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    VERIFY = "verify"
    DANE = "dane"
    DANE_ONLY = "dane-only"
    MTA_STS = "mta-sts"

    @property
    def mandatory(self) -> bool:
        """True when the message must not travel without TLS, whatever DNS says."""
        return self in (DownstreamTls.REQUIRED, DownstreamTls.VERIFY, DownstreamTls.DANE_ONLY)

    @property
    def uses_dane(self) -> bool:
        """The mode looks up TLSA records (RFC 7672)."""
        return self in (DownstreamTls.DANE, DownstreamTls.DANE_ONLY)


class InboundTls(StrEnum):
    OPTIONAL = "optional"
    REQUIRED = "required"


class TlsVersion(StrEnum):
    V1_2 = "1.2"
    V1_3 = "1.3"
