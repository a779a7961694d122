"""``mxguard org add|list|set|show``, ``mxguard user add|list|passwd``, ``mxguard apikey create|list|revoke``."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, with_store
from mxguard.services import apikeys as apikey_service
from mxguard.services import orgs as org_service
from mxguard.services import users as user_service
from mxguard.services.access import Actor

org_app = typer.Typer(help="Organizations: the tenants that own domains and users.", no_args_is_help=True)
user_app = typer.Typer(help="Console users and their roles.", no_args_is_help=True)
apikey_app = typer.Typer(help="REST API keys (Authorization: Bearer ...).", no_args_is_help=True)

ROLE_HELP = "admin (everything) | org-admin (own organization) | user (Message Center only)"


@org_app.command("add")
@handle_errors
def org_add(name: str = typer.Argument(..., show_default=False, help="Organization name")) -> None:
    """Create an organization."""
    view = run(with_store(lambda store: org_service.add_org(store, name, actor=Actor.cli())))
    console.print(f"Added organization {view.name}", highlight=False)


@org_app.command("list")
@handle_errors
def org_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List organizations."""
    views = run(with_store(lambda store: org_service.list_orgs(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([{"name": v.name, "created_at": v.created_at.isoformat()} for v in views], indent=2))
        return
    for v in views:
        console.print(v.name, highlight=False)


SWITCH_HELP = {
    "message_links": "Summaries carry deliver/view links and the Message Center offers View (on | off)",
    "notify_virus_recipient": "Tell the recipient when a virus addressed to them was stopped (on | off)",
    "notify_virus_admin": "Tell the alert address when a virus was stopped (on | off)",
    "notify_route_down": "Alert when a downstream server is unreachable (spooling) too long (on | off)",
    "notify_cert_expiry": "Alert when a certificate expires within 14 days (on | off)",
    "notify_engine_down": "Alert when a filtering engine is down (on | off)",
}


@org_app.command("set")
@handle_errors
def org_set(
    name: str = typer.Argument(..., show_default=False, help="Organization name"),
    message_links: str = typer.Option(None, "--message-links", show_default=False, metavar="on|off", help=SWITCH_HELP["message_links"]),
    notify_virus_recipient: str = typer.Option(None, "--notify-virus-recipient", show_default=False, metavar="on|off",
                                               help=SWITCH_HELP["notify_virus_recipient"]),
    notify_virus_admin: str = typer.Option(None, "--notify-virus-admin", show_default=False, metavar="on|off",
                                           help=SWITCH_HELP["notify_virus_admin"]),
    notify_route_down: str = typer.Option(None, "--notify-route-down", show_default=False, metavar="on|off",
                                          help=SWITCH_HELP["notify_route_down"]),
    notify_cert_expiry: str = typer.Option(None, "--notify-cert-expiry", show_default=False, metavar="on|off",
                                           help=SWITCH_HELP["notify_cert_expiry"]),
    notify_engine_down: str = typer.Option(None, "--notify-engine-down", show_default=False, metavar="on|off",
                                           help=SWITCH_HELP["notify_engine_down"]),
    alert_address: str = typer.Option(None, "--alert-address", show_default=False, metavar="EMAIL",
                                      help="Where the organization's alerts go ('' to clear)"),
    route_down_minutes: int = typer.Option(None, "--route-down-minutes", show_default=False, metavar="N",
                                           help="Minutes of spooling before a route-down alert (default 30)"),
) -> None:
    """Change an organization's message-links switch and notification settings."""
    from mxguard.services import orgsettings

    view = run(with_store(lambda store: orgsettings.update_settings(
        store, name, actor=Actor.cli(), message_links=message_links, notify_virus_recipient=notify_virus_recipient,
        notify_virus_admin=notify_virus_admin, notify_route_down=notify_route_down,
        notify_cert_expiry=notify_cert_expiry, notify_engine_down=notify_engine_down, alert_address=alert_address,
        route_down_minutes=route_down_minutes)))
    _print_org_settings(view)


@org_app.command("show")
@handle_errors
def org_show(name: str = typer.Argument(..., show_default=False, help="Organization name"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Show an organization's message-links switch and notification settings."""
    from mxguard.services import orgsettings

    view = run(with_store(lambda store: orgsettings.get_settings(store, name, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps(view.as_dict(), indent=2))
    else:
        _print_org_settings(view)


def _print_org_settings(view) -> None:
    for key, value in view.as_dict().items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        console.print(f"[bold]{key:>22}[/bold]  {value if value is not None else '-'}", highlight=False)


def _prompt_password() -> str:
    return typer.prompt("Password (12 characters or more)", hide_input=True, confirmation_prompt=True)


def _password_from_input(generate: bool) -> str | None:
    """The password for ``user add`` / ``user passwd``: None (generate one) with
    ``--generate-password``; prompted twice on a terminal; otherwise the first line of stdin
    (``echo ... | mxguard user add``), without its line ending. Stdin that is empty (no line at
    all, e.g. ``</dev/null``) means None too. The service checks the length either way.
    """
    if generate:
        return None
    if sys.stdin is None:
        return None
    if sys.stdin.isatty():
        return _prompt_password()
    line = sys.stdin.readline()
    if line == "":
        return None  # end of input without a line: nothing was piped
    return line.rstrip("\r\n")


@user_app.command("add")
@handle_errors
def user_add(
    email: str = typer.Argument(..., show_default=False, help="Login e-mail address"),
    role: str = typer.Option(..., "--role", show_default=False, metavar="ROLE", help=ROLE_HELP),
    org: str = typer.Option(None, "--org", show_default=False, metavar="ORG", help="Organization (for org-admin and user)"),
    generate: bool = typer.Option(False, "--generate-password",
                                  help="Print a generated one-time password instead of prompting or reading stdin"),
) -> None:
    """Create a console user: prompts for a password on a terminal, reads one line from stdin
    when it is piped, or prints a generated one-time password (--generate-password, or empty stdin)."""
    password = _password_from_input(generate)
    view, generated = run(with_store(lambda store: user_service.add_user(
        store, email, role, org=org, password=password, actor=Actor.cli())))
    console.print(f"Added {view.role} {view.email}" + (f" ({view.org})" if view.org else ""), highlight=False)
    if generated:
        console.print(f"One-time password: {generated}", highlight=False)


@user_app.command("passwd")
@handle_errors
def user_passwd(
    email: str = typer.Argument(..., show_default=False),
    generate: bool = typer.Option(False, "--generate-password", help="Print a generated password"),
) -> None:
    """Set a user's password (also unlocks a locked account and ends its sessions); the password
    is prompted for, read as one line from piped stdin, or generated as for ``user add``."""
    password = _password_from_input(generate)
    generated = run(with_store(lambda store: user_service.set_password(store, email, password, actor=Actor.cli())))
    console.print(f"Password of {email} changed", highlight=False)
    if generated:
        console.print(f"One-time password: {generated}", highlight=False)


@user_app.command("list")
@handle_errors
def user_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List users."""
    views = run(with_store(lambda store: user_service.list_users(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([{"email": v.email, "role": v.role, "org": v.org} for v in views], indent=2))
        return
    table = Table(title="Users")
    for col in ("email", "role", "organization", "last login", "locked until"):
        table.add_column(col)
    for v in views:
        table.add_row(v.email, v.role, v.org or "-", str(v.last_login_at or "-"), str(v.locked_until or "-"))
    console.print(table)


@apikey_app.command("create")
@handle_errors
def apikey_create(
    user: str = typer.Option(..., "--user", show_default=False, metavar="EMAIL", help="The key acts as this user, with their role"),
    name: str = typer.Option("", "--name", help="A label for the key"),
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key, view = run(with_store(lambda store: apikey_service.create_api_key(store, user, name=name,
                                                                            actor=Actor.cli())))
    console.print(f"API key {view.prefix} for {view.user} (use as: Authorization: Bearer <key>):", highlight=False)
    typer.echo(key)


@apikey_app.command("list")
@handle_errors
def apikey_list(user: str = typer.Option(None, "--user", show_default=False, metavar="EMAIL")) -> None:
    """List API keys (prefix, user, last use)."""
    views = run(with_store(lambda store: apikey_service.list_api_keys(store, actor=Actor.cli(), email=user)))
    table = Table(title="API keys")
    for col in ("prefix", "user", "name", "created", "last used", "revoked"):
        table.add_column(col)
    for v in views:
        table.add_row(v.prefix, v.user, v.name, str(v.created_at), str(v.last_used_at or "-"), "yes" if v.revoked else "")
    console.print(table)


@apikey_app.command("revoke")
@handle_errors
def apikey_revoke(prefix: str = typer.Argument(..., show_default=False, help="The key's prefix (the 8 characters after mxg_)")) -> None:
    """Revoke an API key."""
    view = run(with_store(lambda store: apikey_service.revoke_api_key(store, prefix, actor=Actor.cli())))
    console.print(f"Revoked {view.prefix} ({view.user})", highlight=False)
