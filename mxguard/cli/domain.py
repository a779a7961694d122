"""``mxguard domain add|list|show|set|remove|test|mta-sts|dns-check|partner|dkim``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from mxguard.cli.common import console, err_console, handle_errors, run, settings, with_store
from mxguard.errors import ValidationFailed
from mxguard.services import domains as svc
from mxguard.services.access import Actor

domain_app = typer.Typer(help="Served domains, their downstream servers and TLS policy.", no_args_is_help=True)

SERVER_HELP = "Downstream server HOST[:PORT] (port 25 by default); repeat for failover, in order"
DOWNSTREAM_HELP = ("TLS to the downstream server: off | opportunistic | required | verify | dane | dane-only | mta-sts "
                   "(default: opportunistic)")
INBOUND_HELP = "TLS from senders: optional | required (530 5.7.0 without STARTTLS) (default: optional)"
UNREACHABLE_HELP = "Every server down: spool (accept, hold sealed, deliver later) | defer (451 4.4.1) (default: spool)"
ORG_HELP = "Owning organization (its org-admins manage the domain)"
JUNK_Q_HELP = ("Junk score at or above which mail is quarantined, on the junk engine's own scale; "
               "'off' = the engine's own spam verdict (default)")
JUNK_R_HELP = "Junk score at or above which mail is refused (550 5.7.1); 'off' = never (default)"
JUNK_T_HELP = "Junk score at or above which mail is delivered with X-Spam-Flag and a [SPAM] subject; 'off' (default)"
VIRUS_HELP = "What a virus gets: reject (554 5.7.1, default) | quarantine"
FAILURE_HELP = "When an engine is down or too slow: defer (451 4.3.0, default) | tag (deliver marked unscanned)"
SUMMARY_INTERVAL_HELP = "Hours between quarantine summaries to each recipient (0: none; default 24)"
SUMMARY_HOUR_HELP = "Hour of day (UTC, 0-23) a daily summary goes out (default 8)"
BLOCK_HELP = "Mail from a sender on a recipient's block list: quarantine (default) | reject (550 5.7.1)"
CRL_HELP = ("CRL (PEM) of the downstream certificate's issuer for 'verify' by CA chain: a listed "
            "certificate is refused (451 4.7.5, nothing sent)")
RULES_HELP = "Attachment rules as a JSON list, or @FILE holding one (see the README); replaces the list"


def _rules_arg(value: str | None) -> str | None:
    """``@FILE`` reads the rules from a file; anything else is the JSON itself."""
    if value and value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValidationFailed("attachment_rules", f"cannot read {value[1:]}: {reason}") from None
    return value


def _filter_options(junk_quarantine, junk_reject, junk_tag, virus_action, engine_failure, attachment_rules,
                    summary_interval=None, summary_hour=None, block_action=None) -> dict:
    return dict(junk_quarantine=junk_quarantine, junk_reject=junk_reject, junk_tag=junk_tag,
                virus_action=virus_action, engine_failure=engine_failure,
                attachment_rules=_rules_arg(attachment_rules), summary_interval=summary_interval,
                summary_hour=summary_hour, block_action=block_action)


def _print_domain(view: svc.DomainView) -> None:
    for key, value in view.as_dict().items():
        if key == "attachment_rules":
            value = "; ".join(f"{r['name']} -> {r['action']}" for r in value) or "(none)"
        elif key.startswith("junk_") and value is None:
            value = "off" if key != "junk_quarantine" else "engine verdict"
        elif isinstance(value, list):
            value = ", ".join(value)
        console.print(f"[bold]{key:>16}[/bold]  {value if value is not None else '-'}", highlight=False)


@domain_app.command("add")
@handle_errors
def add(
    domain: str = typer.Argument(..., show_default=False, help="The domain, e.g. example.com"),
    server: list[str] = typer.Option(..., "--server", show_default=False, metavar="HOST[:PORT]", help=SERVER_HELP),
    downstream_tls: str = typer.Option(None, "--downstream-tls", show_default=False, metavar="MODE", help=DOWNSTREAM_HELP),
    inbound_tls: str = typer.Option(None, "--inbound-tls", show_default=False, metavar="MODE", help=INBOUND_HELP),
    tls_ca_file: str = typer.Option(None, "--tls-ca-file", show_default=False, metavar="PEM", help="CA bundle for 'verify' (default: system trust store)"),
    tls_fingerprint: str = typer.Option(None, "--tls-fingerprint", show_default=False, metavar="SHA256", help="Pinned SHA-256 certificate fingerprint for 'verify'"),
    tls_min_version: str = typer.Option(None, "--tls-min-version", show_default=False, metavar="1.2|1.3", help="Lowest downstream TLS version (default: 1.2)"),
    tls_crl_file: str = typer.Option(None, "--tls-crl-file", show_default=False, metavar="CRL", help=CRL_HELP),
    on_unreachable: str = typer.Option(None, "--on-unreachable", show_default=False, metavar="spool|defer", help=UNREACHABLE_HELP),
    org: str = typer.Option(None, "--org", show_default=False, metavar="ORG", help=ORG_HELP),
    junk_quarantine: str = typer.Option(None, "--junk-quarantine", show_default=False, metavar="SCORE", help=JUNK_Q_HELP),
    junk_reject: str = typer.Option(None, "--junk-reject", show_default=False, metavar="SCORE", help=JUNK_R_HELP),
    junk_tag: str = typer.Option(None, "--junk-tag", show_default=False, metavar="SCORE", help=JUNK_T_HELP),
    virus_action: str = typer.Option(None, "--virus-action", show_default=False, metavar="ACTION", help=VIRUS_HELP),
    engine_failure: str = typer.Option(None, "--engine-failure", show_default=False, metavar="ACTION", help=FAILURE_HELP),
    attachment_rules: str = typer.Option(None, "--attachment-rules", show_default=False, metavar="JSON|@FILE", help=RULES_HELP),
    summary_interval: int = typer.Option(None, "--summary-interval", show_default=False, metavar="HOURS", help=SUMMARY_INTERVAL_HELP),
    summary_hour: int = typer.Option(None, "--summary-hour", show_default=False, metavar="HOUR", help=SUMMARY_HOUR_HELP),
    block_action: str = typer.Option(None, "--block-action", show_default=False, metavar="ACTION", help=BLOCK_HELP),
) -> None:
    """Serve a domain: accept its mail and relay it to its downstream server(s)."""
    filters = _filter_options(junk_quarantine, junk_reject, junk_tag, virus_action, engine_failure, attachment_rules,
                              summary_interval, summary_hour, block_action)
    view = run(with_store(lambda store: svc.add_domain(
        store, domain, server, actor=Actor.cli(), org=org, downstream_tls=downstream_tls, inbound_tls=inbound_tls,
        tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, tls_min_version=tls_min_version,
        tls_crl_file=tls_crl_file, on_unreachable=on_unreachable, **filters)))
    console.print(f"Added {view.name} → {', '.join(view.servers)} (downstream TLS {view.downstream_tls}, "
                  f"inbound TLS {view.inbound_tls})", highlight=False)
    if not org:
        err_console.print(f"note: {view.name} has no organization: its recipients cannot use the Message Center "
                          f"until it has one (mxguard domain set {view.name} --org ORG)", highlight=False, soft_wrap=True)
    _warn_undeliverable(view)


@domain_app.command("set")
@handle_errors
def set_(
    domain: str = typer.Argument(..., show_default=False),
    server: list[str] = typer.Option(None, "--server", show_default=False, metavar="HOST[:PORT]", help=SERVER_HELP + " (replaces the list)"),
    downstream_tls: str = typer.Option(None, "--downstream-tls", show_default=False, metavar="MODE", help=DOWNSTREAM_HELP),
    inbound_tls: str = typer.Option(None, "--inbound-tls", show_default=False, metavar="MODE", help=INBOUND_HELP),
    tls_ca_file: str = typer.Option(None, "--tls-ca-file", show_default=False, metavar="PEM", help="CA bundle for 'verify' ('' to clear)"),
    tls_fingerprint: str = typer.Option(None, "--tls-fingerprint", show_default=False, metavar="SHA256", help="Pinned fingerprint ('' to clear)"),
    tls_min_version: str = typer.Option(None, "--tls-min-version", show_default=False, metavar="1.2|1.3"),
    tls_crl_file: str = typer.Option(None, "--tls-crl-file", show_default=False, metavar="CRL", help=CRL_HELP + " ('' to clear)"),
    on_unreachable: str = typer.Option(None, "--on-unreachable", show_default=False, metavar="spool|defer", help=UNREACHABLE_HELP),
    org: str = typer.Option(None, "--org", show_default=False, metavar="ORG", help=ORG_HELP + " ('' for none)"),
    junk_quarantine: str = typer.Option(None, "--junk-quarantine", show_default=False, metavar="SCORE", help=JUNK_Q_HELP),
    junk_reject: str = typer.Option(None, "--junk-reject", show_default=False, metavar="SCORE", help=JUNK_R_HELP),
    junk_tag: str = typer.Option(None, "--junk-tag", show_default=False, metavar="SCORE", help=JUNK_T_HELP),
    virus_action: str = typer.Option(None, "--virus-action", show_default=False, metavar="ACTION", help=VIRUS_HELP),
    engine_failure: str = typer.Option(None, "--engine-failure", show_default=False, metavar="ACTION", help=FAILURE_HELP),
    attachment_rules: str = typer.Option(None, "--attachment-rules", show_default=False, metavar="JSON|@FILE", help=RULES_HELP),
    summary_interval: int = typer.Option(None, "--summary-interval", show_default=False, metavar="HOURS", help=SUMMARY_INTERVAL_HELP),
    summary_hour: int = typer.Option(None, "--summary-hour", show_default=False, metavar="HOUR", help=SUMMARY_HOUR_HELP),
    block_action: str = typer.Option(None, "--block-action", show_default=False, metavar="ACTION", help=BLOCK_HELP),
) -> None:
    """Change a domain's settings; running gateways apply it to the next transaction."""
    changes = dict(servers=server or None, downstream_tls=downstream_tls, inbound_tls=inbound_tls,
                   tls_ca_file=tls_ca_file, tls_fingerprint=tls_fingerprint, tls_min_version=tls_min_version,
                   tls_crl_file=tls_crl_file, on_unreachable=on_unreachable, org=org,
                   **_filter_options(junk_quarantine, junk_reject, junk_tag, virus_action, engine_failure,
                                     attachment_rules, summary_interval, summary_hour, block_action))
    before, after = run(with_store(lambda store: svc.update_domain(store, domain, actor=Actor.cli(), **changes)))
    changed = {k: (v, after.as_dict()[k]) for k, v in before.as_dict().items() if after.as_dict()[k] != v}
    if not changed:
        console.print(f"{after.name}: nothing changed")
    for key, (old, new) in changed.items():
        console.print(f"{after.name}: {key}: {old} → {new}", highlight=False)
    _warn_undeliverable(after)


def _warn_undeliverable(view) -> None:
    """``dane-only`` needs TLSA records, which only host names have (RFC 7672 2.2): a route of
    addresses only can never deliver (every message ``451 4.7.5``). Allowed, but said."""
    from mxguard.netaddr import is_ip_address, parse_host_port

    def is_address(server: str) -> bool:
        try:
            return is_ip_address(parse_host_port(server, default_port=25)[0])
        except ValueError:
            return False

    if view.downstream_tls == "dane-only" and all(is_address(s) for s in view.servers):
        err_console.print(f"warning: {view.name} is dane-only but its servers are all addresses, which have no "
                          "TLSA records: every delivery will defer with 451 4.7.5 until a server is given by "
                          "host name", highlight=False, soft_wrap=True)
    for server in view.servers:
        if _is_own_listener(server):
            err_console.print(f"warning: {view.name}'s server {server} is this gateway's own SMTP listener: its mail "
                              "would loop and is refused with 554 5.4.6", highlight=False, soft_wrap=True)


def _is_own_listener(server: str) -> bool:
    """True when ``server`` (``HOST[:PORT]``) is one of the gateway's own SMTP listeners: the same
    address, or a loopback address, ``localhost`` or the gateway's host name on a listener's port
    (a wildcard listener also answers there). Unreadable entries are not the gateway's."""
    import ipaddress

    from mxguard.errors import MxguardError
    from mxguard.netaddr import parse_host_port

    try:
        s = settings()
        host, port = parse_host_port(server, default_port=25)
        listeners = [parse_host_port(x, default_port=25) for x in s.smtp.listen]
    except (MxguardError, ValueError):
        return False
    host = host.lower().rstrip(".")
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host in ("localhost", s.hostname.lower().rstrip("."))
    for listen_host, listen_port in listeners:
        if port != listen_port:
            continue
        if host == listen_host.lower() or (local and listen_host in ("0.0.0.0", "::", "")):
            return True
    return False


@domain_app.command("list")
@handle_errors
def list_(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List served domains."""
    views = run(with_store(lambda store: svc.list_domains(store, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in views], indent=2))
        return
    table = Table(title="Served domains")
    for col in ("domain", "downstream servers", "downstream TLS", "inbound TLS", "junk tag/quar./reject", "virus",
                "engine down", "organization"):
        table.add_column(col)

    def score(value, default):
        return default if value is None else f"{value:g}"

    for v in views:
        junk = f"{score(v.junk_tag, 'off')} / {score(v.junk_quarantine, 'engine')} / {score(v.junk_reject, 'off')}"
        table.add_row(v.name, "\n".join(v.servers), v.downstream_tls, v.inbound_tls, junk, v.virus_action,
                      v.engine_failure, v.org or "-")
    console.print(table)


@domain_app.command("show")
@handle_errors
def show(domain: str = typer.Argument(..., show_default=False), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one domain's settings, and per server which source decides its TLS policy now
    (the setting, DANE, MTA-STS) with the TLSA records or MTA-STS policy found (DNS and the
    policy fetch only; no SMTP connection)."""
    from mxguard.services.probe import effective_policy

    view = run(with_store(lambda store: svc.get_domain(store, domain, actor=Actor.cli())))
    policy = run(effective_policy(view, settings().downstream))
    if as_json:
        typer.echo(json.dumps({**view.as_dict(), "tls_policy": policy.as_dict()}, indent=2))
        return
    _print_domain(view)
    _print_tls_policy(policy)


def _print_tls_policy(policy) -> None:
    """The effective TLS policy block of ``domain show`` and ``domain test``."""
    console.print("\n[bold]effective TLS policy[/bold] (RFC 7672 DANE, RFC 8461 MTA-STS, RFC 8689 REQUIRETLS)",
                  highlight=False)
    if policy.mta_sts is not None:
        sts = policy.mta_sts
        if "error" in sts:
            line = f"no policy ({sts['result_type']}: {sts['error']})"
        elif sts.get("none"):
            line = "the domain publishes no MTA-STS policy"
        else:
            line = f"id {sts['id']}, mode {sts['mode']}, mx {', '.join(sts['mx'])}, max_age {sts['max_age']} s"
        console.print(f"  {'MTA-STS policy':>18}  {line}", highlight=False)
    for s in policy.servers:
        console.print(f"  [bold]{s.server}[/bold]", highlight=False)
        rows = [("decided by", s.source), ("means", s.meaning)]
        if s.dnssec:
            rows.append(("TLSA answer", s.dnssec))
        rows += [("TLSA", record) for record in s.tlsa]
        rows.append(("REQUIRETLS mail", s.requiretls))
        for key, value in rows:
            console.print(f"  {key:>18}  {value}", highlight=False)


@domain_app.command("remove")
@handle_errors
def remove(domain: str = typer.Argument(..., show_default=False),
           force: bool = typer.Option(False, "--force", help="Remove even while messages for it are queued in the spool.")) -> None:
    """Stop serving a domain (its mail is refused with 550 5.7.1 from the next transaction)."""
    view = run(with_store(lambda store: svc.remove_domain(store, domain, actor=Actor.cli(), force=force)))
    console.print(f"Removed {view.name}")


@domain_app.command("test")
@handle_errors
def test(domain: str = typer.Argument(..., show_default=False), as_json: bool = typer.Option(False, "--json")) -> None:
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
    if result.tls_policy is not None:
        _print_tls_policy(result.tls_policy)


STS_MODE_HELP = ("Hosted MTA-STS policy mode: off (none served) | none (policy withdrawn) | testing | enforce "
                 "(RFC 8461)")
STS_AGE_HELP = "Seconds senders keep the policy (max_age), 86400-31557600 (default 604800)"


def _print_hosted(policy) -> None:
    console.print(f"[bold]{policy.domain}[/bold]: MTA-STS mode {policy.mode}, max_age {policy.max_age} s, "
                  f"mx {', '.join(policy.mx)}", highlight=False)
    if policy.served:
        console.print(f"policy at {policy.url} (id {policy.policy_id}):", highlight=False)
        for line in policy.text.splitlines():
            console.print(f"  {line}", highlight=False, markup=False)
    else:
        console.print("no policy is served (mode off)")
    console.print("\n[bold]DNS records to publish[/bold]", highlight=False)
    for record in policy.records():
        console.print(f"  {record.line}", highlight=False, markup=False, soft_wrap=True)


@domain_app.command("mta-sts")
@handle_errors
def mta_sts(domain: str = typer.Argument(..., show_default=False),
            mode: str = typer.Option(None, "--mode", show_default=False, metavar="MODE", help=STS_MODE_HELP),
            max_age: int = typer.Option(None, "--max-age", show_default=False, metavar="SECONDS", help=STS_AGE_HELP),
            as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Show or change the MTA-STS policy the gateway hosts for a domain, and the DNS records to publish
    (a changed policy gets a new id for the _mta-sts record)."""
    from mxguard.services import hosted_sts

    s = settings()

    async def go(store):
        if mode is None and max_age is None:
            return None, await hosted_sts.get_hosted_policy(store, domain, s.mx_hosts, s.hostname, actor=Actor.cli())
        return await hosted_sts.set_hosted_policy(store, domain, s.mx_hosts, s.hostname, actor=Actor.cli(),
                                                  mode=mode, max_age=max_age)

    before, after = run(with_store(go))
    if as_json:
        typer.echo(json.dumps(after.as_dict(), indent=2))
        return
    if before is not None and before.policy_id != after.policy_id and after.served:
        err_console.print(f"note: the policy changed: publish _mta-sts.{after.domain} with id {after.policy_id}",
                          highlight=False, soft_wrap=True)
    _print_hosted(after)


@domain_app.command("dns-check")
@handle_errors
def dns_check(domain: str = typer.Argument(..., show_default=False),
              as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Look up the domain's MX, mta-sts host, _mta-sts and _smtp._tls records through the configured
    resolver and compare them with what the gateway expects (exit status 1 unless every one is ok)."""
    from mxguard.services import hosted_sts
    from mxguard.services.dns_check import check_records, settings_resolver

    s = settings()

    async def go(store):
        policy = await hosted_sts.get_hosted_policy(store, domain, s.mx_hosts, s.hostname, actor=Actor.cli())
        return await check_records(policy, settings_resolver(s))

    checks = run(with_store(go))
    if as_json:
        typer.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        table = Table(title="DNS check")
        for col in ("record", "found", "expected", "state"):
            table.add_column(col)
        for c in checks:
            colour = "green" if c.status == "ok" else "red"
            # What DNS answered is someone else's text: never rich markup.
            table.add_row(escape(f"{c.name} {c.type}"), escape("\n".join(c.found) or "-"), escape(c.expected),
                          f"[{colour}]{c.status}[/{colour}]: {escape(c.detail)}")
        console.print(table)
    if any(c.status != "ok" for c in checks):
        raise typer.Exit(1)


# -- partner TLS rules ---------------------------------------------------------------------

partner_app = typer.Typer(help="Partner TLS rules: mail from a sender domain must arrive over TLS, "
                               "optionally with a client certificate.", no_args_is_help=True)
domain_app.add_typer(partner_app, name="partner")


@partner_app.command("add")
@handle_errors
def partner_add(
    domain: str = typer.Argument(..., show_default=False, help="The served (recipient) domain"),
    sender: str = typer.Option(..., "--sender", show_default=False, metavar="DOMAIN",
                               help="Sender domain: partner.example, or *.partner.example for its sub-domains"),
    min_tls: str = typer.Option("1.2", "--min-tls", metavar="none|1.2|1.3",
                                help="Lowest TLS version ('none': TLS only as the client certificate needs it)"),
    client_cert: bool = typer.Option(False, "--client-cert", help="Require a client certificate"),
    ca_file: str = typer.Option(None, "--ca-file", show_default=False, metavar="PEM",
                                help="CA bundle the client certificate must chain to (needed with a certificate)"),
    store_ca: Path = typer.Option(None, "--store-ca", show_default=False, metavar="PEM",
                                  help="Or read this CA bundle now and keep its certificates in the database "
                                       "(every node has it; no file to keep on the gateway host)"),
    fingerprint: list[str] = typer.Option(None, "--fingerprint", show_default=False, metavar="SHA256",
                                          help="Accepted SHA-256 fingerprint of the client certificate; repeatable"),
    cert_host: str = typer.Option(None, "--cert-host", show_default=False, metavar="HOST",
                                  help="Host name the certificate must carry (SAN dNSName)"),
    crl_file: str = typer.Option(None, "--crl-file", show_default=False, metavar="CRL",
                                 help="The CA's CRL: a listed certificate is refused"),
) -> None:
    """Add a partner TLS rule: 530 5.7.0 at MAIL in clear, 550 5.7.1 at RCPT when not met."""
    from mxguard.services import partners

    ca_pem = None
    if store_ca is not None:
        try:
            ca_pem = store_ca.read_bytes()[:partners.MAX_CA_PEM_BYTES + 1].decode("utf-8", "replace")
        except OSError as exc:
            raise ValidationFailed("ca_pem", f"cannot read {store_ca}: {exc.strerror or exc}") from None
    view = run(with_store(lambda store: partners.add_rule(
        store, domain, sender, actor=Actor.cli(), min_tls=min_tls, require_cert=client_cert, ca_file=ca_file,
        ca_pem=ca_pem, fingerprints=fingerprint or [], cert_host=cert_host, crl_file=crl_file)))
    console.print(f"Added partner rule on {view.domain}: mail from {view.sender} must arrive "
                  f"{_requirement(view)}", highlight=False)


def _requirement(view) -> str:
    from mxguard.services.partners import requirement

    return requirement(view)


@partner_app.command("list")
@handle_errors
def partner_list(domain: str = typer.Argument(..., show_default=False),
                 as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List a domain's partner TLS rules."""
    from mxguard.services import partners

    views = run(with_store(lambda store: partners.list_rules(store, domain, actor=Actor.cli())))
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in views], indent=2))
        return
    if not views:
        console.print(f"{domain}: no partner rules")
        return
    table = Table("sender", "min TLS", "client cert", "CA", "fingerprints", "host", "CRL", "enabled")
    for v in views:
        ca = v.ca_file or ("stored: " + "; ".join(v.ca_subjects) if v.ca_pem else "-")
        table.add_row(escape(v.sender), v.min_tls, "yes" if v.require_cert else "no", escape(ca),
                      "\n".join(v.fingerprints) or "-", escape(v.cert_host or "-"), escape(v.crl_file or "-"),
                      "yes" if v.enabled else "no")
    console.print(table)


@partner_app.command("remove")
@handle_errors
def partner_remove(domain: str = typer.Argument(..., show_default=False),
                   sender: str = typer.Option(..., "--sender", show_default=False, metavar="DOMAIN")) -> None:
    """Remove a domain's partner TLS rule for a sender pattern."""
    from mxguard.services import partners

    view = run(with_store(lambda store: partners.remove_rule(store, domain, sender, actor=Actor.cli())))
    console.print(f"Removed partner rule on {view.domain} for {view.sender}", highlight=False)


# -- DKIM keys for outbound mail -------------------------------------------------------------

dkim_app = typer.Typer(help="DKIM keys: outbound mail from the domain is signed at delivery (RFC 6376).",
                       no_args_is_help=True)
domain_app.add_typer(dkim_app, name="dkim")


def _print_dkim(view, check=None) -> None:
    state = "active" if view.active else "inactive"
    console.print(f"{view.domain} selector {view.selector} ({view.algorithm}, {state}, "
                  f"created {view.created_at:%Y-%m-%d %H:%M} UTC)", highlight=False)
    console.print("Publish this TXT record:", highlight=False)
    # Printed without markup or wrapping: an operator pastes it into a zone file.
    typer.echo(view.zone_line)
    if check is not None:
        colour = "green" if check.status == "ok" else "red"
        console.print(f"DNS: [{colour}]{check.status}[/{colour}]: {escape(check.detail)}")


@dkim_app.command("generate")
@handle_errors
def dkim_generate(domain: str = typer.Argument(..., show_default=False, help="A served domain"),
                  selector: str = typer.Option(None, "--selector", show_default=False, metavar="S",
                                               help="The s= tag (default mxg<YYYYMM>)"),
                  algorithm: str = typer.Option("rsa", "--algorithm", metavar="rsa|ed25519",
                                                help="rsa (RSA-2048, rsa-sha256) or ed25519 (RFC 8463)")) -> None:
    """Generate a DKIM key (stored sealed), make it the domain's active key, print the DNS record."""
    from mxguard.services import dkim_keys
    from mxguard.storage.sealing import Sealer

    s = settings()
    sealer = Sealer.from_file(s.path(s.sealing_key_file))
    view = run(with_store(lambda store: dkim_keys.generate_key(store, sealer, domain, selector=selector,
                                                               algorithm=algorithm, actor=Actor.cli())))
    _print_dkim(view)
    console.print("Outbound mail from the domain is signed with this key from now on; publish the record first "
                  "if mail is already flowing.", highlight=False)


@dkim_app.command("show")
@handle_errors
def dkim_show(domain: str = typer.Argument(..., show_default=False),
              check: bool = typer.Option(False, "--check", help="Look the records up in DNS and compare"),
              as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Show a domain's DKIM keys and the TXT records to publish (with --check: what DNS says)."""
    from mxguard.services import dkim_keys
    from mxguard.services.dns_check import settings_resolver

    async def work(store):
        views = await dkim_keys.list_keys(store, domain, actor=Actor.cli())
        checks = [await dkim_keys.check_dns(v, settings_resolver(settings())) for v in views] if check else []
        return views, checks

    views, checks = run(with_store(work))
    if as_json:
        typer.echo(json.dumps([{**v.as_dict(), **({"dns": c.as_dict()} if checks else {})}
                               for v, c in zip(views, checks or [None] * len(views))], indent=2))
        return
    if not views:
        console.print(f"{domain}: no DKIM key; outbound mail goes unsigned (mxguard domain dkim generate {domain})",
                      highlight=False)
        return
    for v, c in zip(views, checks or [None] * len(views)):
        _print_dkim(v, c)
    if checks and any(c.status != "ok" for c, v in zip(checks, views) if v.active):
        raise typer.Exit(1)


@dkim_app.command("activate")
@handle_errors
def dkim_activate(domain: str = typer.Argument(..., show_default=False),
                  selector: str = typer.Option(..., "--selector", show_default=False, metavar="S")) -> None:
    """Sign outbound mail with this stored key again (the domain's other keys become inactive)."""
    from mxguard.services import dkim_keys

    view = run(with_store(lambda store: dkim_keys.activate_key(store, domain, selector, actor=Actor.cli())))
    console.print(f"DKIM key {view.selector} of {view.domain} is active: outbound mail is signed with it",
                  highlight=False)


@dkim_app.command("remove")
@handle_errors
def dkim_remove(domain: str = typer.Argument(..., show_default=False),
                selector: str = typer.Option(..., "--selector", show_default=False, metavar="S")) -> None:
    """Delete a DKIM key for good (remove its DNS record a few days later)."""
    from mxguard.services import dkim_keys

    view = run(with_store(lambda store: dkim_keys.remove_key(store, domain, selector, actor=Actor.cli())))
    console.print(f"Removed DKIM key {view.selector} of {view.domain}", highlight=False)
