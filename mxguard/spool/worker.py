"""The spool worker: delivers held mail when its route is back, with back-off, leases and DSNs.

Every attempt uses the domain's *current* downstream TLS policy (a spool never
downgrades TLS: a ``required`` route whose server comes back without STARTTLS
keeps the message held). At most ``route_concurrency`` deliveries run per route
at a time, so a server that comes back is not flooded.

Outbound entries (``kind="outbound"``, written by the relay) go to the destination
domain's MX hosts (:mod:`mxguard.relay.mx`) under the destination's TLS policy
(:mod:`mxguard.relay.destinations`: the internet default or the operator's override),
DKIM-signed when the sender's domain has a key; their connections are kept in a pool and
reused for the next entry to the same destination (``RSET`` first).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import defaultdict

import dkim
import structlog

from mxguard.config import Settings
from mxguard.dkim_signing import KeyFileError
from mxguard.relay.destinations import DestinationTls, destination_route, matching_override
from mxguard.relay.dkim import from_header_domain, sign_outbound
from mxguard.relay.mx import MxFailure, resolve_mx
from mxguard.services.destination_tls import all_overrides
from mxguard.services.dkim_keys import signer_for, signing_domain
from mxguard.smtp.delivery import (DownstreamConnection, DownstreamLost, RouteFailure, attempt_item, deliver_once,
                                   send_transaction)
from mxguard.smtp.pool import ConnectionPool
from mxguard.smtp.replies import Reply
from mxguard.smtp.routing import DomainDirectory, Route, external_route, route_for_message
from mxguard.spool import queue
from mxguard.spool.dsn import FailedRecipient, build_dsn
from mxguard.storage.db import SQLAlchemyError, Store
from mxguard.storage.messagelog import LogRecord, MessageLogWriter
from mxguard.storage.models import SPOOL_SESSIONS_KEY, SpoolAttempt, SpoolEntry, utcnow
from mxguard.storage.sealing import KeyRing, SealingError

log = structlog.get_logger("mxguard.spool")

#: Enhanced codes of an outbound destination without a mail server (null MX, RFC 7505; no such
#: domain; no address): the DSN says so instead of "refused".
NO_ROUTE_STATUSES = ("5.1.10", "5.1.2", "5.4.4")


class SpoolWorker:
    """Claims due spool entries and delivers them.

    Args:
        store: the database.
        settings: bootstrap settings (spool, dsn, downstream, hostname).
        directory: served domains and routes (current policy for every attempt).
        keyring: sealing keys.
        message_log: where completion records go (optional).
        resolver_nameservers: ``["127.0.0.1:5353", ...]`` for DSN MX lookups; system resolver when empty.
    """

    def __init__(self, store: Store, settings: Settings, directory: DomainDirectory, keyring: KeyRing,
                 message_log: MessageLogWriter | None = None, resolver_nameservers: list[str] | None = None):
        self.store = store
        self.settings = settings
        self.directory = directory
        self.keyring = keyring
        self.message_log = message_log
        self.owner = f"{settings.hostname}:{socket.gethostname()}:{os.getpid()}"
        self.route_limits: dict[Route | tuple[str, str], asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.spool.route_concurrency))
        self.resolver_nameservers = resolver_nameservers or []
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self.delivered = 0
        d = settings.downstream
        #: Open connections to internet destinations, reused across outbound entries.
        self.pool = ConnectionPool(d.pool_max_idle, d.pool_idle_timeout, d.pool_max_age)
        self._overrides: list[DestinationTls] | None = None
        self._outbound_users: dict[tuple[str, str], int] = {}

    # -- the loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spool-worker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)
        await self.pool.close()

    async def _run(self) -> None:
        while True:
            full_batch = False
            try:
                claimed = await self.run_once()
                # A full batch means more may be due: go on at once instead of sleeping a poll
                # interval between batches (a backlog drains at delivery speed).
                full_batch = len(claimed) >= self.settings.spool.batch
            except (SQLAlchemyError, OSError) as exc:
                log.warning("spool worker cannot reach the database", error=str(exc).splitlines()[0][:200])
            await asyncio.sleep(0 if full_batch else self.settings.spool.poll_interval)

    async def run_once(self, ids: list[int] | None = None) -> list[SpoolEntry]:
        """Claim due entries (or the given ids) and deliver them; waits until they are done."""
        room = max(0, self.settings.spool.batch - len(self._inflight))
        if room == 0:
            return []
        entries = await queue.claim_due(self.store, self.owner, self.settings.spool, limit=room, ids=ids)
        self._overrides = None  # destination TLS overrides are read again for each batch
        tasks = []
        for entry in entries:
            task = asyncio.create_task(self._deliver_guarded(entry))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks)
        return entries

    async def _deliver_guarded(self, entry: SpoolEntry) -> None:
        try:
            await self.deliver(entry)
        except (SQLAlchemyError, OSError) as exc:
            # The lease runs out and the entry is tried again; nothing is lost.
            log.warning("spool attempt not recorded", id=entry.id, error=str(exc).splitlines()[0][:200])
        except SealingError as exc:
            log.error("spool entry cannot be opened", id=entry.id, error=str(exc))

    # -- one entry ---------------------------------------------------------------------

    async def deliver(self, entry: SpoolEntry) -> SpoolEntry:
        """One attempt for every pending recipient of ``entry``; records the outcome.

        Raises:
            SealingError: the body cannot be opened with the key file.
            SQLAlchemyError: the outcome could not be recorded.
        """
        message = self.keyring.get().open(entry.body, queue.seal_context(entry.txn_id))
        pending = [r for r in entry.recipients if r["status"] == "pending"]
        groups = await self._routes_for(entry, [r["rcpt"] for r in pending])
        attempt = SpoolAttempt(node=self.settings.hostname, results={})
        sessions: list[dict] = []
        replies: list[str] = []
        newly_failed: list[FailedRecipient] = []
        # The DSN quotes the message as it was accepted; what leaves is signed.
        outgoing = await self._signed(entry, message) if entry.kind == "outbound" else message
        for route, rcpts in groups.items():
            if route is None:
                reply = Reply(550, "5.1.2", "Domain no longer served by this gateway")
                results = {r: reply for r in rcpts}
            elif isinstance(route, Reply):  # no MX host to try (null MX, no such domain, DNS failure)
                results = {r: route for r in rcpts}
            elif entry.kind == "outbound":
                results = await self._attempt_outbound(entry, route, rcpts, outgoing, attempt, sessions)
            else:
                results = await self._attempt(entry, route, rcpts, message, attempt, sessions)
            for rcpt, reply in results.items():
                state = next(r for r in entry.recipients if r["rcpt"] == rcpt)
                state["reply"] = reply.one_line()
                attempt.results[rcpt] = reply.code
                if reply.is_positive:
                    state["status"] = "delivered"
                elif reply.is_permanent:
                    state["status"] = "failed"
                    newly_failed.append(FailedRecipient(rcpt, reply.enhanced, reply.one_line(), attempt.server))
                replies.append(f"{rcpt}: {reply.one_line()}")
        attempt.reply = "; ".join(replies)[:4000]
        if sessions:
            attempt.results[SPOOL_SESSIONS_KEY] = sessions  # counted by TLS-RPT (mxguard.tls.reporting)
        before = entry.status
        entry.recipients = [dict(r) for r in entry.recipients]
        await queue.record_attempt(self.store, entry, attempt, self.settings.spool)
        if entry.status == "expired":
            newly_failed += [FailedRecipient(r["rcpt"], "4.4.7", r["reply"] or "Delivery time expired", attempt.server)
                             for r in entry.recipients if r["status"] == "pending"]
        log.info("spool attempt", id=entry.id, txn=entry.txn_id, kind=entry.kind, status=entry.status,
                 attempts=entry.attempts, reply=attempt.reply[:300])
        if entry.status != before and entry.status != "queued":
            self._log_completion(entry, attempt)
        if newly_failed:
            await self._notify_sender(entry, message, newly_failed)
        self.delivered += sum(1 for r in entry.recipients if r["status"] == "delivered")
        return entry

    async def _attempt(self, entry: SpoolEntry, route: Route, rcpts: list[str], message: bytes,
                       attempt: SpoolAttempt, sessions: list[dict]) -> dict[str, Reply]:
        # The served domain whose TLS-RPT report counts this session (as in-line: the route's first
        # recipient's); a DSN goes to a domain we do not serve and is in nobody's report.
        found = self.directory.lookup(rcpts[0]) if entry.kind != "dsn" else None
        policy_domain = found[0].name if found else None
        async with self.route_limits[route]:
            try:
                info, results = await deliver_once(
                    route_for_message(route, message, requiretls=entry.requiretls), self.settings.downstream,
                    self.settings.hostname, entry.mail_from, rcpts, message,
                    body="8BITMIME" if entry.body_8bit else None, smtputf8=entry.smtputf8,
                    requiretls=entry.requiretls)
            except RouteFailure as failure:
                attempt.server = "; ".join(failure.attempts)[:300]
                sessions.append({"route": route.describe(), **attempt_item(policy_domain, None, failure)})
                return {r: failure.reply for r in rcpts}
            except DownstreamLost as exc:
                return {r: Reply(451, "4.4.2", f"Connection lost: {exc}") for r in rcpts}
        sessions.append({"route": route.describe(), **attempt_item(policy_domain, info, None)})
        attempt.server = f"{info.host}:{info.port}"
        attempt.tls, attempt.tls_version, attempt.cipher, attempt.verified = (
            info.tls, info.tls_version, info.cipher, info.verified)
        return results

    async def _attempt_outbound(self, entry: SpoolEntry, route: Route, rcpts: list[str], message: bytes,
                                attempt: SpoolAttempt, sessions: list[dict]) -> dict[str, Reply]:
        """One attempt to an internet destination on a pooled connection (``RSET`` before reuse).

        TLS-RPT counts the session under the destination domain (reports go only where it
        publishes ``_smtp._tls``, see :mod:`mxguard.tls.reporting`).
        """
        route = route_for_message(route, message, requiretls=entry.requiretls)
        policy_domain = entry.domain
        # At most route_concurrency deliveries per destination; the semaphore lives while in use
        # (destinations are many: none is kept for ever).
        key = ("outbound", entry.domain)
        self._outbound_users[key] = self._outbound_users.get(key, 0) + 1
        try:
            return await self._attempt_outbound_limited(entry, route, rcpts, message, attempt, sessions,
                                                        self.route_limits[key], policy_domain)
        finally:
            self._outbound_users[key] -= 1
            if not self._outbound_users[key]:
                del self._outbound_users[key]
                self.route_limits.pop(key, None)

    async def _attempt_outbound_limited(self, entry: SpoolEntry, route: Route, rcpts: list[str], message: bytes,
                                        attempt: SpoolAttempt, sessions: list[dict], limit: asyncio.Semaphore,
                                        policy_domain: str) -> dict[str, Reply]:
        async with limit:
            # A parked connection is used when its RSET is answered; one the server dropped
            # meanwhile fails the RSET and a fresh one is opened instead.
            conn = self.pool.acquire(route)
            reused = conn is not None and await conn.reset()
            if conn is not None and not reused:
                await conn.close()
            if not reused:
                conn = DownstreamConnection(route, self.settings.downstream, self.settings.hostname)
                try:
                    await conn.open()
                except RouteFailure as failure:
                    attempt.server = "; ".join(failure.attempts)[:300]
                    sessions.append({"route": route.describe(), **attempt_item(policy_domain, None, failure)})
                    return {r: failure.reply for r in rcpts}
            try:
                results = await send_transaction(
                    conn, entry.mail_from, rcpts, message, body="8BITMIME" if entry.body_8bit else None,
                    smtputf8=entry.smtputf8, requiretls=entry.requiretls)
            except DownstreamLost as exc:
                await conn.close()
                return {r: Reply(451, "4.4.2", f"Connection lost: {exc}") for r in rcpts}
        info = conn.info
        self.pool.release(conn)
        sessions.append({"route": route.describe(), "reused": reused, **attempt_item(policy_domain, info, None)})
        attempt.server = f"{info.host}:{info.port}"
        attempt.tls, attempt.tls_version, attempt.cipher, attempt.verified = (
            info.tls, info.tls_version, info.cipher, info.verified)
        return results

    async def _signed(self, entry: SpoolEntry, message: bytes) -> bytes:
        """The message DKIM-signed with the active key of the ``From`` domain (when it is the
        sender's organization's) or of the envelope sender's domain, if it has one (else as it is)."""
        domain = entry.mail_from.rpartition("@")[2].lower()
        if not domain:
            return message
        try:
            domain = await signing_domain(self.store, domain, from_header_domain(message))
            signer = await signer_for(self.store, self.keyring.get(), domain)
            return sign_outbound(message, signer) if signer is not None else message
        except (SealingError, KeyFileError, dkim.DKIMException) as exc:
            # Unsigned mail is still mail; the operator hears of the key.
            log.error("outbound message not DKIM-signed", id=entry.id, domain=domain, error=str(exc)[:200])
            return message

    async def outbound_route(self, domain: str) -> Route | Reply:
        """The route to an internet destination (its MX hosts under its TLS policy), or the
        reply that says why there is none (``556 5.1.10`` null MX, ``550 5.1.2`` no such
        domain, ``451 4.4.3`` DNS failure; see :func:`mxguard.relay.mx.resolve_mx`)."""
        d = self.settings.downstream
        if self._overrides is None:
            self._overrides = await all_overrides(self.store)
        try:
            mx = await resolve_mx(domain, dns_servers=d.dns_servers, timeout=d.dns_timeout,
                                  max_hosts=d.outbound_max_mx, max_addresses=d.outbound_max_addresses)
        except MxFailure as failure:
            log.info("no MX host for the destination", domain=domain, reply=failure.reply.one_line())
            return failure.reply
        return destination_route(mx, matching_override(domain, self._overrides), port=d.outbound_port,
                                 ca_file=d.outbound_ca_file and str(self.settings.path(d.outbound_ca_file)) or None)

    async def _routes_for(self, entry: SpoolEntry, rcpts: list[str]) -> dict[Route | Reply | None, list[str]]:
        if entry.kind == "dsn":
            # A DSN to a served domain's sender (outbound mail that failed) takes that domain's
            # route to its own server, not its MX (which is this gateway).
            found = self.directory.lookup(rcpts[0]) if rcpts else None
            route = found[1] if found else (await self.dsn_route(rcpts[0].rpartition("@")[2]) if rcpts else None)
            return {route: rcpts}
        if entry.kind == "outbound":
            by_domain: dict[str, Route | Reply] = {}
            groups_out: dict[Route | Reply | None, list[str]] = defaultdict(list)
            for rcpt in rcpts:
                domain = rcpt.rpartition("@")[2].lower()
                if domain not in by_domain:
                    by_domain[domain] = await self.outbound_route(domain)
                groups_out[by_domain[domain]].append(rcpt)
            return groups_out
        groups: dict[Route | None, list[str]] = defaultdict(list)
        for rcpt in rcpts:
            found = self.directory.lookup(rcpt)
            groups[found[1] if found else None].append(rcpt)
        return groups

    async def dsn_route(self, domain: str) -> Route | None:
        """Where a DSN to ``domain`` goes: the configured relay, else the domain's MX hosts (RFC 5321 5.1).

        TLS is opportunistic: a DSN is never held back for want of TLS. ``None``
        when the domain has a null MX (RFC 7505) or does not exist.
        """
        return await external_route(domain, relay=self.settings.dsn.relay, nameservers=self.resolver_nameservers)

    # -- DSN and log -------------------------------------------------------------------

    async def _notify_sender(self, entry: SpoolEntry, message: bytes, failed: list[FailedRecipient]) -> None:
        if entry.kind == "dsn":
            log.warning("DSN could not be delivered; dropped (never bounce a bounce)", id=entry.id)
            return
        if not entry.mail_from:
            return  # null reverse-path: nobody to tell (RFC 5321 4.5.5)
        # An outbound sender is the organization's own, admitted by the relay: it hears of failures.
        if not self.settings.dsn.enabled or not (entry.sender_aligned or entry.kind == "outbound"):
            # The message is undeliverable and its sender will not hear of it: an operator should.
            log.warning("undeliverable and no DSN sent: sender not authenticated (SPF/DKIM alignment) or "
                        "DSNs disabled", id=entry.id, txn=entry.txn_id, sender=entry.mail_from,
                        recipients=[f.rcpt for f in failed])
            return
        expired = any(f.status == "4.4.7" for f in failed)
        no_route = all(f.status in NO_ROUTE_STATUSES for f in failed)
        reason = ("It stayed undeliverable for the maximum holding time." if expired
                  else "The recipient's domain does not exist or accepts no mail." if no_route
                  else "The recipient's server refused it.")
        dsn = build_dsn(reporting_host=self.settings.hostname, original_sender=entry.mail_from,
                        original_message=message, recipients=failed, arrival=entry.created_at,
                        txn_id=entry.txn_id, reason=reason)
        await queue.enqueue(self.store, [queue.NewSpoolEntry(
            txn_id=entry.txn_id, domain=entry.mail_from.rpartition("@")[2].lower(), mail_from="",
            recipients=[entry.mail_from], message=dsn, subject="Undelivered Mail Returned to Sender",
            kind="dsn", due_now=True)], self.keyring.get(), self.settings.spool)
        log.info("DSN queued", id=entry.id, to=entry.mail_from, recipients=[f.rcpt for f in failed])

    def _log_completion(self, entry: SpoolEntry, attempt: SpoolAttempt) -> None:
        if self.message_log is None:
            return
        disposition = {"delivered": "delivered", "failed": "rejected", "expired": "expired"}.get(
            entry.status, entry.status)
        outbound = entry.kind == "outbound"
        hop = ""
        if outbound and attempt.server:
            # The outbound hop in one phrase: which MX host, with which TLS (the console's search
            # finds it; the TLS columns below carry the same facts field by field).
            tls = (f"{attempt.tls_version or 'TLS'} {attempt.cipher or ''}".strip()
                   + (", certificate verified" if attempt.verified else ", certificate not verified")
                   if attempt.tls else "no TLS")
            hop = f" via {attempt.server} ({tls})"
        self.message_log.submit(LogRecord(
            txn_id=entry.txn_id, ts=utcnow(), node=self.settings.hostname, client_ip="spool",
            mail_from=entry.mail_from, rcpt_to=" ".join(r["rcpt"] for r in entry.recipients), size=entry.size,
            subject=entry.subject, downstream_host=attempt.server, downstream_tls=attempt.tls,
            downstream_tls_version=attempt.tls_version, downstream_cipher=attempt.cipher,
            downstream_verified=attempt.verified,
            results=[{"rcpt": r["rcpt"], "code": int(r["reply"][:3]) if r["reply"][:3].isdigit() else 0,
                      "enhanced": "", "text": r["reply"], "disposition": r["status"],
                      "route": f"mx:{r['rcpt'].rpartition('@')[2].lower()}" if outbound else None}
                     for r in entry.recipients],
            disposition=disposition, final_reply=f"spool {entry.kind} #{entry.id}: {entry.status} after "
                                                 f"{entry.attempts} attempt(s){hop}",
            # Mail an organization relays to the internet is outbound in the log (the console's and
            # the API's direction filter); everything else the spool delivers goes to a served
            # domain's own server or back to a sender (a DSN): inbound.
            direction="outbound" if outbound else "inbound"))

