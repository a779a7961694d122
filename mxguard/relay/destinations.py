"""How outbound mail reaches an internet destination: the route from its MX hosts, under the
TLS policy for that destination.

Without an override the policy is the internet default: opportunistic TLS (STARTTLS when
offered, RFC 3207), upgraded by DANE (RFC 7672; only when the MX answer is DNSSEC-validated,
section 2.2.1) and, where DANE does not apply, by the domain's MTA-STS policy (RFC 8461; DANE
takes precedence, section 2). The one resolver in :mod:`mxguard.tls.resolver` decides per host.

An operator can override it per destination, with the levels of Postfix's
``smtp_tls_policy_maps``:

=============  ==========================================================================
``none``       plain SMTP, never STARTTLS
``may``        opportunistic TLS only (no DANE, no MTA-STS)
``encrypt``    TLS or nothing; the certificate is not checked
``dane``       DANE when the MX host has usable TLSA records, else opportunistic
``dane-only``  DANE or nothing
``verify``     TLS with a certificate that chains to the system trust store (or ``ca_file``)
               and names the MX host
=============  ==========================================================================

A pattern ``example.org`` matches that domain only; ``.example.org`` every domain below it.
The exact domain wins over a suffix, and a longer suffix over a shorter one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from mxguard.relay.mx import MxResult
from mxguard.smtp.routing import Route
from mxguard.tls.policy import DownstreamTls

#: Override level -> the resolver's mode.
LEVELS: dict[str, DownstreamTls] = {
    "none": DownstreamTls.OFF,
    "may": DownstreamTls.OPPORTUNISTIC,
    "encrypt": DownstreamTls.REQUIRED,
    "dane": DownstreamTls.DANE,
    "dane-only": DownstreamTls.DANE_ONLY,
    "verify": DownstreamTls.VERIFY,
}


@dataclass(frozen=True)
class DestinationTls:
    """One per-destination override.

    Attributes:
        pattern: ``example.org`` or ``.example.org`` (lower-case A-labels).
        level: a key of :data:`LEVELS`.
        ca_file: PEM bundle for ``verify`` (``None``: the system trust store).
    """

    pattern: str
    level: str
    ca_file: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def matching_override(domain: str, overrides: Iterable[DestinationTls]) -> DestinationTls | None:
    """The override that applies to ``domain``: an exact pattern, else the longest matching
    ``.suffix``; ``None`` when none matches."""
    domain = domain.rstrip(".").lower()
    best: DestinationTls | None = None
    for o in overrides:
        if o.pattern == domain:
            return o
        if o.pattern.startswith(".") and domain.endswith(o.pattern) and (best is None or len(o.pattern) > len(best.pattern)):
            best = o
    return best


def destination_route(mx: MxResult, override: DestinationTls | None, *, port: int = 25,
                      ca_file: str | None = None) -> Route:
    """The :class:`Route` to ``mx.domain``'s MX hosts under the destination's TLS policy.

    Args:
        mx: the MX hosts and addresses (:func:`mxguard.relay.mx.resolve_mx`).
        override: the destination's override, if any (:func:`matching_override`).
        port: the MX hosts' SMTP port (25).
        ca_file: CA bundle for PKIX verification (MTA-STS ``enforce``, ``verify``); ``None``: the
            system trust store. An override's own CA file wins.

    Returns:
        A route whose ``addresses`` are every (host, port, address) in order; ``policy_domain``
        is the destination (MTA-STS policies and TLS-RPT belong to it).
    """
    addresses = tuple((h.name, port, a) for h in mx.hosts for a in h.addresses)
    servers = tuple((h.name, port) for h in mx.hosts)
    if override is None:
        # DANE only over a validated MX answer; MTA-STS where DANE does not apply.
        tls = DownstreamTls.DANE if mx.secure else DownstreamTls.MTA_STS
        return Route(servers=servers, tls=tls, ca_file=ca_file, policy_domain=mx.domain, addresses=addresses,
                     sts_fallback=tls is DownstreamTls.DANE)
    mode = LEVELS[override.level]
    if mode is DownstreamTls.DANE and not mx.secure:
        mode = DownstreamTls.OPPORTUNISTIC  # RFC 7672 2.2.1: an unsigned MX answer gives no DANE
    return Route(servers=servers, tls=mode, ca_file=(override.ca_file or ca_file) if mode is DownstreamTls.VERIFY else None,
                 policy_domain=mx.domain, addresses=addresses)
