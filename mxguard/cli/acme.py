"""``mxguard tls acme issue|renew|status``: certificates from an ACME CA (RFC 8555), validated by HTTP-01."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, settings, with_store
from mxguard.config import Settings
from mxguard.services import acme
from mxguard.services.access import Actor
from mxguard.storage.db import Store
from mxguard.storage.sealing import Sealer

if TYPE_CHECKING:  # the ACME client itself is imported only when a certificate is ordered (memory)
    from mxguard.tls.acme_client import Issued

acme_app = typer.Typer(help="Certificates from an ACME CA (RFC 8555) for the names the gateway serves, "
                            "validated over HTTP on acme.http_listen (port 80).", no_args_is_help=True)


async def _issue(s: Settings, store: Store, names: list[str], replace: bool) -> Issued:
    from mxguard.web.acme_http01 import responder_server
    sealer = Sealer.from_file(s.path(s.sealing_key_file))
    return await acme.request_certificate(s, store, sealer, names, replace=replace, actor=Actor.cli(),
                                          make_responder=responder_server)


async def _renew(s: Settings, store: Store, name: str) -> Issued:
    from mxguard.web.acme_http01 import responder_server
    sealer = Sealer.from_file(s.path(s.sealing_key_file))
    return await acme.renew_now(s, store, sealer, name, actor=Actor.cli(), make_responder=responder_server)


def _issued_line(verb: str, issued: Issued) -> str:
    view = issued.views[0]
    return (f"{verb} certificate for {', '.join(issued.names)}: {view.subject or view.name}, valid until "
            f"{view.not_after:%Y-%m-%d} ({view.days_left:.0f} days), SHA-256 {view.fingerprint}")


@acme_app.command("issue")
@handle_errors
def acme_issue(
    names: list[str] = typer.Option(..., "--name", show_default=False, metavar="HOST",
                                    help="Host name; repeat for more names on one certificate (the first is "
                                         "the main one)"),
    replace: bool = typer.Option(False, "--replace", help="Replace certificates stored for the names"),
) -> None:
    """Order a certificate for the names and store it as their SNI certificate (renewed by the gateway).

    The CA connects to port 80 of each name: it must reach acme.http_listen. If the gateway runs it
    answers; otherwise a responder runs here for the order's duration.
    """
    s = settings()
    issued = run(with_store(lambda store: _issue(s, store, names, replace)))
    console.print(_issued_line("Issued", issued), highlight=False, soft_wrap=True)


@acme_app.command("renew")
@handle_errors
def acme_renew(name: str = typer.Option(..., "--name", show_default=False, metavar="HOST",
                                        help="The main name of a certificate ACME issued (see tls acme status)")) -> None:
    """Renew a certificate ACME issued now, whatever its expiry (same names; the old one stays on failure)."""
    s = settings()
    issued = run(with_store(lambda store: _renew(s, store, name)))
    console.print(_issued_line("Renewed", issued), highlight=False, soft_wrap=True)


@acme_app.command("status")
@handle_errors
def acme_status(as_json: bool = typer.Option(False, "--json", help="One JSON array")) -> None:
    """The names issued by ACME: expiry, days left, and the last renewal error."""
    s = settings()
    status = run(with_store(lambda store: acme.acme_status(s, store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([{**e.as_dict(), "issued_at": e.issued_at.isoformat(),
                                "not_after": e.not_after.isoformat() if e.not_after else None,
                                "last_attempt": e.last_attempt.isoformat() if e.last_attempt else None,
                                "renew_within_days": status.renew_before_days}
                               for e in status.entries], indent=2))
        return
    state = f"on ({status.directory_url})" if status.enabled else "off (acme.directory_url is empty)"
    console.print(f"ACME: {state}; renewed {status.renew_before_days} days before expiry.", highlight=False)
    if not status.entries:
        console.print("No certificates issued by ACME.")
        return
    table = Table()
    for col in ("name", "names", "state", "not after", "days left", "last error"):
        table.add_column(col)
    for e in status.entries:
        table.add_row(e.name, ", ".join(e.names), e.state, f"{e.not_after:%Y-%m-%d %H:%M}" if e.not_after
                      else "removed", "-" if e.days_left is None else f"{e.days_left:.0f}", e.last_error or "-")
    console.print(table)


__all__ = ["acme_app"]
