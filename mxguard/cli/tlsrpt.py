"""``mxguard tls-report send``: the day's TLS-RPT aggregate reports (RFC 8460)."""

from __future__ import annotations

import datetime as dt
import json

import typer

from mxguard.cli.common import console, fail, handle_errors, run, settings
from mxguard.storage.db import Store
from mxguard.tls.reporting import send_reports

tls_report_app = typer.Typer(help="TLS-RPT (RFC 8460) aggregate reports of downstream TLS.", no_args_is_help=True)


def _yesterday() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


@tls_report_app.command("send")
@handle_errors
def send(day: str = typer.Option("", "--day", help="UTC day YYYY-MM-DD (yesterday when not given)"),
         as_json: bool = typer.Option(False, "--json", help="One JSON object per report target")) -> None:
    """Send the reports for one UTC day to every served domain whose _smtp._tls record asks for them.

    Run it once a day (a systemd timer or cron, after 00:00 UTC). Exit 1 when a target refused.
    """
    try:
        when = dt.date.fromisoformat(day or _yesterday())
    except ValueError:
        fail(f"--day: {day!r} is not a date (YYYY-MM-DD)")
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
