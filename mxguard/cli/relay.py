"""``mxguard relay network|user|cert add|list|remove``, ``relay held``, ``relay release``: who may relay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, with_store
from mxguard.errors import ValidationFailed
from mxguard.services import relay as svc
from mxguard.services.access import Actor

relay_app = typer.Typer(help="The outbound relay: which of an organization's servers may send to the internet "
                             "through the gateway (source networks, SMTP AUTH users, client certificates).",
                        no_args_is_help=True)
network_app = typer.Typer(help="Source networks whose sessions may relay for an organization.", no_args_is_help=True)
user_app = typer.Typer(help="SMTP AUTH users (PLAIN/LOGIN after STARTTLS); passwords stored as argon2 hashes.",
                       no_args_is_help=True)
cert_app = typer.Typer(help="TLS client certificates (a leaf's fingerprint or an issuing CA) that may relay.",
                       no_args_is_help=True)
relay_app.add_typer(network_app, name="network")
relay_app.add_typer(user_app, name="user")
relay_app.add_typer(cert_app, name="cert")

ORG = typer.Argument(..., show_default=False, metavar="ORG", help="Organization name")


def _json(items) -> None:
    typer.echo(json.dumps(items, indent=2, default=str))


@network_app.command("add")
@handle_errors
def network_add(org: str = ORG,
                network: str = typer.Argument(..., show_default=False, help="IP network, e.g. 192.0.2.0/24 or 2001:db8::/48"),
                note: str = typer.Option("", "--note", help="What the network is (shown in listings)")) -> None:
    """Let sessions from NETWORK relay for ORG (port 25 and the submission port)."""
    view = run(with_store(lambda store: svc.add_network(store, org, network, note=note, actor=Actor.cli())))
    console.print(f"Added relay network {view.network} for {view.org}", highlight=False)


@network_app.command("list")
@handle_errors
def network_list(org: str = ORG, as_json: bool = typer.Option(False, "--json")) -> None:
    """List ORG's relay networks."""
    views = run(with_store(lambda store: svc.list_networks(store, org, actor=Actor.cli())))
    if as_json:
        return _json([{"network": v.network, "note": v.note} for v in views])
    for v in views:
        console.print(f"{v.network}  {v.note}".rstrip(), highlight=False)


@network_app.command("remove")
@handle_errors
def network_remove(org: str = ORG, network: str = typer.Argument(..., show_default=False)) -> None:
    """Stop relaying for sessions from NETWORK."""
    view = run(with_store(lambda store: svc.remove_network(store, org, network, actor=Actor.cli())))
    console.print(f"Removed relay network {view.network} of {view.org}", highlight=False)


@user_app.command("add")
@handle_errors
def user_add(org: str = ORG,
             username: str = typer.Argument(..., show_default=False, help="SMTP AUTH user name"),
             password_stdin: bool = typer.Option(False, "--password-stdin",
                                                 help="Read the password from standard input (one line) "
                                                      "instead of generating one")) -> None:
    """Create an SMTP AUTH user for ORG. The password (generated unless --password-stdin) is
    printed this once; only its argon2 hash is stored."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    view, secret = run(with_store(lambda store: svc.add_credential(store, org, username, password,
                                                                   actor=Actor.cli())))
    console.print(f"Added relay user {view.username} for {view.org}", highlight=False)
    if password is None:
        console.print(f"Password (shown once): {secret}", highlight=False)


@user_app.command("list")
@handle_errors
def user_list(org: str = ORG, as_json: bool = typer.Option(False, "--json")) -> None:
    """List ORG's SMTP AUTH users (never their passwords)."""
    views = run(with_store(lambda store: svc.list_credentials(store, org, actor=Actor.cli())))
    if as_json:
        return _json([{"username": v.username, "created_at": v.created_at} for v in views])
    for v in views:
        console.print(v.username, highlight=False)


@user_app.command("remove")
@handle_errors
def user_remove(org: str = ORG, username: str = typer.Argument(..., show_default=False)) -> None:
    """Remove an SMTP AUTH user (sessions authenticated already keep going until they end)."""
    view = run(with_store(lambda store: svc.remove_credential(store, org, username, actor=Actor.cli())))
    console.print(f"Removed relay user {view.username} of {view.org}", highlight=False)


def _read(path: Path | None, field: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationFailed(field, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


@cert_app.command("add")
@handle_errors
def cert_add(org: str = ORG,
             fingerprint: str = typer.Option(None, "--fingerprint", show_default=False,
                                             help="SHA-256 of the client's leaf certificate (hex, colons allowed)"),
             cert: Path = typer.Option(None, "--cert", show_default=False, metavar="PEM",
                                       help="The client's certificate itself (self-signed ones work)"),
             ca: Path = typer.Option(None, "--ca", show_default=False, metavar="PEM",
                                     help="An issuing CA: every certificate it issued may relay for ORG"),
             label: str = typer.Option("", "--label", help="A note for listings")) -> None:
    """Let sessions that show a client certificate at STARTTLS relay for ORG (one of --fingerprint,
    --cert, --ca)."""
    cert_pem, ca_pem = _read(cert, "cert"), _read(ca, "ca")
    view = run(with_store(lambda store: svc.add_certificate(store, org, fingerprint=fingerprint, cert_pem=cert_pem,
                                                            ca_pem=ca_pem, label=label, actor=Actor.cli())))
    console.print(f"Added relay client certificate ({view.kind}) {view.fingerprint} for {view.org}", highlight=False)


@cert_app.command("list")
@handle_errors
def cert_list(org: str = ORG, as_json: bool = typer.Option(False, "--json")) -> None:
    """List ORG's relay client certificates."""
    views = run(with_store(lambda store: svc.list_certificates(store, org, actor=Actor.cli())))
    if as_json:
        return _json([v.as_dict() for v in views])
    table = Table("kind", "sha256", "label")
    for v in views:
        table.add_row(v.kind, v.fingerprint, v.label)
    console.print(table)


@cert_app.command("remove")
@handle_errors
def cert_remove(org: str = ORG, fingerprint: str = typer.Argument(..., show_default=False,
                                                                  help="The SHA-256 the listing shows")) -> None:
    """Remove a relay client certificate."""
    view = run(with_store(lambda store: svc.remove_certificate(store, org, fingerprint, actor=Actor.cli())))
    console.print(f"Removed relay client certificate {view.fingerprint} of {view.org}", highlight=False)


@relay_app.command("held")
@handle_errors
def held(as_json: bool = typer.Option(False, "--json")) -> None:
    """Outbound messages held because a sender or an organization went over its rate limit."""
    views = run(with_store(lambda store: svc.list_held(store, actor=Actor.cli())))
    if as_json:
        return _json([{"id": v.id, "txn_id": v.txn_id, "mail_from": v.mail_from, "domain": v.domain,
                       "recipients": list(v.recipients), "subject": v.subject, "created_at": v.created_at}
                      for v in views])
    table = Table("id", "transaction", "created (UTC)", "from", "to", "subject")
    for v in views:
        table.add_row(str(v.id), v.txn_id, f"{v.created_at:%Y-%m-%d %H:%M}", v.mail_from or "<>",
                      " ".join(v.recipients), v.subject)
    console.print(table)


@relay_app.command("release")
@handle_errors
def release(ref: str = typer.Argument(..., show_default=False, metavar="ID",
                                      help="Spool ID (mxguard relay held), or the transaction ID the sender was "
                                           "given (accepted as ...)")) -> None:
    """Send a held outbound message (its spool entry is queued for delivery now)."""
    from mxguard.services.spool import resolve_entry_id

    async def go(store):
        entry_id = await resolve_entry_id(store, Actor.cli(), ref)
        return await svc.release_held(store, entry_id, actor=Actor.cli())

    view = run(with_store(go))
    console.print(f"Released spool entry {view.id} ({view.mail_from or '<>'} to {view.domain})", highlight=False)
