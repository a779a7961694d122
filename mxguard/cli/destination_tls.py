"""``mxguard destination-tls add|list|remove|show``: TLS overrides per internet destination for
outbound delivery (Postfix ``smtp_tls_policy_maps``)."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, with_store
from mxguard.services.access import Actor

destination_tls_app = typer.Typer(
    help="TLS for outbound mail per destination domain (default: opportunistic, upgraded by DANE and MTA-STS).",
    no_args_is_help=True)

LEVEL_HELP = ("none (plain) | may (opportunistic only) | encrypt (TLS or nothing) | dane (DANE when TLSA, else may) "
              "| dane-only | verify (TLS with a certificate that verifies and names the MX host)")


@destination_tls_app.command("add")
@handle_errors
def add(pattern: str = typer.Argument(..., show_default=False, metavar="DESTINATION",
                                      help="example.org (that domain) or .example.org (every domain below it)"),
        level: str = typer.Argument(..., show_default=False, metavar="LEVEL", help=LEVEL_HELP),
        ca_file: str = typer.Option(None, "--ca-file", show_default=False, metavar="PEM",
                                    help="CA bundle for 'verify' (default: the system trust store)"),
        replace: bool = typer.Option(False, "--replace", help="Change an existing override")) -> None:
    """Set the TLS level for mail to a destination (an exact domain beats a .suffix)."""
    from mxguard.services import destination_tls as svc

    view = run(with_store(lambda store: svc.add_override(store, pattern, level, ca_file=ca_file, replace=replace,
                                                          actor=Actor.cli())))
    console.print(f"Outbound mail to {view.pattern} now uses TLS level {view.level}"
                  + (f" (CA file {view.ca_file})" if view.ca_file else ""), highlight=False)


@destination_tls_app.command("list")
@handle_errors
def list_(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List the per-destination TLS overrides."""
    from mxguard.services import destination_tls as svc

    views = run(with_store(lambda store: svc.list_overrides(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in views], indent=2))
        return
    if not views:
        console.print("No overrides: every destination gets opportunistic TLS, upgraded by DANE and MTA-STS")
        return
    table = Table("destination", "level", "CA file")
    for v in views:
        table.add_row(escape(v.pattern), v.level, escape(v.ca_file or "-"))
    console.print(table)


@destination_tls_app.command("remove")
@handle_errors
def remove(pattern: str = typer.Argument(..., show_default=False, metavar="DESTINATION")) -> None:
    """Remove a destination's override (it gets the default again)."""
    from mxguard.services import destination_tls as svc

    view = run(with_store(lambda store: svc.remove_override(store, pattern, actor=Actor.cli())))
    console.print(f"Removed the TLS override for {view.pattern} (was {view.level})", highlight=False)


@destination_tls_app.command("show")
@handle_errors
def show(domain: str = typer.Argument(..., show_default=False, metavar="DOMAIN", help="A destination domain"),
         as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """How mail to DOMAIN would go now: its MX hosts, the override, the TLS policy per address
    (DNS lookups and the MTA-STS policy only; no SMTP connection)."""
    from mxguard.cli.common import settings
    from mxguard.services import destination_tls as svc

    report = run(with_store(lambda store: svc.explain(store, settings().downstream, domain, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    how = (f"override {report.override.pattern} = {report.override.level}" if report.override else
           "default (opportunistic, upgraded by DANE and MTA-STS)")
    if report.failure:
        # The override applies whatever DNS says now: show it with the failure.
        console.print(f"{report.domain}: {how}; no delivery: {escape(report.failure)}", highlight=False)
        raise typer.Exit(1)
    console.print(f"{report.domain}: {how}; MX answer {'DNSSEC-validated' if report.mx_secure else 'not validated'}",
                  highlight=False)
    table = Table("server", "decided by", "mode", "what it means")
    for s in report.servers:
        table.add_row(escape(s.server), s.source, s.mode, escape(s.meaning))
    console.print(table)
