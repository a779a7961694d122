"""``mxguard engines``, ``mxguard scan FILE`` and ``mxguard quarantine list|summary|purge|release|delete|signin-link``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, settings, state, with_store
from mxguard.config import load_settings
from mxguard.logsetup import configure_from_settings as configure_logging

quarantine_app = typer.Typer(help="Messages the filters held.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("engines")(engines)
    app.command("scan")(scan)
    app.add_typer(quarantine_app, name="quarantine")


def _settings_or_defaults():
    """The data dir's settings when it is initialised, else the defaults (``scan`` works anywhere)."""
    s = load_settings(state.data_dir, require_file=False)
    configure_logging(s)
    return s


@handle_errors
def engines(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Which filter engines are configured, whether they answer, and their versions (exit 1 if one does not)."""
    from mxguard.filtering.pipeline import FilterPipeline

    s = _settings_or_defaults()
    pipeline = FilterPipeline.from_settings(s)

    async def probe():
        try:
            return await pipeline.probe()
        finally:
            await pipeline.close()

    statuses = run(probe())
    if as_json:
        typer.echo(json.dumps([st.__dict__ for st in statuses], indent=2))
    else:
        table = Table(title="Filter engines" + ("" if s.filters.enabled else " (filtering is switched off)"))
        for col in ("engine", "kind", "address", "reachable", "version", "ms", "error"):
            table.add_column(col, overflow="fold")
        for st in statuses:
            table.add_row(st.name, st.kind, st.address, "yes" if st.reachable else "[red]NO[/red]", st.version,
                          f"{st.latency_ms:.1f}" if st.latency_ms is not None else "", st.error)
        console.print(table)
        if s.filters.sender_auth:
            servers = ", ".join(s.filters.dns_servers) or "the system resolver"
            console.print(f"Sender checks (SPF, DKIM, DMARC) ask {servers}.", highlight=False)
    if not all(st.reachable for st in statuses):
        raise typer.Exit(1)


@handle_errors
def scan(
    file: Path = typer.Argument(..., show_default=False, exists=True, dir_okay=False, help="A message file (RFC 5322, as received)"),
    as_json: bool = typer.Option(False, "--json", help="The verdict and disposition as JSON"),
    domain: str = typer.Option(None, "--domain", show_default=False, metavar="DOMAIN",
                               help="Decide with this served domain's settings (default: a new domain's defaults)"),
    client_ip: str = typer.Option("", "--client-ip", metavar="IP", help="Sending MTA's address (for SPF)"),
    helo: str = typer.Option("", "--helo", metavar="NAME", help="Its EHLO name"),
    sender: str = typer.Option("", "--sender", metavar="ADDRESS", help="Envelope sender (MAIL FROM)"),
    no_dns: bool = typer.Option(False, "--no-dns", help="Skip the SPF/DKIM/DMARC checks (no DNS queries)"),
) -> None:
    """Run the filter pipeline on one message file and print the verdict."""
    from mxguard.filtering.disposition import DomainFilterPolicy, decide
    from mxguard.filtering.message import Envelope
    from mxguard.filtering.pipeline import FilterPipeline

    s = _settings_or_defaults()
    if no_dns:
        s.filters.sender_auth = False
    raw = file.read_bytes()
    view = None
    if domain:
        from mxguard.services.domains import get_domain
        view = run(with_store(lambda store: get_domain(store, domain)))
    pipeline = FilterPipeline.from_settings(s)

    async def go():
        try:
            return await pipeline.scan(raw, Envelope(client_ip=client_ip, helo=helo, mail_from=sender,
                                                     txn_id="scan"))
        finally:
            await pipeline.close()

    verdict = run(go())
    disposition = decide(verdict, DomainFilterPolicy.of(view) if view else DomainFilterPolicy.defaults())
    if as_json:
        data = verdict.as_dict()
        data["disposition"] = {"action": disposition.action, "category": disposition.category,
                               "reason": disposition.reason,
                               "policy_hits": [h.__dict__ for h in disposition.policy_hits]}
        data["file"] = str(file)
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    console.print(verdict_table(verdict, file.name, list(disposition.policy_hits)))
    for f in verdict.findings[:10]:  # structural ambiguities, acted on or not (filters.ambiguous_structure)
        console.print(f"Ambiguous structure: {f['name']} in part {f['path']}: {f['detail']}", highlight=False,
                      markup=False)
    colour = {"deliver": "green", "tag": "yellow", "quarantine": "yellow", "reject": "red", "defer": "red"}
    console.print(f"Disposition: [{colour[disposition.action]}]{disposition.action}[/] ({disposition.reason})"
                  + (f" with the settings of {view.name}" if view else ""), highlight=False)


def verdict_table(verdict, title: str, policy_hits: list | None = None) -> Table:
    """One row per engine: what it found and how long it took.

    Args:
        policy_hits: the content-policy hits under a domain's rules (default: the structure hits only).
    """
    policy_hits = verdict.policy if policy_hits is None else policy_hits
    table = Table(title=f"Verdict for {title}")
    for col in ("engine", "result", "details", "ms"):
        table.add_column(col, overflow="fold")
    ms = verdict.timings_ms
    errors = {e.engine: e.reason for e in verdict.errors}
    for name in verdict.engines:
        if name in errors:
            table.add_row(name, "[red]error[/red]", errors[name], f"{ms.get(name, 0):.1f}")
            continue
        hits = [v for v in verdict.viruses if v.engine == name]
        junk = next((j for j in verdict.junk if j.engine == name), None)
        if hits:
            table.add_row(name, "[red]virus[/red]", ", ".join(f"{h.name}" + (f" in {h.part}" if h.part else "")
                                                              for h in hits), f"{ms.get(name, 0):.1f}")
        elif junk is not None:
            rules = ", ".join(f"{r}({s:g})" if s else r for r, s in sorted(junk.rules.items(), key=lambda x: -x[1]))
            result = f"{'junk' if junk.is_spam else 'ok'} {junk.score:g}/{junk.threshold:g}"
            table.add_row(name, result, (junk.action + "; " if junk.action else "") + rules, f"{ms.get(name, 0):.1f}")
        elif name == "policy":
            atts = ", ".join(f"{a['filename'] or a['path']} ({a['kind'] or a['detected'] or '?'}, {a['size']} B)"
                             for a in verdict.attachments) or "no attachments"
            acting = [h for h in policy_hits if h.action != "deliver"]
            hits = "; ".join(f"{h.rule} -> {h.action}: {h.detail}" for h in acting)
            table.add_row(name, f"[red]{acting[0].action}[/red]" if acting else "ok", (hits + "; " if hits else "") + atts,
                          f"{ms.get(name, 0):.1f}")
        else:
            table.add_row(name, "clean", "", f"{ms.get(name, 0):.1f}")
    if verdict.auth is not None:
        a = verdict.auth
        table.add_row("sender_auth", f"spf={a.spf} dkim={a.dkim_result} dmarc={a.dmarc}",
                      f"from {a.from_domain or '-'}; sender aligned: {'yes' if a.sender_aligned else 'no'}",
                      f"{ms.get('sender_auth', 0):.1f}")
    return table


@quarantine_app.command("list")
@handle_errors
def quarantine_list(
    recipient: str = typer.Option(None, "--recipient", show_default=False, metavar="ADDRESS", help="Only this recipient's messages"),
    last: int = typer.Option(50, "--last", min=1, max=10000, metavar="N", help="How many (newest first)"),
    all_: bool = typer.Option(False, "--all", help="Include released and deleted messages"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per message, one per line"),
) -> None:
    """List held messages: id, transaction ID (the sender's "accepted as"), time, recipient, sender, subject,
    reason."""
    from mxguard.quarantine.store import list_quarantine, row_as_dict

    settings()  # fails with a clear message when the data dir is not initialised
    rows = run(with_store(lambda store: list_quarantine(store, recipient=recipient, limit=last,
                                                        include_released=all_)))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row_as_dict(row), default=str))
        return
    if not rows:
        console.print("The quarantine is empty." if not recipient else f"Nothing held for {recipient}.")
        return
    table = Table(title=f"Quarantine ({len(rows)} shown, newest first)")
    for col in ("id", "transaction", "time", "recipient", "sender", "subject", "reason"):
        # IDs whole on one line, to be copied into the commands that take them.
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "transaction"))
    for r in rows:
        table.add_row(r.id, r.txn_id, r.created.strftime("%Y-%m-%d %H:%M:%S"), r.recipient, r.sender or "<>",
                      r.subject, r.reason)
    console.print(table)



def _quarantine_context():
    """Settings, a store opener and the link signer of the data dir."""
    from mxguard.quarantine.links import LinkSigner, ensure_link_key

    s = settings()
    key = s.path(s.quarantine.link_key_file)
    ensure_link_key(key)
    return s, LinkSigner.from_file(key)


@quarantine_app.command("summary")
@handle_errors
def quarantine_summary(
    send: bool = typer.Option(False, "--send", help="Send the summaries now (without it: show who would get one)"),
    domain: str = typer.Option(None, "--domain", show_default=False, metavar="DOMAIN", help="Only this domain's recipients"),
) -> None:
    """Quarantine summaries: each recipient with new held messages gets a list (with links, if the
    organization allows them), through the delivery path."""
    from mxguard.quarantine.summary import pending_rows, send_summaries
    from mxguard.services.domains import get_domain, list_domains
    from mxguard.storage.models import utcnow

    s, signer = _quarantine_context()
    if not send:
        async def preview(store):
            names = [(await get_domain(store, domain)).name] if domain else [d.name for d in await list_domains(store)]
            return {n: await pending_rows(store, n, utcnow()) for n in names}

        pending = run(with_store(preview))
        table = Table(title="Recipients with new held messages (mxguard quarantine summary --send sends them)")
        for col in ("domain", "recipient", "new messages"):
            table.add_column(col)
        for name, by_rcpt in pending.items():
            for rcpt, rows in by_rcpt.items():
                table.add_row(name, rcpt, str(len(rows)))
        console.print(table)
        return
    report = run(with_store(lambda store: send_summaries(store, s, signer, domain=domain)))
    if not report.sent:
        console.print("No recipient has new held messages; nothing sent.")
        return
    table = Table(title="Quarantine summaries")
    for col in ("recipient", "messages", "downstream TLS", "reply"):
        table.add_column(col, overflow="fold")
    for result, count in report.sent:
        tls = result.connection.describe_tls() if result.connection else "-"
        table.add_row(result.recipient, str(count), tls, result.reply.one_line())
    console.print(table)
    if report.delivered < len(report.sent):
        raise typer.Exit(1)


@quarantine_app.command("purge")
@handle_errors
def quarantine_purge() -> None:
    """Delete quarantined messages whose retention (filters.quarantine_days) has run out."""
    from mxguard.quarantine.service import purge_expired

    settings()
    count = run(with_store(purge_expired))
    console.print(f"Purged {count} expired message(s).", highlight=False)


_QID_HELP = "Quarantine ID (mxguard quarantine list), or the transaction ID the sender was given (accepted as ...)"


@quarantine_app.command("release")
@handle_errors
def quarantine_release(ref: str = typer.Argument(..., show_default=False, metavar="ID", help=_QID_HELP)) -> None:
    """Deliver a held message to its recipient through the delivery path (domain TLS policy applies)."""
    from mxguard.quarantine.service import release, resolve_id
    from mxguard.services.access import Actor
    from mxguard.storage.sealing import KeyRing

    s = settings()
    qid = ref

    async def go(store):
        nonlocal qid
        qid = await resolve_id(store, Actor.cli(), ref)
        return await release(store, KeyRing(s.path(s.sealing_key_file)).get(), s, qid, actor=Actor.cli(), via="cli")

    result = run(with_store(go))
    tls = result.connection.describe_tls() if result.connection else "-"
    console.print(f"Delivered {qid} to {result.recipient} (TLS: {tls}): {result.reply.one_line()}", highlight=False)


@quarantine_app.command("delete")
@handle_errors
def quarantine_delete(ref: str = typer.Argument(..., show_default=False, metavar="ID", help=_QID_HELP)) -> None:
    """Delete a held message (its sealed copy is erased)."""
    from mxguard.quarantine.service import delete_message, resolve_id
    from mxguard.services.access import Actor

    settings()

    async def go(store):
        qid = await resolve_id(store, Actor.cli(), ref)
        await delete_message(store, Actor.cli(), qid)
        return qid

    qid = run(with_store(go))
    console.print(f"Deleted {qid}", highlight=False)


@quarantine_app.command("signin-link")
@handle_errors
def quarantine_signin_link(
    email: str = typer.Argument(..., show_default=False, help="A recipient address of a domain with an organization"),
) -> None:
    """Print a one-time Message Center sign-in link for a recipient (creates the account if missing)."""
    from mxguard.errors import NotFound
    from mxguard.quarantine.service import ensure_recipient_user
    from mxguard.quarantine.signin import signin_url
    from mxguard.quarantine.summary import message_center_url

    s, signer = _quarantine_context()
    user = run(with_store(lambda store: ensure_recipient_user(store, email)))
    if user is None:
        raise NotFound(f"{email} cannot use the Message Center: its domain is not served or has no organization")
    typer.echo(signin_url(signer, message_center_url(s), user.email))
