"""Delivery status notifications (RFC 3464, ``multipart/report``, RFC 6522).

A DSN tells the envelope sender that some recipients of a message we accepted
will never receive it (a downstream ``5xx`` on a retry, or expiry in the spool).
It goes out with the null reverse-path (RFC 5321 section 4.5.5) and only to a
sender that passed SPF or DKIM alignment, so forged senders get no backscatter.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mxguard.smtp.headers import header_block_end


@dataclass
class FailedRecipient:
    """One recipient the DSN reports.

    Attributes:
        rcpt: the envelope recipient.
        status: enhanced status code, e.g. ``"5.1.1"`` or ``"4.4.7"`` (expired).
        diagnostic: the remote server's reply, e.g. ``"550 5.1.1 User unknown"``.
        remote_mta: the downstream server that answered, if any.
    """

    rcpt: str
    status: str
    diagnostic: str = ""
    remote_mta: str | None = None


def build_dsn(*, reporting_host: str, original_sender: str, original_message: bytes, recipients: list[FailedRecipient],
              arrival: dt.datetime, txn_id: str, reason: str) -> bytes:
    """Build the DSN message bytes.

    Args:
        reporting_host: the gateway's host name (``Reporting-MTA: dns; ...``).
        original_sender: the envelope sender of the failed message (the DSN's recipient).
        original_message: the failed message; only its header block is returned
            (``text/rfc822-headers``), never the body.
        recipients: the failed recipients, each with its status and diagnostic.
        arrival: when the message arrived (``Arrival-Date``).
        txn_id: our transaction id (``X-MXGuard-Txn`` in the DSN headers, for support).
        reason: one human sentence on why, for the first part.

    Returns:
        RFC 5322 bytes with CRLF line ends.
    """
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_host}>"
    msg["To"] = original_sender
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain=reporting_host)
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answer this automatically
    msg["X-MXGuard-Txn"] = txn_id
    lines = [f"This is the mail gateway at {reporting_host}.", "",
             f"Your message could not be delivered to {len(recipients)} recipient(s). {reason}", ""]
    lines += [f"<{r.rcpt}>: {r.diagnostic or r.status}" for r in recipients]
    msg.set_content("\n".join(lines) + "\n")

    # message/delivery-status: blocks of header fields, one per message and one per recipient.
    per_message = Message(policy=SMTP)
    per_message["Reporting-MTA"] = f"dns; {reporting_host}"
    per_message["X-MXGuard-Txn"] = txn_id
    per_message["Arrival-Date"] = format_datetime(arrival)
    blocks = [per_message]
    for r in recipients:
        block = Message(policy=SMTP)
        block["Final-Recipient"] = f"rfc822; {r.rcpt}"
        block["Action"] = "failed"
        block["Status"] = r.status
        if r.remote_mta:
            block["Remote-MTA"] = f"dns; {r.remote_mta}"
        if r.diagnostic:
            block["Diagnostic-Code"] = f"smtp; {r.diagnostic}"
        blocks.append(block)
    status_part = MIMEPart(policy=SMTP)
    status_part["Content-Type"] = "message/delivery-status"
    status_part.set_payload(blocks)
    headers_part = MIMEPart(policy=SMTP)
    headers_part["Content-Type"] = "text/rfc822-headers"
    headers_part.set_payload(original_message[:header_block_end(original_message)].decode("ascii", "replace"))
    msg.make_mixed()
    msg.attach(status_part)
    msg.attach(headers_part)
    msg.replace_header("Content-Type", msg["Content-Type"].replace("multipart/mixed", "multipart/report"))
    msg.set_param("report-type", "delivery-status")
    return msg.as_bytes()
