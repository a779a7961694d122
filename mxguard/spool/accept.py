"""The proxy's side of the spool: store held mail durably before the sender hears 250."""

from __future__ import annotations

import structlog

from mxguard.config import Settings
from mxguard.smtp.proxy import Transaction, sender_aligned
from mxguard.smtp.replies import Reply
from mxguard.spool import queue
from mxguard.spool.dsn import FailedRecipient, build_dsn
from mxguard.storage.db import Store
from mxguard.storage.sealing import KeyRing

log = structlog.get_logger("mxguard.spool")


class StoreSpooler:
    """Writes spool entries (and DSNs) in one database transaction.

    Args:
        store: the database (SQLite WAL + ``synchronous=FULL``, or PostgreSQL).
        keyring: sealing keys.
        settings: bootstrap settings (spool timing, DSN switch, hostname).
    """

    def __init__(self, store: Store, keyring: KeyRing, settings: Settings):
        self.store = store
        self.keyring = keyring
        self.settings = settings
        self.held = 0

    def entry(self, **fields) -> queue.NewSpoolEntry:
        """A spool entry from the proxy's fields (see :class:`mxguard.spool.queue.NewSpoolEntry`)."""
        return queue.NewSpoolEntry(**fields)

    async def hold(self, entries: list[queue.NewSpoolEntry]) -> None:
        """Commit the entries; returns only when they are durable.

        Raises:
            SQLAlchemyError, OSError: nothing was stored.
        """
        await queue.enqueue(self.store, entries, self.keyring.get(), self.settings.spool)
        self.held += len(entries)

    def dsn(self, tx: Transaction, failed: list[tuple[str, Reply, str | None]],
            message: bytes) -> queue.NewSpoolEntry | None:
        """A DSN for recipients refused with 5xx after others were accepted.

        ``None`` when DSNs are off, the sender is the null reverse-path, or it
        did not pass SPF or DKIM alignment (no backscatter to forged senders).
        """
        if not self.settings.dsn.enabled or not tx.mail_from or not sender_aligned(tx):
            if tx.mail_from:
                log.warning("refused after DATA and no DSN sent: sender not authenticated (SPF/DKIM alignment) "
                            "or DSNs disabled", txn=tx.txn_id, sender=tx.mail_from,
                            recipients=[rcpt for rcpt, _, _ in failed])
            return None
        body = build_dsn(
            reporting_host=self.settings.hostname, original_sender=tx.mail_from, original_message=message,
            recipients=[FailedRecipient(rcpt, reply.enhanced, reply.one_line(), host) for rcpt, reply, host in failed],
            arrival=tx.started_wall, txn_id=tx.txn_id, reason="The recipient's server refused it.")
        return queue.NewSpoolEntry(txn_id=tx.txn_id, domain=tx.mail_from.rpartition("@")[2].lower(), mail_from="",
                                   recipients=[tx.mail_from], message=body,
                                   subject="Undelivered Mail Returned to Sender", kind="dsn", due_now=True)
