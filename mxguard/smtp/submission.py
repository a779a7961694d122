"""The front door's relay checks at AUTH and MAIL (RFC 4954 SMTP AUTH, RFC 6409 submission).

Who may relay is decided by :mod:`mxguard.relay.access` (given to the proxy
context as ``relay``); this module holds the replies and the MAIL-time rule:

* on a **submission listener** (``smtp.submission_listen``) a session that is not
  authorized (no AUTH, no registered client certificate or network) may not send
  MAIL: ``530 5.7.0 Authentication required`` (RFC 4954 section 6);
* a session authorized by **AUTH or a client certificate** must use an envelope
  sender in its organization's domains: ``550 5.7.1`` (RFC 3463: delivery not
  authorized). A session authorized only by its **source network** on port 25
  may still deliver inbound mail from anyone to the served domains; its sender
  is checked at RCPT, for the recipients it wants relayed.
"""

from __future__ import annotations

import structlog

from mxguard.smtp.replies import Reply


def sender_not_organizations(sender: str, org: str) -> Reply:
    """``550 5.7.1`` for a relaying session whose envelope sender is not in its organization's domains."""
    domain = sender.rpartition("@")[2] or sender
    return Reply(550, "5.7.1", f"Sender domain {domain} is not one of {org}'s domains; relaying refused")

log = structlog.get_logger("mxguard.inbound")

#: RFC 4954 section 6: the server requires authentication before this command.
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required: this is a submission port; use AUTH after "
                                    "STARTTLS (or a registered client certificate)")
#: RFC 4954 section 6: the mechanism needs an encrypted session (PLAIN and LOGIN send the password).
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism: "
                                           "use STARTTLS first")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
#: After ``relay.max_auth_failures`` failed AUTH attempts on one connection (RFC 5321 3.8: 421 before closing).
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts; closing connection")


def refusal_at_mail(server, client, sender: str) -> Reply | None:
    """The refusal of a MAIL command under the relay rules above, or ``None``.

    Args:
        server: the :class:`~mxguard.smtp.inbound.InboundSMTP` session (``submission_port``,
            ``proxy.ctx.relay``, ``proxy.ctx.on_relay_refusal``).
        client: its :class:`~mxguard.smtp.proxy.ClientInfo`, ``relay`` already set.
        sender: the envelope sender (``""`` for ``<>``).
    """
    grant = client.relay
    ctx = server.proxy.ctx
    if server.submission_port and grant is None:
        log.warning("MAIL refused on the submission port: not authenticated", client=client.ip,
                    sender=sender or "<>", tls=client.tls_version or "none")
        _count(ctx, "auth_required")
        return AUTH_REQUIRED
    if grant is None or ctx.relay is None:
        return None
    if grant.method == "network" and not server.submission_port:
        return None  # checked at RCPT, for relayed recipients only
    if sender and not ctx.relay.sender_allowed(grant, sender):
        log.warning("relay refused: sender domain is not the organization's", client=client.ip,
                    sender=sender, org=grant.org, via=grant.method)
        _count(ctx, "sender_domain")
        return sender_not_organizations(sender, grant.org)
    return None


def _count(ctx, reason: str) -> None:
    if ctx.on_relay_refusal is not None:
        ctx.on_relay_refusal(reason)
