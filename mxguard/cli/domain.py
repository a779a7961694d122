"""``mxguard domain add|list|show|set|remove``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mxguard.cli.common import console, handle_errors, run, settings, with_store
from mxguard.services import domains as svc
from mxguard.services.access import Actor

domain_app = typer.Typer(help="Served domains, their downstream servers and TLS policy.", no_args_is_help=True)

SERVER_HELP = "Downstream server HOST[:PORT] (port 25 by default); repeat for failover, in order"
DOWNSTREAM_HELP = "TLS to the downstream server: off | opportunistic | required | verify (default: opportunistic)"
INBOUND_HELP = "TLS from senders: optional | required (530 5.7.0 without STARTTLS) (default: optional)"
UNREACHABLE_HELP = "Every server down: spool (accept, hold sealed, deliver later) | defer (451 4.4.1) (default: spool)"
ORG_HELP = "Owning organization (its org-admins manage the domain)"


def _print_domain(view: svc.DomainView) -> None:
    for key, value in view.as_dict().items():
        if isinstance(value, list):
            value = ", ".join(value)
        console.print(f"[bold]{key:>16}[/bold]  {value if value is not None else '-'}", highlight=False)


@domain_app.command("add")
@handle_errors
def add(
    domain: str = typer.Argument(..., help="The domain, e.g. example.com"),
    server: list[str] = typer.Option(..., "--server", metavar="HOST[:PORT]", help=SERVER_HELP),
    downstream_tls: str = typer.Option(None, "--downstream-tls", metavar="MODE", help=DOWNSTREAM_HELP),
    inbound_tls: str = typer.Option(None, "--inbound-tls", metavar="MODE", help=INBOUND_HELP),
    tls_ca_file: str = typer.Option(None, "--tls-ca-file", metavar="PEM", help="CA bundle for 'verify' (default: system trust store)"),
    tls_fingerprint: str = typer.Option(None, "--tls-fingerprint", metavar="SHA256", help="Pinned SHA-256 certificate fingerprint for 'verify'"),
    tls_min_version: str = typer.Option(None, "--tls-min-version", metavar="1.2|1.3", help="Lowest downstream TLS version (default: 1.2)"),
    on_unreachable: str = typer.Option(None, "--on-unreachable", metavar="spool|defer", help=UNREACHABLE_HELP),
    org: str = typer.Option(None, "--org", metavar="ORG", help=ORG_HELP),
) -> None:
    """Serve a domain: accept its mail and relay it to its downstream server(s)."""
    view = run(with_store(lambda store: svc.add_domain(
        store, domain, server, actor=Actor.cli(), org=org, downstream_tls=downstream_tls, inbound_tls=inbound_tls,
        tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, tls_min_version=tls_min_version,
        on_unreachable=on_unreachable)))
    console.print(f"Added {view.name} → {', '.join(view.servers)} (downstream TLS {view.downstream_tls}, "
                  f"inbound TLS {view.inbound_tls})", highlight=False)


@domain_app.command("set")
@handle_errors
def set_(
    domain: str = typer.Argument(...),
    server: list[str] = typer.Option(None, "--server", metavar="HOST[:PORT]", help=SERVER_HELP + " (replaces the list)"),
    downstream_tls: str = typer.Option(None, "--downstream-tls", metavar="MODE", help=DOWNSTREAM_HELP),
    inbound_tls: str = typer.Option(None, "--inbound-tls", metavar="MODE", help=INBOUND_HELP),
    tls_ca_file: str = typer.Option(None, "--tls-ca-file", metavar="PEM", help="CA bundle for 'verify' ('' to clear)"),
    tls_fingerprint: str = typer.Option(None, "--tls-fingerprint", metavar="SHA256", help="Pinned fingerprint ('' to clear)"),
    tls_min_version: str = typer.Option(None, "--tls-min-version", metavar="1.2|1.3"),
    on_unreachable: str = typer.Option(None, "--on-unreachable", metavar="spool|defer", help=UNREACHABLE_HELP),
    org: str = typer.Option(None, "--org", metavar="ORG", help=ORG_HELP + " ('' for none)"),
) -> None:
    """Change a domain's settings; running gateways apply it to the next transaction."""
    changes = dict(servers=server or None, downstream_tls=downstream_tls, inbound_tls=inbound_tls,
                   tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, tls_min_version=tls_min_version,
                   on_unreachable=on_unreachable, org=org)
    before, after = run(with_store(lambda store: svc.update_domain(store, domain, actor=Actor.cli(), **changes)))
    changed = {k: (v, after.as_dict()[k]) for k, v in before.as_dict().items() if after.as_dict()[k] != v}
    if not changed:
        console.print(f"{after.name}: nothing changed")
    for key, (old, new) in changed.items():
        console.print(f"{after.name}: {key}: {old} → {new}", highlight=False)


@domain_app.command("list")
@handle_errors
def list_(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List served domains."""
    views = run(with_store(lambda store: svc.list_domains(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in views], indent=2))
        return
    table = Table(title="Served domains")
    for col in ("domain", "downstream servers", "downstream TLS", "inbound TLS", "organization"):
        table.add_column(col)
    for v in views:
        table.add_row(v.name, "\n".join(v.servers), v.downstream_tls, v.inbound_tls, v.org or "-")
    console.print(table)


@domain_app.command("show")
@handle_errors
def show(domain: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one domain's settings."""
    view = run(with_store(lambda store: svc.get_domain(store, domain, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps(view.as_dict(), indent=2))
    else:
        _print_domain(view)


@domain_app.command("remove")
@handle_errors
def remove(domain: str = typer.Argument(...)) -> None:
    """Stop serving a domain (its mail is refused with 550 5.7.1 from the next transaction)."""
    view = run(with_store(lambda store: svc.remove_domain(store, domain, actor=Actor.cli())))
    console.print(f"Removed {view.name}")


@domain_app.command("test")
@handle_errors
def test(domain: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Connect to each downstream server now: STARTTLS, certificate, and what the policy would do."""
    from mxguard.services.probe import probe_domain

    s = settings()

    async def probe(store):
        view = await svc.get_domain(store, domain, actor=Actor.cli())
        return await probe_domain(view, s.downstream, s.hostname)

    result = run(with_store(probe))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    console.print(f"{result.domain}: downstream TLS {result.downstream_tls} → {result.route_outcome}", highlight=False)
    for p in result.servers:
        console.print(f"\n[bold]{p.server}[/bold]", highlight=False)
        rows = [("reachable", "yes" if p.reachable else "no"), ("STARTTLS offered", "yes" if p.starttls_offered else "no"),
                ("negotiated", f"{p.tls_version or '-'} {p.cipher or ''}")]
        if p.certificate:
            c = p.certificate
            rows += [("subject", c.subject), ("SANs", ", ".join(c.sans) or "-"), ("issuer", c.issuer),
                     ("expires", f"{c.not_after} ({c.days_left} days)"), ("SHA-256", c.sha256)]
        verifies = "-" if p.verified is None else ("yes" if p.verified else f"no: {p.verify_error}")
        rows += [("verifies", verifies), ("policy would", f"{p.policy_outcome}: {p.policy_detail}")]
        if p.fingerprint_match is not None:
            rows.append(("pinned fingerprint", "matches" if p.fingerprint_match else "does not match"))
        if p.error:
            rows.append(("error", p.error))
        for key, value in rows:
            console.print(f"  {key:>18}  {value}", highlight=False)
