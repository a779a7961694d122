"""``mxguard spool list|show|retry|delete|stats`` and ``mxguard keys rotate``."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.markup import escape
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, settings
from mxguard.services import spool as spool_service
from mxguard.services.access import Actor
from mxguard.spool import queue
from mxguard.storage.db import Store

spool_app = typer.Typer(help="Mail held while a downstream route was unreachable.", no_args_is_help=True)
keys_app = typer.Typer(help="Sealing keys (AES-256-GCM) for spooled and quarantined mail.", no_args_is_help=True)


async def _with(func):
    s = settings()
    store = Store(s.effective_database_url)
    try:
        await store.migrate()
        return await func(store, s)
    finally:
        await store.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@spool_app.command("list")
@handle_errors
def list_(domain: str = typer.Option(None, "--domain", show_default=False, help="Only this domain"),
          all_: bool = typer.Option(False, "--all", help="Also delivered, failed and expired entries"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Held messages: id, transaction ID (the sender's "queued as"), age, domain, sender, pending recipients,
    attempts, next attempt, last reply."""
    rows = run(_with(lambda store, s: spool_service.list_entries(store, Actor.cli(), domain=domain,
                                                                 status=None if all_ else "queued")))
    if as_json:
        typer.echo(json.dumps([{
            "id": r.id, "kind": r.kind, "txn_id": r.txn_id, "domain": r.domain, "mail_from": r.mail_from,
            "recipients": [asdict(x) for x in r.recipients], "size": r.size, "status": r.status,
            "attempts": r.attempts, "created_at": r.created_at.isoformat(),
            "next_attempt_at": r.next_attempt_at.isoformat(), "last_reply": r.last_reply} for r in rows], indent=2))
        return
    table = Table(title=f"Spool ({len(rows)} {'entries' if all_ else 'held'})")
    for col in ("id", "transaction", "created", "kind", "domain", "from", "pending", "size", "tries", "next attempt",
                "status", "last reply"):
        # IDs whole on one line, to be copied into the commands that take them.
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "transaction"))
    for r in rows:
        table.add_row(str(r.id), r.txn_id, f"{r.created_at:%Y-%m-%d %H:%M:%S}", r.kind, r.domain, r.mail_from or "<>",
                      "\n".join(r.pending), str(r.size), str(r.attempts), f"{r.next_attempt_at:%H:%M:%S}", r.status,
                      r.last_reply[:80])
    console.print(table)


_ID_HELP = "Spool ID (mxguard spool list), or the transaction ID the sender was given (queued as ...)"


async def _entry_id(store, ref: str) -> int:
    return await spool_service.resolve_entry_id(store, Actor.cli(), ref)


@spool_app.command("show")
@handle_errors
def show(ref: str = typer.Argument(..., show_default=False, metavar="ID", help=_ID_HELP)) -> None:
    """One held message and every delivery attempt (time, server, TLS, reply)."""
    async def go(store, s):
        return await spool_service.get_entry(store, Actor.cli(), await _entry_id(store, ref))

    entry, attempts = run(_with(go))
    for key in ("id", "kind", "txn_id", "status", "domain", "mail_from", "subject", "size", "attempts",
                "created_at", "next_attempt_at", "expires_at", "key_id"):
        console.print(f"[bold]{key:>16}[/bold]  {escape(str(getattr(entry, key)))}", highlight=False)
    for r in entry.recipients:
        console.print(f"[bold]{'recipient':>16}[/bold]  {escape(f'{r.rcpt}  {r.status}  {r.reply}')}",
                      highlight=False)
    table = Table(title="Attempts")
    for col in ("time", "node", "server", "TLS", "reply"):
        table.add_column(col, overflow="fold")
    for a in attempts:
        tls = f"{a.tls_version} {a.cipher}{' verified' if a.verified else ''}" if a.tls else "none"
        table.add_row(f"{a.ts:%Y-%m-%d %H:%M:%S}", a.node, a.server or "-", tls, a.reply)
    console.print(table)


@spool_app.command("retry")
@handle_errors
def retry(ref: str = typer.Argument(None, show_default=False, metavar="[ID]", help=_ID_HELP),
          domain: str = typer.Option(None, "--domain", show_default=False, help="Every held message of this domain")) -> None:
    """Deliver held messages now (one, a domain's, or with no argument every held message)."""
    async def go(store, s):
        entry_id = await _entry_id(store, ref) if ref is not None else None
        return await spool_service.retry(store, s, Actor.cli(), entry_id=entry_id, domain=domain)

    done = run(_with(go))
    if not done:
        console.print("Nothing to retry: no message is held.")
    for outcome in done:
        e = outcome.entry
        if e is None:
            console.print(f"#{outcome.id} was deleted meanwhile", highlight=False)
        elif not outcome.attempted:
            console.print(f"#{e.id} is being delivered by a running gateway; it is due now", highlight=False)
        else:
            state = "still held" if e.status == "queued" else e.status
            console.print(f"#{e.id} {state}: {e.last_reply}", highlight=False)


@spool_app.command("delete")
@handle_errors
def delete(ref: str = typer.Argument(..., show_default=False, metavar="ID", help=_ID_HELP)) -> None:
    """Remove a held message for good (it is never delivered; no DSN is sent)."""
    async def go(store, s):
        return await spool_service.delete_entry(store, Actor.cli(), await _entry_id(store, ref))

    entry = run(_with(go))
    console.print(f"Deleted spool entry #{entry.id} ({entry.mail_from or '<>'} → {entry.domain})", highlight=False)


@spool_app.command("stats")
@handle_errors
def stats(as_json: bool = typer.Option(False, "--json")) -> None:
    """Held messages by domain (count, bytes, oldest), entries by status, the oldest held message's age."""
    data = run(_with(lambda store, s: spool_service.stats(store, Actor.cli())))
    if as_json:
        typer.echo(json.dumps(asdict(data), indent=2))
        return
    console.print(f"held: {data.held}   by status: {data.by_status}", highlight=False)
    if data.by_status.get("held"):
        # Status "held" is outbound mail over a rate limit: never retried, released by hand.
        console.print(f"over the outbound rate limit, waiting for release: {data.by_status['held']} "
                      "(mxguard relay held; mxguard relay release ID)", highlight=False)
    if data.oldest_age_seconds is not None:
        console.print(f"oldest held message: {data.oldest_age_seconds / 60:.1f} minutes", highlight=False)
    table = Table(title="Held by domain")
    for col in ("domain", "messages", "bytes", "oldest"):
        table.add_column(col)
    for d in data.by_domain:
        table.add_row(d.domain, str(d.messages), str(d.bytes), _age(d.oldest_age_seconds))
    console.print(table)


@keys_app.command("rotate")
@handle_errors
def rotate() -> None:
    """Add a new current sealing key and re-seal held mail with it (old keys stay readable)."""
    from mxguard.services import dkim_keys
    from mxguard.services.sni_certificates import reseal_keys
    from mxguard.storage.sealing import Sealer, append_key

    async def go(store, s):
        path = s.path(s.sealing_key_file)
        key_id = append_key(path)
        sealer = Sealer.from_file(path)
        count = await queue.reseal_all(store, sealer)
        return key_id, count, await reseal_keys(store, sealer), await dkim_keys.reseal_keys(store, sealer)

    key_id, count, sni_keys, dkim = run(_with(go))
    console.print(f"New sealing key {key_id}; re-sealed {count} spool entries, {sni_keys} SNI certificate keys "
                  f"and {dkim} DKIM keys. Running gateways pick the key up on their next seal.", highlight=False)
