"""The gateway's own TLS-RPT mailbox: ``tlsrpt@<served domain>`` (RFC 8460 5.3) is taken, never relayed.

The proxy asks :meth:`ReportInbox.takes` at RCPT; such a recipient is the
gateway's, so it cannot share a transaction with mail that goes downstream
(the later RCPT gets ``452 4.5.3`` and the client sends it in a new
transaction, RFC 5321 3.3 / 4.5.3.1.10). At the end of DATA :meth:`ingest`
reads the report part and stores it; the reply says what happened.
"""

from __future__ import annotations

import asyncio

import structlog

from mxguard.filtering.message import parse_message
from mxguard.filtering.sender_auth import SenderAuth
from mxguard.services.tls_reports import store_report
from mxguard.smtp.replies import Reply
from mxguard.storage.db import Store
from mxguard.tls.rpt_ingest import ReportRefused, report_from_message

log = structlog.get_logger("mxguard.tls.ingest")

#: A report address mixed with recipients that go downstream (or the other way round).
MIXED_WITH_REPORTS = Reply(452, "4.5.3", "TLS-RPT report addresses are the gateway's own: send this recipient "
                                         "in a separate transaction")
REPORT_RCPT_OK = Reply(250, "2.1.5", "Recipient ok: TLS-RPT reports for this domain are taken by the gateway "
                                     "(RFC 8460)")


def reply_for(refused: ReportRefused) -> Reply:
    """The SMTP reply for a refused report (the HTTP status says which)."""
    if refused.status == 409:
        # A copy already stored: 250, not 5xx. A 5xx after DATA makes the reporter's MTA
        # bounce the report to its own reporting address, which only adds noise; the report
        # is with us, so the sender is told so and is done.
        return Reply(250, "2.6.0", f"Already stored: {refused.reason}")
    if refused.status == 413:
        return Reply(552, "5.3.4", f"Report too large: {refused.reason}")
    if refused.status == 422:
        return Reply(550, "5.7.1", f"Not taken: {refused.reason}")
    if refused.status >= 500:
        return Reply(451, "4.3.0", f"Report not stored: {refused.reason}")
    return Reply(550, "5.6.0", f"Report refused: {refused.reason}")


class ReportInbox:
    """Recognises report addresses and stores what is mailed to them.

    Args:
        store: the database.
        local_part: the report address's local part (``[tls_reports] ingest_local_part``), lower case.
    """

    def __init__(self, store: Store, local_part: str, auth: SenderAuth | None = None):
        self.store = store
        self.local_part = local_part.lower()
        #: Checks the DKIM signature RFC 8460 5.3 asks reporters to add; ``None``: not checked.
        self.auth = auth

    async def dkim_result(self, content: bytes) -> str | None:
        """The report's DKIM result as kept with it: the first passing signature (``pass d=.. s=..``),
        else the first result, ``none`` when unsigned; ``None`` when not checked. An unsigned or
        failing report is still taken (signing is a SHOULD), and the result says so."""
        if self.auth is None:
            return None
        try:
            results = await self.auth.dkim(await asyncio.to_thread(parse_message, content), tlsrpt=True)
        except Exception as exc:  # noqa: BLE001 - dkimpy and the parser on hostile input: recorded, not fatal
            log.warning("DKIM check of a mailed TLS report failed", error=repr(exc)[:200])
            return "temperror"
        if not results:
            return "none"
        best = next((r for r in results if r["result"] == "pass"), results[0])
        return f"{best['result']} d={best['domain']} s={best['selector']}"

    def takes(self, address: str) -> bool:
        """True when ``address`` (whose domain is served) is the domain's report address."""
        local, _, _ = address.rpartition("@")
        return local.lower() == self.local_part

    async def ingest(self, content: bytes, txn_id: str) -> Reply:
        """Read the report part of a mailed message and store it.

        Args:
            content: the message as received (CRLF line ends).
            txn_id: the transaction, for the log.

        Returns:
            ``250 2.6.0`` stored (or stored already), ``550 5.6.0`` malformed or no report part,
            ``552 5.3.4`` too large, ``550 5.7.1`` about no served domain, ``451 4.3.0`` the
            database is unavailable (the reporter retries).
        """
        try:
            parsed = await asyncio.to_thread(report_from_message, content)  # up to 8 MiB of JSON: off the loop
            dkim = await self.dkim_result(content)
            stored = await store_report(self.store, parsed, "mail", dkim=dkim)
        except ReportRefused as refused:
            reply = reply_for(refused)
            log.info("mailed TLS report not stored", txn=txn_id, status=refused.status, reason=refused.reason[:200],
                     reply=reply.one_line())
            return reply
        log.info("mailed TLS report stored", txn=txn_id, domains=stored.domains, dkim=dkim)
        return Reply(250, "2.6.0", f"TLS report stored for {', '.join(stored.domains)}")
