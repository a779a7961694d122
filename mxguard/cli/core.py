"""``init``, ``serve`` and ``log``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mxguard.cli.common import console, err_console, handle_errors, run, settings, state, with_store
from mxguard.errors import ConfigError
from mxguard.gateway import Gateway
from mxguard.netaddr import has_port, parse_host_port
from mxguard.services.setup import hostname_warning, initialize
from mxguard.supervisor import run_workers, worker_count
from mxguard.storage.messagelog import entry_as_dict, recent


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("serve")(serve)
    app.command("log")(log_command)


@handle_errors
def init(
    hostname: str = typer.Option(None, "--hostname", show_default=False, metavar="NAME",
                                 help="Gateway host name (greeting, Received, certificate) (default: this host's FQDN)"),
    database_url: str = typer.Option(None, "--database-url", show_default=False, metavar="URL",
                                     help="postgresql+asyncpg://user:pass@host/db (default: SQLite in the data dir)"),
    new_sealing_key: bool = typer.Option(
        False, "--new-sealing-key",
        help="Make a new sealing key although keys/sealing.keys is missing from a database that holds data: "
             "mail and keys sealed with the lost key stay unreadable. Restore the file instead if you can"),
) -> None:
    """Create the data dir: settings, self-signed certificate, sealing key, database schema.

    Run on an existing data dir it only migrates the schema. It refuses to make a new sealing
    key while the database was initialised before (restore keys/sealing.keys from the backup).
    A failed init removes whatever it had created.
    """
    s, created = run(initialize(state.data_dir, hostname=hostname, database_url=database_url,
                                new_sealing_key=new_sealing_key))
    warning = hostname_warning(s.hostname)
    if warning:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False, soft_wrap=True)
    if created:
        console.print(f"Initialised [bold]{state.data_dir}[/bold] for [bold]{s.hostname}[/bold]")
        console.print(f"  settings     {state.data_dir / 'mxguard.toml'}")
        console.print(f"  certificate  {s.path(s.tls.cert_file)} (self-signed ECDSA P-256; replace with a CA-signed one)")
        console.print(f"  sealing key  {s.path(s.sealing_key_file)}")
        console.print(f"  database     {s.effective_database_url.split('@')[-1]}")
        console.print("Next: mxguard domain add example.com --server mail.example.com:25")
    else:
        console.print(f"{state.data_dir} is already initialised; database schema is up to date.")


@handle_errors
def serve(
    smtp: list[str] = typer.Option(None, "--smtp", show_default=False, metavar="HOST:PORT",
                                   help="Inbound SMTP listener(s) (default: smtp.listen in mxguard.toml)"),
    web: str = typer.Option(None, "--web", show_default=False, metavar="HOST:PORT",
                            help="Administration Console and REST API over HTTPS (default: web.listen, 127.0.0.1:8443)"),
    web_plain_http: bool = typer.Option(None, "--web-plain-http",show_default=False, 
                                        help="Serve the console over plain HTTP: only behind a TLS-terminating proxy"),
    no_web: bool = typer.Option(False, "--no-web", help="Do not serve the console and API"),
    workers: int = typer.Option(None, "--workers", show_default=False, min=0, max=64, metavar="N",
                                help="Gateway processes sharing the SMTP listeners; 0 = one per CPU, 1 = a "
                                     "single process (default: smtp.workers, 0; one process when log.file is set)"),
) -> None:
    """Run the gateway: inbound SMTP with STARTTLS, in-line relay to the downstream servers, and the console."""
    s = settings()
    for endpoint in smtp or []:
        _check_endpoint("--smtp", endpoint, "127.0.0.1:25")
    if web:
        _check_endpoint("--web", web, "127.0.0.1:8443")
    web_listen = None if no_web or (not s.web.enabled and not web) else (web or s.web.listen)
    if web_listen:
        try:
            parse_host_port(web_listen, default_port=8443, allow_zero=True)
        except ValueError as exc:
            raise ConfigError(f"--web: {exc}") from None
    plain = s.web.plain_http if web_plain_http is None else web_plain_http
    if plain:
        s.web.plain_http = True
    workers = worker_count(s.smtp.workers if workers is None else workers, log_file=bool(s.log.file))
    if workers > 1:
        raise typer.Exit(run_workers(s, workers, smtp or None, web_listen, plain))
    run(Gateway(s, smtp_listen=smtp or None, web_listen=web_listen, web_plain_http=plain).run_forever())


def _check_endpoint(option: str, endpoint: str, example: str) -> None:
    """A listener given on the command line names its port: ``--smtp 127.0.0.1`` silently
    meaning port 25 surprised operators.

    Raises:
        ConfigError: the endpoint is malformed or has no port (the message names ``option``).
    """
    try:
        parse_host_port(endpoint, default_port=0, allow_zero=True)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if not has_port(endpoint):
        raise ConfigError(f"{option} {endpoint}: give the port too, e.g. {option} {example}")


@handle_errors
def log_command(
    last: int = typer.Option(20, "--last", min=1, max=100000, metavar="N", help="How many transactions"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per transaction, one per line"),
) -> None:
    """Show the newest transactions of the message log."""
    rows = run(with_store(lambda store: recent(store, last)))
    if as_json:
        for row in rows:
            typer.echo(json.dumps(entry_as_dict(row), default=str))
        return
    table = Table(title=f"Message log (last {len(rows)})", show_lines=False)
    for col in ("time", "client", "TLS in", "from", "to", "downstream", "TLS out", "disposition", "reply", "ms"):
        table.add_column(col, overflow="fold")
    for r in rows:
        tls_out = "-" if r.downstream_tls is None else (
            f"{r.downstream_tls_version}{' ✓' if r.downstream_verified else ''}" if r.downstream_tls else "none")
        table.add_row(
            r.ts.strftime("%Y-%m-%d %H:%M:%S"), r.client_ip, r.tls_version or "none", r.mail_from or "<>",
            r.rcpt_to.replace(" ", "\n"), r.downstream_host or "-", tls_out, r.disposition, r.final_reply,
            f"{r.total_ms:.1f}" if r.total_ms is not None else "")
    console.print(table)
