"""End of DATA for relayed recipients: filters, rate limits, and the sealed spool.

For the recipients of a transaction that are not in a served domain (the
session may relay, :mod:`mxguard.relay.access`), the message is accepted
*store and forward*: the sender hears ``250 2.0.0`` only once one sealed spool
entry per destination domain (``kind="outbound"``) is committed; the spool
worker delivers it by MX lookup.

Before that:

1. **Filters**: the same pipeline and the same virus and attachment rules as
   inbound (the sender domain's own settings). A virus is refused
   (``554 5.7.1``); a content-policy refusal or quarantine, or a junk score at or
   over ``relay.junk_reject``, is refused (``550 5.7.1``: the organization's own
   server gets the reason, no one else's mailbox is involved); an engine that did
   not answer defers (``451 4.3.0``) as the domain's ``engine_failure`` says.
2. **Rate limits** (:mod:`mxguard.relay.ratelimit`): over ``relay.sender_rate``
   or ``relay.org_rate`` messages per window, the message is still accepted but
   its spool entries get the status ``held`` (never retried until an
   administrator releases them), and the first message over a limit alerts the
   organization's admins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from mxguard.config import Settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.message import Envelope
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.relay import ratelimit
from mxguard.relay.access import sender_domain
from mxguard.smtp import headers
from mxguard.smtp.replies import Reply
from mxguard.spool import queue
from mxguard.storage.db import Store
from mxguard.storage.messagelog import RecipientResult
from mxguard.storage.sealing import KeyRing

log = structlog.get_logger("mxguard.relay")

VIRUS_REFUSED = 554
DEFERRED = Reply(451, "4.3.0", "Temporary filtering failure; nothing was relayed, try again later")
STORE_FAILED = Reply(451, "4.3.0", "Temporary local problem: the message could not be stored, try again later")
#: The message log's disposition of outbound mail held by a rate limit.
HELD = "held"


def recipient_domain(address: str) -> str:
    """The lower-cased domain of a recipient address (the spool entry's ``domain``)."""
    return address.rpartition("@")[2].strip().rstrip(".").lower()


class OutboundAcceptor:
    """Takes the relayed part of a transaction at the end of DATA.

    Args:
        store: the database (spool and rate counters).
        keyring: sealing keys for the spool.
        settings: ``relay.*`` (limits, junk threshold), ``spool.*``, ``hostname``.
        filters: the pipeline (``None``: no filtering, for tests of the bare relay).
        domain_policy: ``name -> DomainView | None`` (the sender domain's filter settings).
        on_rate_exceeded: called (not awaited) for the first message over a limit in a window, with
            ``org_id, org, scope, limit, window, txn_id, sender`` (the notifier's alert).
    """

    def __init__(self, store: Store, keyring: KeyRing, settings: Settings, filters: FilterPipeline | None,
                 domain_policy: Callable[[str], Any], on_rate_exceeded: Callable[..., None] | None = None):
        self.store = store
        self.keyring = keyring
        self.settings = settings
        self.filters = filters
        self.domain_policy = domain_policy
        self.on_rate_exceeded = on_rate_exceeded

    def policy_for(self, sender: str) -> DomainFilterPolicy:
        """The sender domain's virus and attachment rules, with the relay's own junk threshold."""
        domain = sender_domain(sender)
        view = self.domain_policy(domain) if domain else None
        base = DomainFilterPolicy.of(view)
        limit = self.settings.relay.junk_reject
        # Outbound mail is never quarantined for junk or tagged: it is refused, or it goes.
        return replace(base, junk_reject=limit, junk_quarantine=limit, junk_tag=None, virus_action="reject")

    def received(self, tx, recipient: str | None) -> str:
        """Our ``Received`` field: client, TLS version and cipher, client certificate, ESMTPSA for AUTH."""
        client = tx.client
        grant = client.relay
        return headers.received_field(
            helo=client.helo, client_ip=client.ip, hostname=self.settings.hostname, txn_id=tx.txn_id,
            tls_version=client.tls_version, cipher=client.cipher, bits=client.bits, smtputf8=tx.smtputf8,
            recipient=recipient, client_cert=(client.cert.subject, client.cert.sha256) if client.cert else None,
            authenticated=grant is not None and grant.method == "auth")

    async def accept(self, tx, content: bytes) -> Reply:
        """Filter, count and spool the relayed recipients of ``tx`` (``tx.outbound``, in order).

        Appends one :class:`~mxguard.storage.messagelog.RecipientResult` per recipient to
        ``tx.results`` and sets ``tx.outbound_verdict`` for the message log.

        Returns:
            ``250 2.0.0`` once the entries are committed (held or queued); ``554 5.7.1`` for a
            virus, ``550 5.7.1`` for a policy or junk refusal, ``451 4.3.0`` when the filters or
            the database could not do their part (nothing stored).
        """
        grant = tx.client.relay
        rcpts = list(tx.outbound)
        started = time.perf_counter()
        refusal = await self._filter(tx, content, rcpts)
        if refusal is not None:
            self._results(tx, rcpts, refusal, "rejected" if refusal.is_permanent else "deferred")
            return refusal
        try:
            counts = await ratelimit.count_message(
                self.store, sender=tx.mail_from, org_id=grant.org_id, sender_limit=self.settings.relay.sender_rate,
                org_limit=self.settings.relay.org_rate, window=self.settings.relay.rate_window)
        except Exception as exc:  # noqa: BLE001 - the database is down: the sender must retry
            log.error("relay rate count failed; message deferred", txn=tx.txn_id, error=repr(exc)[:200])
            self._results(tx, rcpts, STORE_FAILED, "deferred")
            return STORE_FAILED
        over = [c for c in counts if c.exceeded]
        by_domain: dict[str, list[str]] = {}
        for rcpt in rcpts:
            by_domain.setdefault(recipient_domain(rcpt), []).append(rcpt)
        subject = (tx.verdict.subject if tx.verdict is not None and tx.verdict.subject is not None
                   else headers.summarize(content)[0])
        entries = []
        for domain, group in by_domain.items():
            fields = [self.received(tx, group[0] if len(group) == 1 else None)]
            message = headers.prepend_fields(headers.strip_gateway_fields(content, self.settings.hostname), fields)
            entries.append(queue.NewSpoolEntry(
                txn_id=tx.txn_id, domain=domain, mail_from=tx.mail_from, recipients=group, message=message,
                subject=subject, body_8bit=tx.body == "8BITMIME", smtputf8=tx.smtputf8, requiretls=tx.requiretls,
                sender_aligned=True, kind="outbound", org_id=grant.org_id,
                first_reply="held: over the outbound rate limit" if over else ""))
        try:
            await self._store(entries, held=bool(over))
        except Exception as exc:  # noqa: BLE001 - any storage failure: the sender keeps the message
            log.error("outbound spool write failed; the sender is told to retry", txn=tx.txn_id,
                      error=repr(exc)[:300])
            self._results(tx, rcpts, STORE_FAILED, "deferred")
            return STORE_FAILED
        if over:
            reply = Reply(250, "2.0.0", f"Ok: accepted as {tx.txn_id} (held: over the outbound rate limit)")
            for c in over:
                log.warning("outbound rate limit exceeded; message held", txn=tx.txn_id, org=grant.org,
                            scope=c.scope, count=c.count, limit=c.limit)
                if c.first_over and self.on_rate_exceeded is not None:
                    self.on_rate_exceeded(org_id=grant.org_id, org=grant.org, scope=c.scope, limit=c.limit,
                                          window=self.settings.relay.rate_window, txn_id=tx.txn_id,
                                          sender=tx.mail_from)
            self._results(tx, rcpts, reply, HELD)
        else:
            reply = Reply(250, "2.0.0", f"Ok: queued as {tx.txn_id} (relayed)")
            self._results(tx, rcpts, reply, "spooled")
        log.info("outbound message accepted", txn=tx.txn_id, org=grant.org, via=grant.method,
                 sender=tx.mail_from or "<>", domains=sorted(by_domain), held=bool(over),
                 ms=round((time.perf_counter() - started) * 1000, 1))
        return reply

    async def _filter(self, tx, content: bytes, rcpts: list[str]) -> Reply | None:
        """The refusal the filters call for, or ``None`` when the message may go."""
        if self.filters is None:
            return None
        started = time.perf_counter()
        envelope = Envelope(client_ip=tx.client.ip, helo=tx.client.helo, mail_from=tx.mail_from, rcpts=rcpts,
                            txn_id=tx.txn_id)
        verdict = await self.filters.scan(content, envelope, check_sender=False)
        tx.verdict = verdict
        disposition = decide(verdict, self.policy_for(tx.mail_from))
        tx.filter_ms = (time.perf_counter() - started) * 1000
        tx.outbound_verdict = {"action": disposition.action, "category": disposition.category,
                               "reason": disposition.reason, "direction": "outbound", **verdict.as_dict()}
        if disposition.delivers:
            return None
        if disposition.action == "defer":
            log.warning("outbound message deferred: not fully scanned", txn=tx.txn_id, reason=disposition.reason)
            return DEFERRED
        code = VIRUS_REFUSED if disposition.category == "virus" else 550
        reply = Reply(code, "5.7.1", f"Message refused ({disposition.reason}); id {tx.txn_id}")
        log.info("outbound message refused by the filters", txn=tx.txn_id, reply=reply.one_line())
        return reply

    async def _store(self, entries: list[queue.NewSpoolEntry], *, held: bool) -> None:
        """Commit the entries (status ``held`` when over a limit); returns only when they are durable."""
        async with self.store.session() as session:
            rows = queue.add_entries(session, entries, self.keyring.get(), self.settings.spool)
            if held:
                for row in rows:
                    row.status = HELD
            else:
                now = rows[0].created_at if rows else None
                for row in rows:
                    row.next_attempt_at = now  # due at once: the worker's MX delivery starts now
            await session.commit()

    @staticmethod
    def _results(tx, rcpts: list[str], reply: Reply, disposition: str) -> None:
        for rcpt in rcpts:
            tx.results.append(RecipientResult(rcpt, reply.code, reply.enhanced, reply.text, disposition,
                                              f"mx:{recipient_domain(rcpt)}"))
