"""``mxguard tls-report``: TLS-RPT (RFC 8460). ``send``: the day's aggregate reports of this gateway's
downstream TLS; ``received``: the reports other senders sent about the served domains.
(``mxguard tlsrpt ...`` is the same group.)"""

from __future__ import annotations

import datetime as dt
import json

import typer
from rich.table import Table

from mxguard.cli.common import console, fail, handle_errors, run, settings, with_store
from mxguard.services.access import Actor
from mxguard.services.tls_reports import received_reports
from mxguard.storage.db import Store
from mxguard.tls.reporting import send_reports

tls_report_app = typer.Typer(help="TLS-RPT (RFC 8460): reports of downstream TLS sent, and reports received "
                                  "about the served domains.", no_args_is_help=True)


def _yesterday() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


@tls_report_app.command("send")
@handle_errors
def send(day: str = typer.Option("", "--day", help="UTC day YYYY-MM-DD (yesterday when not given)"),
         as_json: bool = typer.Option(False, "--json", help="One JSON object per report target")) -> None:
    """Send the reports for one UTC day to every served domain whose _smtp._tls record asks for them.

    A running gateway sends the previous day's reports itself ([downstream] tls_reports); this
    sends a given day by hand. Exit 1 when a target refused.
    """
    try:
        when = dt.date.fromisoformat(day or _yesterday())
    except ValueError:
        fail(f"--day: {day!r} is not a date (YYYY-MM-DD)")
        return
    if when >= dt.datetime.now(dt.timezone.utc).date():
        fail(f"--day: {when} has not ended yet (UTC); reports cover whole past days (RFC 8460 4.1)")
        return

    async def go():
        s = settings()
        store = Store(s.effective_database_url)
        try:
            await store.migrate()
            return await send_reports(store, s, when)
        finally:
            await store.close()

    sent = run(go())
    for item in sent:
        if as_json:
            typer.echo(json.dumps({"domain": item.domain, "target": item.target, "ok": item.ok,
                                   "detail": item.detail}))
        else:
            console.print(f"{'sent' if item.ok else 'FAILED':6} {item.domain} -> {item.target}: {item.detail}",
                          highlight=False, soft_wrap=True)
    if not sent and not as_json:
        console.print(f"No TLS reports for {when}: no served domain with delivery attempts publishes _smtp._tls.")
    raise typer.Exit(0 if all(i.ok for i in sent) else 1)


@tls_report_app.command("received")
@handle_errors
def received(domain: str = typer.Option("", "--domain", help="Only this served domain"),
             limit: int = typer.Option(100, "--limit", min=1, max=10000, help="At most this many, newest first"),
             as_json: bool = typer.Option(False, "--json", help="One JSON object per report and domain")) -> None:
    """List the TLS-RPT reports other senders sent about the served domains (newest first).

    Reports come by mail to the domain's report address ([tls_reports] ingest_local_part,
    default tlsrpt@DOMAIN) or by HTTPS POST to /tlsrpt on the console listener.
    """
    rows = run(with_store(lambda store: received_reports(store, actor=Actor.cli(), domain=domain or None,
                                                         limit=limit)))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.as_dict()))
        return
    if not rows:
        console.print("No TLS reports received" + (f" for {domain}." if domain else "."))
        return
    table = Table(title="TLS-RPT reports received")
    for col in ("domain", "window (UTC)", "organization", "report id", "successful", "failed",
                "failures by result type", "via"):
        table.add_column(col)
    for r in rows:
        failures = "\n".join(f"{k}: {v}" for k, v in r.failures.items()) or "-"
        table.add_row(r.domain, f"{r.start:%Y-%m-%d %H:%M} – {r.end:%Y-%m-%d %H:%M}", r.organization, r.report_id,
                      str(r.successful), str(r.failed), failures, r.via)
    console.print(table)
