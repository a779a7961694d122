"""One route's part of a transaction (:class:`RouteLeg`) and what became of it (:class:`LegOutcome`).

Kept apart from :mod:`mxguard.smtp.proxy` so that :mod:`mxguard.smtp.dispositions`
can name legs without importing the proxy (the import graph goes one way:
proxy -> dispositions -> legs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxguard.services.domains import DomainView
from mxguard.smtp.delivery import DownstreamConnection, RouteFailure
from mxguard.smtp.replies import Reply
from mxguard.smtp.routing import Route


@dataclass
class RouteLeg:
    """One route's part of a transaction."""

    route: Route
    domain: DomainView
    conn: DownstreamConnection | None = None
    reused: bool = False
    failure: RouteFailure | None = None
    mail_reply: Reply | None = None
    accepted: list[str] = field(default_factory=list)
    lost: str | None = None
    #: Every server of the route was unreachable: accepted recipients go to the spool.
    spool: bool = False
    #: Each accepted recipient's own domain (a route may serve several domains).
    rcpt_domains: dict[str, DomainView] = field(default_factory=dict)
    #: The destination's published TLS policy (DANE, MTA-STS) could not be met at RCPT: the
    #: recipients were accepted and the decision waits for the header (``TLS-Required: No``,
    #: RFC 8689 section 5), which only arrives with DATA.
    tls_deferred: bool = False
    #: The reply this leg's copy gets at the end of DATA without being sent (set when the
    #: deferred decision went against it), or ``None``.
    data_reply: Reply | None = None
    #: Delivered on a route relaxed to opportunistic by ``TLS-Required: No``.
    relaxed: bool = False


@dataclass(eq=False)
class LegOutcome:
    """What happened to one leg at the end of DATA (``reply`` is ``None`` when it went straight to the spool)."""

    leg: RouteLeg
    message: bytes
    reply: Reply | None
