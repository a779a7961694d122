"""``mxguard tls cert add|list|remove``: certificates the gateway presents by SNI (STARTTLS and HTTPS)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from mxguard.cli.acme import acme_app
from mxguard.cli.common import console, fail, handle_errors, run, settings, with_store
from mxguard.services import sni_certificates as svc
from mxguard.services.access import Actor
from mxguard.services.certificates import MAX_PEM_BYTES
from mxguard.storage.sealing import Sealer

tls_app = typer.Typer(help="The gateway's TLS certificates.", no_args_is_help=True)
cert_app = typer.Typer(help="Certificates chosen by SNI, per served host name or wildcard; no match (or no "
                            "SNI) gets the gateway certificate.", no_args_is_help=True)
tls_app.add_typer(cert_app, name="cert")
tls_app.add_typer(acme_app, name="acme")


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_PEM_BYTES + 1)  # one byte over, so the service can say it is too large
    except OSError as exc:
        fail(f"{what}: cannot read {path}: {exc.strerror or exc}", 2)
        raise  # not reached: fail() exits


@cert_app.command("add")
@handle_errors
def cert_add(
    cert_file: Path = typer.Argument(..., show_default=False, metavar="CERT", help="PEM chain, leaf first"),
    key_file: Path = typer.Argument(..., show_default=False, metavar="KEY", help="Unencrypted PEM private key"),
    name: str = typer.Option(..., "--name", show_default=False, metavar="HOST",
                             help="Host name (mx.example.com) or one-label wildcard (*.example.com)"),
    replace: bool = typer.Option(False, "--replace", help="Replace the certificate stored for the name (renewal)"),
) -> None:
    """Validate and store a certificate; running gateways present it for NAME from the next handshake on."""
    cert_pem, key_pem = _read(cert_file, "CERT"), _read(key_file, "KEY")
    s = settings()
    sealer = Sealer.from_file(s.path(s.sealing_key_file))
    view = run(with_store(lambda store: svc.add_sni_certificate(
        store, sealer, name, cert_pem, key_pem, actor=Actor.cli(), replace=replace, min_version=s.tls.min_version)))
    console.print(f"{'Stored' if replace else 'Added'} certificate for {view.name}: {view.subject}, "
                  f"valid until {view.not_after:%Y-%m-%d} ({view.days_left:.0f} days), SHA-256 {view.fingerprint}",
                  highlight=False, soft_wrap=True)


@cert_app.command("list")
@handle_errors
def cert_list(as_json: bool = typer.Option(False, "--json", help="One JSON array")) -> None:
    """List the certificates chosen by SNI: name, expiry, days left, fingerprint."""
    views = run(with_store(lambda store: svc.list_sni_certificates(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([{**v.as_dict(), "days_left": int(v.days_left)} for v in views], default=str,
                              indent=2))
        return
    if not views:
        console.print("No certificates by SNI; every client gets the gateway certificate.")
        return
    table = Table()
    for col in ("name", "not after", "days left", "SHA-256", "domain"):
        table.add_column(col)
    for v in views:
        table.add_row(v.name, f"{v.not_after:%Y-%m-%d %H:%M}", f"{v.days_left:.0f}", v.fingerprint, v.domain or "-")
    console.print(table)


@cert_app.command("remove")
@handle_errors
def cert_remove(name: str = typer.Option(..., "--name", show_default=False, metavar="HOST",
                                         help="The name the certificate is stored for")) -> None:
    """Delete the certificate for NAME; from the next handshake on it gets the gateway certificate."""
    view = run(with_store(lambda store: svc.remove_sni_certificate(store, name, actor=Actor.cli())))
    console.print(f"Removed the certificate for {view.name}", highlight=False)
