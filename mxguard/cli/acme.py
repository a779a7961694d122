"""``mxguard tls acme issue|status``: certificates from an ACME CA (RFC 8555), validated by HTTP-01."""

from __future__ import annotations

import json
import secrets

import httpx
import structlog
import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, settings, with_store
from mxguard.config import Settings
from mxguard.errors import ConfigError
from mxguard.netaddr import parse_host_port
from mxguard.services.access import Actor
from mxguard.storage.db import Store
from mxguard.storage.sealing import Sealer
from mxguard.tls import acme_store

log = structlog.get_logger("mxguard.acme")

acme_app = typer.Typer(help="Certificates from an ACME CA (RFC 8555) for the names the gateway serves, "
                            "validated over HTTP on acme.http_listen (port 80).", no_args_is_help=True)

#: Host the probe token is published for: .invalid never names a real host (RFC 6761 6.4).
PROBE_HOST = "responder-probe.mxguard.invalid"


async def _gateway_answers(store: Store, listen: str) -> bool:
    """Whether what listens on ``listen`` is an mxguard responder reading this database (a probe token)."""
    host, port = parse_host_port(listen, default_port=80, allow_zero=True)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    token = secrets.token_urlsafe(24)
    await acme_store.publish_token(store, token, PROBE_HOST, f"{token}.probe")
    url_host = f"[{host}]" if ":" in host else host
    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            reply = await http.get(f"http://{url_host}:{port}/.well-known/acme-challenge/{token}",
                                   headers={"Host": PROBE_HOST})
        return reply.status_code == 200 and reply.text == f"{token}.probe"
    except httpx.HTTPError:
        return False
    finally:
        await acme_store.withdraw_tokens(store, [token])


async def _issue(s: Settings, store: Store, names: list[str], replace: bool) -> "acme_client.Issued":  # noqa: F821 - imported below
    # Imported here: the ACME client's libraries would cost every `mxguard serve` process memory.
    from mxguard.tls import acme_client

    from mxguard.web.acme_http01 import responder_server
    if not s.acme.directory_url:
        raise ConfigError("acme.directory_url is empty: ACME is off; set the CA's directory URL in [acme]")
    acme_client.check_names(names)  # a bad name fails before anything listens
    responder = responder_server(store, s.acme.http_listen)
    try:
        await responder.start()
        log.info("HTTP-01 responder started for this order", listen=s.acme.http_listen)
    except ConfigError:
        responder = None
        if not await _gateway_answers(store, s.acme.http_listen):
            raise ConfigError(f"acme.http_listen: {s.acme.http_listen} is in use by something that is not this "
                              "gateway's HTTP-01 responder; free the port or start mxguard serve") from None
        log.info("the running gateway answers the HTTP-01 challenges", listen=s.acme.http_listen)
    try:
        sealer = Sealer.from_file(s.path(s.sealing_key_file))
        return await acme_client.issue(s, store, sealer, names, replace=replace, actor=Actor.cli())
    finally:
        if responder is not None:
            await responder.stop()


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
    view = issued.views[0]
    console.print(f"Issued certificate for {', '.join(issued.names)}: {view.subject or view.name}, valid until "
                  f"{view.not_after:%Y-%m-%d} ({view.days_left:.0f} days), SHA-256 {view.fingerprint}",
                  highlight=False, soft_wrap=True)


@acme_app.command("status")
@handle_errors
def acme_status(as_json: bool = typer.Option(False, "--json", help="One JSON array")) -> None:
    """The names issued by ACME: expiry, days left, and the last renewal error."""
    s = settings()
    entries = run(with_store(acme_store.list_entries))
    if as_json:
        typer.echo(json.dumps([{"name": e.name, "names": list(e.names), "directory_url": e.directory_url,
                                "issued_at": e.issued_at.isoformat(),
                                "not_after": e.stored_not_after.isoformat() if e.stored_not_after else None,
                                "days_left": None if e.days_left() is None else int(e.days_left()),
                                "renew_within_days": s.acme.renew_before_days, "last_error": e.last_error}
                               for e in entries], indent=2))
        return
    state = f"on ({s.acme.directory_url})" if s.acme.directory_url else "off (acme.directory_url is empty)"
    console.print(f"ACME: {state}; renewed {s.acme.renew_before_days} days before expiry.", highlight=False)
    if not entries:
        console.print("No certificates issued by ACME.")
        return
    table = Table()
    for col in ("name", "names", "not after", "days left", "last error"):
        table.add_column(col)
    for e in entries:
        days = e.days_left()
        table.add_row(e.name, ", ".join(e.names), f"{e.stored_not_after:%Y-%m-%d %H:%M}" if e.stored_not_after
                      else "removed", "-" if days is None else f"{days:.0f}", e.last_error or "-")
    console.print(table)


__all__ = ["acme_app"]
