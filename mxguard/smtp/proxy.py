"""The in-line proxy: one inbound SMTP session, its downstream connections, its transactions.

Two SMTP connections, one transaction. For each recipient the sender gives,
the proxy opens (or reuses, within the inbound session) a connection to the
recipient domain's route, relays ``MAIL``/``RCPT`` and hands the downstream
server's own reply back (real-time recipient validation). At the end of DATA
the message goes to each route that accepted recipients, and the sender gets
the downstream server's final reply.

Before anything is sent downstream, the message goes through the filter
pipeline once; each recipient's domain settings turn the verdict into a
disposition (deliver, tag, quarantine, reject, defer), and recipients whose
copies differ get their own downstream transaction
(:mod:`mxguard.smtp.dispositions`).

A message is only written down when it cannot go straight through; that is
the spool's job (and the quarantine's), reached through :class:`ProxyContext` hooks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from mxguard.config import Settings
from mxguard.filtering.message import Envelope
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.verdict import Verdict
from mxguard.services.domains import DomainView
from mxguard.smtp import dispositions, headers
from mxguard.smtp.dispositions import HeldCopy
from mxguard.smtp.delivery import ConnectionInfo, DownstreamConnection, DownstreamLost, RouteFailure, attempt_item
from mxguard.smtp.legs import LegOutcome, RouteLeg
from mxguard.smtp.replies import RELAY_DENIED, TLS_REQUIRED_INBOUND, Reply
from mxguard.smtp.routing import PUBLISHED_POLICY_MODES, DomainDirectory, Route, route_for_message, sender_opted_out
from mxguard.smtp.submission import sender_not_organizations
from mxguard.smtp.tlsrpt_inbox import MIXED_WITH_REPORTS, REPORT_RCPT_OK
from mxguard.storage.messagelog import LogRecord, MessageLogWriter, RecipientResult, overall_disposition
from mxguard.tls.client_certs import PeerCertificate
from mxguard.tls.policy import InboundTls

log = structlog.get_logger("mxguard.proxy")


class Spooler(Protocol):
    """Where the proxy hands mail it cannot deliver now (see :mod:`mxguard.spool.accept`)."""

    async def hold(self, entries: list) -> None:
        """Store entries durably; raise (SQLAlchemyError, OSError) if nothing could be stored."""

    def entry(self, **fields: Any) -> object:
        """One spool entry for :meth:`hold`, from the fields of a held leg (txn_id, domain,
        mail_from, recipients, message, subject, body_8bit, smtputf8, sender_aligned, first_reply)."""

    def dsn(self, tx: "Transaction", failed: list[tuple[str, "Reply", str | None]], message: bytes) -> object | None:
        """A DSN entry for permanently failed recipients, or ``None`` when none may be sent."""


def new_txn_id() -> str:
    """A short unique transaction id (appears in Received, replies and the log)."""
    return secrets.token_hex(8).upper()


@dataclass
class ClientInfo:
    """The inbound side of a transaction, fixed when MAIL is given."""

    ip: str
    port: int
    helo: str
    tls_version: str | None = None
    cipher: str | None = None
    bits: int | None = None
    #: The client certificate shown at STARTTLS (requested only while partner or relay rules need one).
    cert: PeerCertificate | None = None
    #: The session's right to relay for an organization (:class:`~mxguard.relay.access.RelayGrant`), if any.
    relay: Any = None

    @property
    def tls(self) -> bool:
        return self.tls_version is not None


@dataclass
class ProxyContext:
    """What every proxy session of a gateway shares.

    Attributes:
        settings: bootstrap settings (hostname, timeouts).
        directory: served domains and their routes.
        message_log: where finished transaction records go.
    """

    settings: Settings
    directory: DomainDirectory
    message_log: MessageLogWriter
    #: Called for each record before it is queued (metrics, tests).
    observers: list[Callable[[LogRecord], None]] = field(default_factory=list)
    #: Takes over mail whose route is unreachable (the spool); ``None`` disables spooling.
    spooler: "Spooler | None" = None
    #: Clean-up tasks of closed sessions, awaited at shutdown.
    closing: set = field(default_factory=set)
    #: Idle downstream connections shared across sessions; ``None`` closes them at session end.
    pool: Any = None
    #: The filter pipeline; ``None`` relays unfiltered (only for tests of the bare proxy).
    filters: FilterPipeline | None = None
    #: Stores held copies: ``await hold(tx=, copies=[HeldCopy...], verdict=dict, score=)`` -> ids.
    #: ``None``: nothing can be held, so a message to hold is deferred (451 4.3.0).
    hold: Callable[..., Awaitable[list[str]]] | None = None
    #: The recipients' allow/block lists (:class:`~mxguard.quarantine.senderlists.SenderLists`); ``None``: none.
    sender_lists: Any = None
    #: Called (not awaited) when the filters found a virus: ``on_virus(tx, plan, content)`` (notifications).
    on_virus: Callable[..., None] | None = None
    #: Called with a reason (``"bare_lf"``) when the front door refuses a command line (metrics).
    on_refusal: Callable[[str], None] | None = None
    #: The gateway's own TLS-RPT mailbox (:class:`~mxguard.smtp.tlsrpt_inbox.ReportInbox`); ``None``: off.
    report_inbox: Any = None
    #: Partner TLS rules (:class:`~mxguard.smtp.partners.PartnerRules`); ``None``: none.
    partners: Any = None
    #: Who may relay (:class:`~mxguard.relay.access.RelayAccess`); ``None``: nobody, the gateway is an MX only.
    relay: Any = None
    #: Takes relayed recipients at the end of DATA (:class:`~mxguard.relay.accept.OutboundAcceptor`):
    #: ``await accept(tx, content) -> Reply``; ``None``: nothing is relayed.
    outbound: Any = None
    #: Called with a reason when a relay attempt is refused (metrics): ``stranger``, ``auth_failed``,
    #: ``sender_domain``, ``auth_required``.
    on_relay_refusal: Callable[[str], None] | None = None

    @property
    def hostname(self) -> str:
        return self.settings.hostname


@dataclass
class Transaction:
    """The state between MAIL and the end of DATA (or RSET)."""

    txn_id: str
    client: ClientInfo
    mail_from: str
    body: str | None
    smtputf8: bool
    size_hint: int | None
    #: REQUIRETLS (RFC 8689) was asked for in MAIL.
    requiretls: bool = False
    started: float = field(default_factory=time.perf_counter)
    started_wall: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    legs: dict[Route, RouteLeg] = field(default_factory=dict)
    results: list[RecipientResult] = field(default_factory=list)
    attempts: int = 0
    connect_ms: float = 0.0
    tls_ms: float = 0.0
    #: The filter verdict, when filtering ran (its ``auth.sender_aligned`` gates DSNs).
    verdict: Verdict | None = None
    filter_plan: dispositions.FilterPlan | None = None
    filter_ms: float | None = None
    #: Connections opened at the end of DATA on a route relaxed by ``TLS-Required: No``; closed
    #: with the transaction, never pooled.
    relaxed_conns: list[DownstreamConnection] = field(default_factory=list)
    #: Recipients that are a served domain's TLS-RPT address: the gateway takes the message itself.
    report_rcpts: list[str] = field(default_factory=list)
    #: Partner TLS rules judged in this transaction: rule -> refusal (``None``: met).
    partner_checks: dict[Any, Reply | None] = field(default_factory=dict)
    #: Recipients outside the served domains, relayed for the client's organization (store and forward).
    outbound: list[str] = field(default_factory=list)
    #: The outbound filter decision for the message log (when the relayed part was filtered).
    outbound_verdict: dict[str, Any] | None = None
    #: ``(recipient, route)`` whose RCPT the downstream server has not answered yet: a transaction
    #: that ends meanwhile (the sender left) still logs it.
    rcpt_in_flight: tuple[str, Route] | None = None


#: The message-log disposition of a TLS-RPT report the gateway took for itself.
REPORT_DISPOSITION = "tls-report"


def sender_aligned(tx: Transaction) -> bool:
    """True when the filter verdict says the sender passed SPF or DKIM alignment (gates DSNs)."""
    auth = getattr(tx.verdict, "auth", None)
    return bool(getattr(auth, "sender_aligned", False))


def _ended_reply(reason: str | None, results: list[RecipientResult]) -> str:
    """The message log's reply column for a transaction that ended before DATA.

    Each recipient refused at RCPT is named with its reply, so a session whose
    recipients were all refused does not read as a plain "(ended by QUIT)".
    """
    refused = [f"{r.rcpt}: {r.code} {r.enhanced} {r.text}".strip() for r in results
               if r.disposition != "aborted" and r.code >= 400]
    ended = f"(ended by {reason})"
    return f"{ended} refused at RCPT: " + "; ".join(refused) if refused else ended


def _entry_domain(leg: RouteLeg) -> str:
    """The domain a spool entry is filed under: its first recipient's (the leg's first
    recipient may have been refused, e.g. its domain defers while this one spools)."""
    first = leg.accepted[0] if leg.accepted else None
    return leg.rcpt_domains.get(first, leg.domain).name if first else leg.domain.name


def _disposition_for(reply: Reply) -> str:
    if reply.is_positive:
        return "delivered"
    return "deferred" if reply.is_transient else "rejected"


class ProxySession:
    """Per inbound connection: downstream connections by route, and the open transaction.

    Args:
        ctx: shared gateway context.
    """

    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx
        self.conns: dict[Route, DownstreamConnection] = {}
        self.tx: Transaction | None = None
        self.transactions = 0

    # -- transaction life cycle ------------------------------------------------------

    def begin(self, client: ClientInfo, mail_from: str, options: list[str], *, requiretls: bool = False) -> None:
        """Start a transaction after MAIL FROM was accepted by syntax checks.

        Args:
            client: who is sending (fixed for the transaction).
            mail_from: envelope sender, ``""`` for the null reverse-path.
            options: ESMTP MAIL parameters, upper-cased (``SIZE=n``, ``BODY=8BITMIME``, ``SMTPUTF8``).
            requiretls: MAIL carried REQUIRETLS (RFC 8689): every hop must be verified TLS to a
                server that offers REQUIRETLS (in line, from the spool, on release).
        """
        body = None
        size = None
        smtputf8 = False
        for opt in options:
            key, _, value = opt.partition("=")
            if key == "BODY":
                body = value
            elif key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "SMTPUTF8":
                smtputf8 = True
        self.tx = Transaction(new_txn_id(), client, mail_from, body, smtputf8, size, requiretls=requiretls)

    async def add_recipient(self, address: str) -> Reply:
        """Decide one RCPT: relay check, inbound TLS policy, then the downstream's own answer.

        Returns:
            the reply for the sender (``250``: accepted by the downstream server).
        """
        tx = self.tx
        assert tx is not None
        tx.attempts += 1
        found = self.ctx.directory.lookup(address)
        if found is None and tx.client.relay is not None and self.ctx.outbound is not None:
            return self._relay_recipient(tx, address)
        if found is None:
            log.info("relay denied", txn=tx.txn_id, rcpt=address, client=tx.client.ip, sender=tx.mail_from)
            if self.ctx.on_relay_refusal is not None:
                self.ctx.on_relay_refusal("stranger")
            return self._refused(address, RELAY_DENIED, None)
        domain, route = found
        if domain.inbound_tls == InboundTls.REQUIRED and not tx.client.tls:
            log.info("inbound TLS required", txn=tx.txn_id, rcpt=address, client=tx.client.ip)
            return self._refused(address, TLS_REQUIRED_INBOUND, route)
        refusal = self._partner_refusal(tx, domain.name)
        if refusal is not None:
            return self._refused(address, refusal, route)
        inbox = self.ctx.report_inbox
        if inbox is not None and inbox.takes(address):
            return self._take_report_rcpt(tx, address)
        if tx.report_rcpts:
            log.info("recipient mixed with a TLS-RPT address", txn=tx.txn_id, rcpt=address)
            return self._refused(address, MIXED_WITH_REPORTS, route)
        tx.rcpt_in_flight = (address, route)
        try:
            reply = await self._rcpt_on_route(tx, address, domain, route)
        except asyncio.CancelledError:
            raise  # left set: the abort that follows (the sender left) logs this recipient
        except BaseException:
            tx.rcpt_in_flight = None
            raise
        tx.rcpt_in_flight = None
        return reply

    async def _rcpt_on_route(self, tx: Transaction, address: str, domain: Any, route: Route) -> Reply:
        """The downstream server's answer to one recipient of a served domain (MAIL first on a new leg)."""
        leg = tx.legs.get(route)
        first_reply: Reply | None = None
        if leg is None:
            leg = RouteLeg(route, domain)
            tx.legs[route] = leg
            first_reply = await self._start_leg(tx, leg, address)
        if leg.failure is not None and self._may_spool(leg, domain):
            return self._accept_for_spool(leg, address, domain)
        if leg.failure is not None and self._waits_for_header(tx, leg):
            return self._accept_pending_tls(leg, address, domain)
        if leg.failure is not None:
            return self._refused(address, leg.failure.reply, route)
        if leg.mail_reply is not None and not leg.mail_reply.is_positive:
            return self._refused(address, leg.mail_reply, route)
        try:
            reply = first_reply or await leg.conn.rcpt(address)
        except DownstreamLost as exc:
            leg.lost = str(exc)
            leg.failure = RouteFailure(Reply(451, "4.4.1", "Downstream connection lost, try again later"),
                                       attempts=[f"lost at RCPT: {exc}"])
            self.conns.pop(route, None)
            if self._may_spool(leg, domain):
                return self._accept_for_spool(leg, address, domain)
            return self._refused(address, leg.failure.reply, route)
        if reply.is_positive:
            if reply.enhanced == "2.0.0":
                # RFC 3463 3.2: X.1.5 "destination address valid" is the code for an accepted
                # RCPT; many servers (Postfix, aiosmtpd) send 2.0.0 or none at all.
                reply = Reply(reply.code, "2.1.5", reply.text)
            leg.accepted.append(address)
            leg.rcpt_domains[address] = domain
        else:
            self._refused(address, reply, route)
        log.debug("rcpt relayed", txn=tx.txn_id, rcpt=address, reply=reply.one_line())
        return reply

    def _relay_recipient(self, tx: Transaction, address: str) -> Reply:
        """A recipient outside the served domains from a session that may relay: taken for the
        outbound spool at the end of DATA, once the sender's domain is the organization's."""
        grant = tx.client.relay
        if not self.ctx.relay.sender_allowed(grant, tx.mail_from) and tx.mail_from:
            log.warning("relay refused: sender domain is not the organization's", txn=tx.txn_id,
                        sender=tx.mail_from, org=grant.org, via=grant.method, client=tx.client.ip)
            if self.ctx.on_relay_refusal is not None:
                self.ctx.on_relay_refusal("sender_domain")
            return self._refused(address, sender_not_organizations(tx.mail_from, grant.org), None)
        if tx.report_rcpts:
            return self._refused(address, MIXED_WITH_REPORTS, None)
        if address not in tx.outbound:
            tx.outbound.append(address)
        log.debug("recipient taken for relaying", txn=tx.txn_id, rcpt=address, org=grant.org, via=grant.method)
        return Reply(250, "2.1.5", "Recipient ok (relayed)")

    def _partner_refusal(self, tx: Transaction, domain: str) -> Reply | None:
        """The recipient domain's partner TLS rule for this sender, judged once per transaction."""
        partners = self.ctx.partners
        rule = partners.rule_for(domain, tx.mail_from) if partners is not None else None
        if rule is None:
            return None
        if rule not in tx.partner_checks:
            client = tx.client
            refusal = partners.check(rule, tx.mail_from, client.tls_version, client.cert)
            tx.partner_checks[rule] = refusal
            cert = client.cert
            log.info("partner TLS rule " + ("not met" if refusal else "met"), txn=tx.txn_id, domain=domain,
                     sender=tx.mail_from, rule=rule.sender, client=client.ip, tls=client.tls_version or "none",
                     cert_subject=cert.subject if cert else None, cert_sha256=cert.sha256 if cert else None,
                     reply=refusal.one_line() if refusal else None)
        return tx.partner_checks[rule]

    def refuse_sender(self, client: ClientInfo, mail_from: str, reply: Reply) -> Reply:
        """MAIL refused before a transaction began (a partner rule in clear): record it and return ``reply``."""
        tx = Transaction(new_txn_id(), client, mail_from, None, False, None)
        log.info("sender refused at MAIL", txn=tx.txn_id, sender=mail_from, client=client.ip,
                 reply=reply.one_line())
        self._record(tx, reply, disposition="rejected")
        return reply

    def _take_report_rcpt(self, tx: Transaction, address: str) -> Reply:
        """A served domain's TLS-RPT address: the gateway's own, so never beside downstream recipients."""
        if any(leg.accepted for leg in tx.legs.values()) or tx.outbound:
            log.info("TLS-RPT address mixed with other recipients", txn=tx.txn_id, rcpt=address)
            return self._refused(address, MIXED_WITH_REPORTS, None)
        if address not in tx.report_rcpts:
            tx.report_rcpts.append(address)
        log.debug("TLS-RPT address taken", txn=tx.txn_id, rcpt=address)
        return REPORT_RCPT_OK

    async def _finish_report(self, tx: Transaction, content: bytes) -> Reply:
        """End of DATA for a report address: store the report; no downstream leg, nothing relayed."""
        received_at = time.perf_counter()
        reply = await self.ctx.report_inbox.ingest(content, tx.txn_id)
        # Stored (or stored before): the gateway's own disposition; else the usual words for a refusal.
        disposition = REPORT_DISPOSITION if reply.is_positive else _disposition_for(reply)
        for rcpt in tx.report_rcpts:
            tx.results.append(RecipientResult(rcpt, reply.code, reply.enhanced, reply.text, disposition, None))
        subject, message_id = headers.summarize(content)
        self._record(tx, reply, size=len(content), subject=subject, message_id=message_id,
                     accept_ms=(received_at - tx.started) * 1000)
        self.transactions += 1
        return reply

    def _may_spool(self, leg: RouteLeg, domain: DomainView) -> bool:
        """Unreachable (a temporary failure, not a TLS policy one) and the recipient's own domain
        chose to spool.

        Args:
            domain: the recipient's domain; a route shared by several domains is one leg, but
                ``on_unreachable`` is each domain's own (not the leg's first recipient's).
        """
        return (self.ctx.spooler is not None and leg.failure is not None and not leg.failure.tls_related
                and leg.failure.reply.is_transient and domain.on_unreachable == "spool")

    def _accept_for_spool(self, leg: RouteLeg, address: str, domain: DomainView) -> Reply:
        if not leg.spool:
            leg.spool = True
            log.info("route unreachable; accepting for the spool", txn=self.tx.txn_id, route=leg.route.describe())
        leg.accepted.append(address)
        leg.rcpt_domains[address] = domain
        return Reply(250, "2.1.5", "Recipient ok; the downstream server is unavailable, "
                                   "the message will be held and delivered later")

    def _waits_for_header(self, tx: Transaction, leg: RouteLeg) -> bool:
        """Only the destination's published policy (DANE, MTA-STS) refused every server, and the
        sender did not ask for REQUIRETLS: ``TLS-Required: No`` in the header may still relax it
        (RFC 8689 section 5), and the header comes with DATA. An administrator's ``required`` or
        ``verify`` is local policy and refuses at RCPT as before."""
        return (leg.failure is not None and leg.failure.tls_related and not tx.requiretls
                and leg.route.tls in PUBLISHED_POLICY_MODES)

    def _accept_pending_tls(self, leg: RouteLeg, address: str, domain: DomainView) -> Reply:
        if not leg.tls_deferred:
            leg.tls_deferred = True
            log.info("published TLS policy not met; the decision waits for TLS-Required in the header",
                     txn=self.tx.txn_id, route=leg.route.describe(), reason=str(leg.failure)[:300])
        leg.accepted.append(address)
        leg.rcpt_domains[address] = domain
        return Reply(250, "2.1.5", "Recipient ok; the destination's TLS policy cannot be met now, so the "
                                   "message is refused after DATA unless it carries TLS-Required: No")

    async def _settle_tls_deferred(self, tx: Transaction, leg: RouteLeg, content: bytes) -> None:
        """End of DATA for a leg whose published TLS policy failed at RCPT (RFC 8689 section 5).

        Without ``TLS-Required: No`` the copy gets the policy's ``451 4.7.5`` and nothing is sent.
        With it, the route is relaxed to opportunistic TLS and a fresh connection carries the
        envelope again; that connection is never pooled (the next message has its own header).
        """
        leg.tls_deferred = False
        if not sender_opted_out(content):
            leg.data_reply = leg.failure.reply
            log.info("TLS policy not met and no TLS-Required: No; nothing sent", txn=tx.txn_id,
                     route=leg.route.describe(), reply=leg.data_reply.one_line())
            return
        conn = DownstreamConnection(route_for_message(leg.route, content), self.ctx.settings.downstream,
                                    self.ctx.hostname)
        try:
            await conn.open()
            mail, replies = await conn.resend_envelope(tx.mail_from, list(leg.accepted), size=tx.size_hint,
                                                       body=tx.body, smtputf8=tx.smtputf8)
        except RouteFailure as failure:
            leg.failure, leg.data_reply = failure, failure.reply
            await conn.close()
            return
        except DownstreamLost as exc:
            leg.lost = str(exc)
            leg.data_reply = Reply(451, "4.4.1", "Downstream connection lost, try again later")
            await conn.close()
            return
        leg.failure, leg.conn, leg.relaxed = None, conn, True
        tx.relaxed_conns.append(conn)
        log.info("TLS-Required: No: published TLS policy relaxed to opportunistic", txn=tx.txn_id,
                 route=leg.route.describe(), tls=conn.info.describe_tls() if conn.info else None)
        if not mail.is_positive:
            leg.data_reply = mail
            return
        for rcpt, rep in replies.items():
            if not rep.is_positive:  # refused on the second look: its own reply, as at RCPT
                leg.accepted.remove(rcpt)
                tx.results.append(RecipientResult(rcpt, rep.code, rep.enhanced, rep.text, _disposition_for(rep),
                                                  leg.route.describe()))
        if not leg.accepted:
            await conn.rset()

    def _refused(self, address: str, reply: Reply, route: Route | None) -> Reply:
        assert self.tx is not None
        self.tx.results.append(RecipientResult(address, reply.code, reply.enhanced, reply.text,
                                               _disposition_for(reply), route.describe() if route else None))
        return reply

    async def _start_leg(self, tx: Transaction, leg: RouteLeg, recipient: str) -> Reply | None:
        """Get a connection for the leg's route and send MAIL FROM and the first RCPT TO on it.

        Returns:
            the downstream's reply to ``RCPT TO:<recipient>``, or ``None`` when it was not
            sent (no connection, MAIL refused or lost); ``leg.failure`` and ``leg.mail_reply``
            tell which.
        """
        for attempt in (1, 2):
            conn = self.conns.get(leg.route)
            if conn is not None and not conn.is_connected:
                self.conns.pop(leg.route, None)
                conn = None
            if conn is None and attempt == 1 and self.ctx.pool is not None:
                conn = self.ctx.pool.acquire(leg.route)  # a connection another session left idle
                if conn is not None:
                    self.conns[leg.route] = conn
            leg.reused = conn is not None
            if conn is None:
                conn = DownstreamConnection(leg.route, self.ctx.settings.downstream, self.ctx.hostname)
                try:
                    info = await conn.open()
                except RouteFailure as failure:
                    leg.failure = failure
                    log.warning("route unavailable", txn=tx.txn_id, route=leg.route.describe(), reason=str(failure))
                    return None
                tx.connect_ms += info.connect_ms
                tx.tls_ms += info.tls_ms
                self.conns[leg.route] = conn
                log.debug("downstream connected", txn=tx.txn_id, server=f"{info.host}:{info.port}",
                          tls=info.describe_tls())
            leg.conn = conn
            try:
                # MAIL and this first RCPT in one group where the server pipelines (RFC 2920).
                leg.mail_reply, first = await conn.envelope(tx.mail_from, [recipient], size=tx.size_hint,
                                                            body=tx.body, smtputf8=tx.smtputf8,
                                                            requiretls=tx.requiretls)
                return first.get(recipient)
            except DownstreamLost as exc:
                self.conns.pop(leg.route, None)
                if leg.reused and attempt == 1:
                    continue  # the idle connection timed out downstream; open a fresh one
                leg.failure = RouteFailure(Reply(451, "4.4.1", "Downstream connection lost, try again later"),
                                           attempts=[f"lost at MAIL/RCPT: {exc}"])
                return None
        return None

    async def finish(self, content: bytes) -> Reply:
        """End of DATA: send the message to every leg and give the sender one reply.

        Args:
            content: the message as received (dot-unstuffed, CRLF line ends).

        Returns:
            ``451 4.3.0`` when the message could not be fully scanned (nothing
            sent); ``554/550 5.7.1`` when every recipient's copy is refused by
            the filters; otherwise the downstream server's own final reply when
            every copy was taken; the refusal when nothing was taken anywhere;
            otherwise ``250`` once the rest is held (quarantine) or durably in
            the spool (``451 4.3.0`` if it could not be stored). A route whose
            published TLS policy (DANE, MTA-STS) failed at RCPT gets that policy's
            ``451 4.7.5`` here, nothing sent, unless the message carries
            ``TLS-Required: No`` (RFC 8689 section 5): then it goes over
            opportunistic TLS.
        """
        tx = self.tx
        assert tx is not None
        self.tx = None
        if tx.report_rcpts:
            return await self._finish_report(tx, content)
        received_at = time.perf_counter()
        for leg in tx.legs.values():
            if leg.tls_deferred and leg.accepted:
                await self._settle_tls_deferred(tx, leg, content)
        legs = [leg for leg in tx.legs.values() if leg.accepted]
        try:
            if tx.outbound:
                return await self._finish_outbound(tx, legs, content, received_at)
            return await self._finish_legs(tx, legs, content, received_at)
        finally:
            for conn in tx.relaxed_conns:
                await conn.close()

    async def _finish_outbound(self, tx: Transaction, legs: list[RouteLeg], content: bytes,
                               received_at: float) -> Reply:
        """End of DATA with relayed recipients: they go to the outbound spool first (``250`` once
        durable); recipients in served domains of the same transaction then take the in-line path,
        the message counting as taken (their temporary failures are spooled, not refused)."""
        reply = await self.ctx.outbound.accept(tx, content)
        if not reply.is_positive or not legs:
            if legs:
                await self._rset_legs(legs)
                for leg in legs:
                    self._results(tx, leg, reply, _disposition_for(reply))
            if tx.verdict is not None and tx.verdict.subject is not None:
                subject, message_id = tx.verdict.subject, tx.verdict.message_id or ""
            else:
                subject, message_id = headers.summarize(content)
            self._record(tx, reply, size=len(content), subject=subject, message_id=message_id,
                         accept_ms=(received_at - tx.started) * 1000)
            self.transactions += 1
            return reply
        final = await self._finish_legs(tx, legs, content, received_at, taken=True)
        return final if not final.is_positive else reply

    async def _finish_legs(self, tx: Transaction, legs: list[RouteLeg], content: bytes, received_at: float,
                           *, taken: bool = False) -> Reply:
        plan = await self._filter(tx, legs, content)
        if tx.verdict is not None and tx.verdict.subject is not None:
            subject, message_id = tx.verdict.subject, tx.verdict.message_id or ""
        else:
            subject, message_id = headers.summarize(content)
        relay_started = time.perf_counter()
        if plan is None:
            outcomes: list[LegOutcome] = []
            for leg in legs:
                message = self._copy_for(tx, leg, content)
                if leg.spool:
                    reply = None
                elif leg.data_reply is not None:
                    reply = leg.data_reply
                else:
                    reply = await self._send_leg(tx, leg, message)
                outcomes.append(LegOutcome(leg, message, reply))
            final = await self._combine(tx, outcomes, subject, held=taken)
        else:
            final = await self._dispose(tx, plan, legs, content, subject, taken=taken)
        relay_ms = (time.perf_counter() - relay_started) * 1000
        self._record(tx, final, size=len(content), subject=subject, message_id=message_id,
                     accept_ms=(received_at - tx.started) * 1000, relay_ms=relay_ms)
        self.transactions += 1
        return final

    async def _filter(self, tx: Transaction, legs: list[RouteLeg], content: bytes) -> dispositions.FilterPlan | None:
        """Run the pipeline once and plan each recipient's disposition."""
        if self.ctx.filters is None or not legs:
            return None
        started = time.perf_counter()
        envelope = Envelope(client_ip=tx.client.ip, helo=tx.client.helo, mail_from=tx.mail_from,
                            rcpts=[r for leg in legs for r in leg.accepted], txn_id=tx.txn_id)
        tx.verdict = await self.ctx.filters.scan(content, envelope)
        tx.filter_plan = dispositions.plan(tx.verdict, legs, tx.txn_id, sender=tx.mail_from,
                                           lists=self.ctx.sender_lists)
        if tx.verdict.viruses and self.ctx.on_virus is not None:
            self.ctx.on_virus(tx, tx.filter_plan, content)
        tx.filter_ms = (time.perf_counter() - started) * 1000
        log.debug("filtered", txn=tx.txn_id, ms=round(tx.filter_ms, 1),
                  dispositions={r: d.action for r, d in tx.filter_plan.by_rcpt.items()})
        return tx.filter_plan

    async def _dispose(self, tx: Transaction, plan: dispositions.FilterPlan, legs: list[RouteLeg],
                       content: bytes, subject: str, *, taken: bool = False) -> Reply:
        """Carry out a filter plan: defer, refuse, hold and/or deliver (or spool) the copies."""
        if plan.deferred or (plan.held and self.ctx.hold is None):
            await self._rset_legs(legs)
            reply = dispositions.DEFER_REPLY
            for leg in legs:
                self._results(tx, leg, reply, "deferred")
            log.warning("message deferred: not fully scanned", txn=tx.txn_id,
                        errors=[f"{e.engine}: {e.reason}" for e in plan.verdict.errors])
            return reply
        if plan.rejected:
            await self._rset_legs(legs)
            reply = dispositions.reject_reply([d for _, _, d in plan.rejected], tx.txn_id)
            for leg in legs:
                self._results(tx, leg, reply, "rejected")
            log.info("message refused by the filters", txn=tx.txn_id, reply=reply.one_line())
            return reply
        stripped = headers.strip_gateway_fields(content, self.ctx.hostname)
        if plan.held:
            # Held copies are stored first: if that fails the sender retries and
            # nothing has been delivered; once they are stored they count as taken.
            failure = await self._hold(tx, plan, stripped)
            if failure is not None:
                await self._rset_legs(legs)
                for leg in legs:
                    self._results(tx, leg, failure, "deferred")
                return failure
        outcomes: list[LegOutcome] = []
        for leg in legs:
            copies = [c for c in plan.copies if c.leg is leg]
            if not copies:
                if leg.conn is not None:
                    await leg.conn.rset()  # every recipient of this route is held
                continue
            for copy in copies:
                tagged = copy.disposition.action == "tag"
                fields = dispositions.filter_fields(self.ctx.hostname, plan.verdict, copy.verdict_value,
                                                    sender=tx.mail_from, helo=tx.client.helo, tagged=tagged)
                sub = replace(leg, accepted=list(copy.rcpts))
                message = self._copy_for(tx, sub, dispositions.prepare(stripped, fields, tagged))
                if leg.spool:
                    reply = None
                elif leg.data_reply is not None:
                    reply = leg.data_reply
                elif plan.leg_is_whole(copy):
                    reply = await self._send_leg(tx, sub, message)
                else:
                    reply = await self._send_subset(tx, sub, message)
                leg.lost = leg.lost or sub.lost
                outcomes.append(LegOutcome(sub, message, reply))
        return await self._combine(tx, outcomes, subject, held=bool(plan.held) or taken)

    async def _send_subset(self, tx: Transaction, leg: RouteLeg, message: bytes) -> Reply:
        """A copy for part of the leg's recipients: RSET, MAIL and RCPT again for them, then DATA."""
        try:
            mail, replies = await leg.conn.resend_envelope(tx.mail_from, list(leg.accepted), size=tx.size_hint,
                                                           body=tx.body, smtputf8=tx.smtputf8,
                                                           requiretls=tx.requiretls)
        except DownstreamLost as exc:
            leg.lost = str(exc)
            self.conns.pop(leg.route, None)
            return Reply(451, "4.4.1", "Downstream connection lost, try again later")
        if not mail.is_positive:
            return mail
        refused = {r: rep for r, rep in replies.items() if not rep.is_positive}
        for rcpt, rep in refused.items():
            # The downstream changed its mind between the two RCPTs.
            leg.accepted.remove(rcpt)
            tx.results.append(RecipientResult(rcpt, rep.code, rep.enhanced, rep.text, _disposition_for(rep),
                                              leg.route.describe()))
        if not leg.accepted:
            await leg.conn.rset()
            return next(iter(refused.values()))
        return await self._send_leg(tx, leg, message)

    async def _hold(self, tx: Transaction, plan: dispositions.FilterPlan, stripped: bytes) -> Reply | None:
        """Quarantine the held copies; returns a failure reply when they could not be stored."""
        copies = []
        for held in plan.held:
            fields = dispositions.filter_fields(
                self.ctx.hostname, plan.verdict,
                dispositions.verdict_header_value(plan.verdict, held.disposition, tx.txn_id),
                sender=tx.mail_from, helo=tx.client.helo, tagged=False)
            single = replace(held.leg, accepted=[held.rcpt])
            copies.append(HeldCopy(held.rcpt, held.reason, held.disposition.category,
                                   self._copy_for(tx, single, headers.prepend_fields(stripped, fields)),
                                   requiretls=tx.requiretls))
        scores = [j.score for j in plan.verdict.junk]
        try:
            ids = await self.ctx.hold(tx=tx, copies=copies, verdict=plan.as_log(),
                                      score=max(scores) if scores else None)
        except Exception as exc:  # noqa: BLE001 - the database is down: the sender must retry
            log.error("quarantine failed; message deferred", txn=tx.txn_id, error=repr(exc)[:200])
            return Reply(451, "4.3.0", "Temporary local problem; nothing was delivered, try again later")
        for held, qid in zip(plan.held, ids):
            tx.results.append(RecipientResult(held.rcpt, 250, "2.0.0", f"held in quarantine as {qid}: {held.reason}",
                                              "quarantined", held.leg.route.describe()))
        log.info("held in quarantine", txn=tx.txn_id, rcpts=[h.rcpt for h in plan.held],
                 reasons=sorted({h.reason for h in plan.held}))
        return None

    async def _rset_legs(self, legs: list[RouteLeg]) -> None:
        for leg in legs:
            if leg.conn is not None:
                await leg.conn.rset()
                if not leg.conn.is_connected:
                    self.conns.pop(leg.route, None)

    def _copy_for(self, tx: Transaction, leg: RouteLeg, content: bytes) -> bytes:
        """The bytes that go to one leg: the message with our Received field in front."""
        client = tx.client
        received = headers.received_field(
            helo=client.helo, client_ip=client.ip, hostname=self.ctx.hostname, txn_id=tx.txn_id,
            tls_version=client.tls_version, cipher=client.cipher, bits=client.bits, smtputf8=tx.smtputf8,
            recipient=leg.accepted[0] if len(leg.accepted) == 1 else None,
            client_cert=(client.cert.subject, client.cert.sha256) if client.cert else None)
        return headers.prepend_fields(content, [received])

    async def _send_leg(self, tx: Transaction, leg: RouteLeg, message: bytes) -> Reply:
        try:
            return await leg.conn.data(message)
        except DownstreamLost as exc:
            leg.lost = str(exc)
            self.conns.pop(leg.route, None)
            log.warning("downstream lost during DATA", txn=tx.txn_id, route=leg.route.describe(), error=str(exc))
            return Reply(451, "4.4.1", "Downstream connection lost during DATA, try again later")

    async def _combine(self, tx: Transaction, outcomes: list["LegOutcome"], subject: str, *,
                       held: bool = False) -> Reply:
        """Turn the legs' outcomes into one reply, spooling what must be held.

        Rules: nothing taken anywhere → the sender keeps the message (a
        temporary refusal wins, so it retries everything). Anything taken
        (delivered, spooled, or ``held`` in quarantine by the filters) → every
        temporary failure is spooled too (a partial 4xx is not possible after
        DATA), and permanent failures get a DSN (RFC 3464) when the sender is
        authenticated.
        """
        if held and not outcomes:
            return Reply(250, "2.0.0", f"Ok: accepted as {tx.txn_id}")
        delivered = [o for o in outcomes if o.reply is not None and o.reply.is_positive]
        spool_wanted = [o for o in outcomes if o.reply is None
                        or (o.reply.is_transient and self._spoolable_after_data(o.leg))]
        transient = [o for o in outcomes if o.reply is not None and o.reply.is_transient and o not in spool_wanted]
        permanent = [o for o in outcomes if o.reply is not None and o.reply.is_permanent]

        if not delivered and not spool_wanted and not held:
            replies = [o.reply for o in transient] or [o.reply for o in permanent]
            final = replies[0]
            for o in outcomes:
                self._results(tx, o.leg, final, _disposition_for(final))
            return final

        if self.ctx.spooler is not None:
            spool_wanted += transient  # a partial 4xx cannot be given after DATA
            transient = []
        entries = [self._spool_entry(tx, o, subject) for o in spool_wanted]
        dsn = None
        if permanent and self.ctx.spooler is not None:
            failed = [(rcpt, o.reply, o.leg.conn.info.host if o.leg.conn and o.leg.conn.info else None)
                      for o in permanent for rcpt in o.leg.accepted]
            dsn = self.ctx.spooler.dsn(tx, failed, permanent[0].message)
        if entries or dsn is not None:
            try:
                await self.ctx.spooler.hold(entries + ([dsn] if dsn is not None else []))
            except Exception as exc:  # noqa: BLE001 - any storage failure: the sender must keep the message
                log.error("spool write failed; the sender is told to retry", txn=tx.txn_id, error=repr(exc)[:300],
                          delivered_legs=len(delivered))
                final = Reply(451, "4.3.0", "Temporary local problem: the message could not be stored, "
                                            "try again later")
                for o in outcomes:
                    disposition = "delivered" if o in delivered else "deferred"
                    self._results(tx, o.leg, o.reply if o in delivered else final, disposition)
                return final
        for o in delivered:
            self._results(tx, o.leg, o.reply, "delivered")
        for o in spool_wanted:
            reason = o.reply or o.leg.failure.reply
            self._results(tx, o.leg, reason, "spooled")
            log.info("spooled", txn=tx.txn_id, route=o.leg.route.describe(), rcpts=o.leg.accepted,
                     reason=reason.one_line())
        for o in permanent:
            self._results(tx, o.leg, o.reply, "rejected")
        for o in transient:  # only without a spooler: nothing else can be done
            log.error("recipients lost: no spool configured", txn=tx.txn_id, rcpts=o.leg.accepted)
            self._results(tx, o.leg, o.reply, "deferred")
        if delivered and not spool_wanted and not permanent and not transient:
            return delivered[0].reply
        what = "held for delivery" if spool_wanted else "delivered"
        return Reply(250, "2.0.0", f"Ok: queued as {tx.txn_id} ({what})")

    def _spoolable_after_data(self, leg: RouteLeg) -> bool:
        # A TLS policy failure is not "unreachable": as at RCPT, the sender keeps the message
        # unless another copy was taken (then a partial 4xx is impossible and it is spooled).
        # A route shared by several domains: one reply after DATA serves them all, so the copy
        # is spooled only when every recipient's domain spools; one that says "defer" keeps
        # the sender retrying (nothing is lost) rather than the gateway storing its mail.
        tls_refused = leg.data_reply is not None and leg.failure is not None and leg.failure.tls_related
        spools = all(leg.rcpt_domains.get(r, leg.domain).on_unreachable == "spool" for r in leg.accepted)
        return self.ctx.spooler is not None and spools and not tls_refused

    def _spool_entry(self, tx: Transaction, o: "LegOutcome", subject: str):
        reply = o.reply or (o.leg.failure.reply if o.leg.failure else None)
        return self.ctx.spooler.entry(
            txn_id=tx.txn_id, domain=_entry_domain(o.leg), mail_from=tx.mail_from, recipients=list(o.leg.accepted),
            message=o.message, subject=subject, body_8bit=tx.body == "8BITMIME", smtputf8=tx.smtputf8,
            requiretls=tx.requiretls, sender_aligned=sender_aligned(tx), first_reply=reply.one_line() if reply else "")

    def _results(self, tx: Transaction, leg: RouteLeg, reply: Reply, disposition: str) -> None:
        for rcpt in leg.accepted:
            tx.results.append(RecipientResult(rcpt, reply.code, reply.enhanced, reply.text, disposition,
                                              leg.route.describe()))

    async def refuse(self, reply: Reply, content: bytes) -> Reply:
        """End of DATA with a message the front door refuses (limits, bare line ends): record and RSET."""
        tx = self.tx
        assert tx is not None
        self.tx = None
        for leg in tx.legs.values():
            if leg.conn is not None and leg.conn.in_transaction:
                await leg.conn.rset()
            self._results(tx, leg, reply, _disposition_for(reply))
        for rcpt in tx.report_rcpts + tx.outbound:
            tx.results.append(RecipientResult(rcpt, reply.code, reply.enhanced, reply.text,
                                              _disposition_for(reply), None))
        subject, message_id = headers.summarize(content)
        self._record(tx, reply, size=len(content), subject=subject, message_id=message_id)
        return reply

    async def abort(self, reason: str) -> None:
        """End the open transaction without DATA (RSET, EHLO, QUIT, disconnect)."""
        tx, self.tx = self.tx, None
        if tx is None:
            return
        for leg in tx.legs.values():
            if leg.conn is not None and leg.conn.in_transaction:
                await leg.conn.rset()
                if not leg.conn.is_connected:
                    self.conns.pop(leg.route, None)
        pending, tx.rcpt_in_flight = tx.rcpt_in_flight, None
        if pending is not None and any(pending[0] in leg.accepted for leg in tx.legs.values()):
            pending = None  # a repeated RCPT of an accepted recipient: logged once, below
        if pending or tx.results or tx.report_rcpts or tx.outbound or any(leg.accepted for leg in tx.legs.values()):
            for leg in tx.legs.values():
                for rcpt in leg.accepted:
                    tx.results.append(RecipientResult(rcpt, 0, "", f"transaction ended by {reason} before DATA",
                                                      "aborted", leg.route.describe()))
            if pending is not None:
                tx.results.append(RecipientResult(pending[0], 0, "", f"transaction ended by {reason} before "
                                                  "the downstream server answered RCPT", "aborted",
                                                  pending[1].describe()))
            for rcpt in tx.report_rcpts + tx.outbound:
                tx.results.append(RecipientResult(rcpt, 0, "", f"transaction ended by {reason} before DATA",
                                                  "aborted", None))
            self._record(tx, None, abort_reason=reason)

    async def close(self) -> None:
        """The inbound connection is gone: abort, then park the downstream connections for reuse (or close them)."""
        await self.abort("disconnect")
        conns, self.conns = self.conns, {}
        for conn in conns.values():
            if self.ctx.pool is not None:
                self.ctx.pool.release(conn)
            else:
                await conn.close()

    # -- the record -------------------------------------------------------------------

    def _record(self, tx: Transaction, final: Reply | None, *, size: int = 0, subject: str = "",
                message_id: str = "", accept_ms: float | None = None, relay_ms: float | None = None,
                abort_reason: str | None = None, disposition: str | None = None) -> None:
        infos: list[dict[str, Any]] = []
        first: ConnectionInfo | None = None
        for leg in tx.legs.values():
            if leg.conn is None and leg.failure is None:
                continue  # the connection was still being opened when the transaction ended: no attempt to count
            info = leg.conn.info if leg.conn is not None else None
            item: dict[str, Any] = {"route": leg.route.describe(), "reused": leg.reused,
                                    **attempt_item(leg.domain.name, info, leg.failure)}  # TLS-RPT counts these
            if info is not None and leg.failure is None:
                first = first or info
            if leg.lost:
                item["lost"] = leg.lost
            if leg.relaxed:
                item["tls_required_no"] = True  # RFC 8689 section 5: the published policy was relaxed
            infos.append(item)
        # Ended before the data: nothing was delivered, so an accepted recipient makes the
        # transaction "aborted" even beside refused ones ("partial" reads as partly delivered).
        disposition = disposition or ("aborted" if abort_reason and any(
            r.disposition == "aborted" for r in tx.results) else overall_disposition(tx.results))
        client = tx.client
        record = LogRecord(
            txn_id=tx.txn_id, ts=tx.started_wall, node=self.ctx.hostname, client_ip=client.ip,
            client_port=client.port, helo=client.helo, inbound_tls=client.tls, tls_version=client.tls_version,
            tls_cipher=client.cipher, tls_bits=client.bits, mail_from=tx.mail_from,
            rcpt_to=" ".join(r.rcpt for r in tx.results), size=size, subject=subject, message_id=message_id,
            downstream_host=f"{first.host}:{first.port}" if first else None,
            downstream_tls=first.tls if first else None,
            downstream_tls_version=first.tls_version if first else None,
            downstream_cipher=first.cipher if first else None,
            downstream_verified=first.verified if first else None,
            downstream=infos, results=[r.__dict__ for r in tx.results], disposition=disposition,
            final_code=final.code if final else None,
            final_reply=final.one_line() if final else _ended_reply(abort_reason, tx.results),
            accept_ms=accept_ms, connect_ms=tx.connect_ms or None, tls_ms=tx.tls_ms or None,
            relay_ms=relay_ms, total_ms=(time.perf_counter() - tx.started) * 1000,
            verdict=tx.filter_plan.as_log() if tx.filter_plan else (tx.outbound_verdict or {}),
            filter_ms=tx.filter_ms,
            client_cert_subject=client.cert.subject if client.cert else None,
            client_cert_sha256=client.cert.sha256 if client.cert else None,
            direction="outbound" if tx.outbound else "inbound",
        )
        for observer in self.ctx.observers:
            observer(record)
        self.ctx.message_log.submit(record)
        log.info("transaction", txn=tx.txn_id, client=client.ip, tls=client.tls_version or "none",
                 sender=tx.mail_from or "<>", rcpts=len(tx.results), disposition=disposition,
                 reply=record.final_reply, ms=round(record.total_ms or 0, 1))
