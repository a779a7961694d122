"""The ``mxguard`` command line (typer).

Every command calls the same service functions the web console uses. Errors an
operator can fix are printed as one line and the exit status is non-zero; no
stack trace reaches the terminal.
"""

from __future__ import annotations

import sys

import typer

from mxguard.cli import common
from mxguard.cli.core import register as register_core
from mxguard.cli.demo import register as register_demo
from mxguard.cli.destination_tls import destination_tls_app
from mxguard.cli.doctor import register as register_doctor
from mxguard.cli.domain import domain_app
from mxguard.cli.filters import register as register_filters
from mxguard.cli.relay import relay_app
from mxguard.cli.sink import register as register_sink
from mxguard.cli.spool import keys_app, spool_app
from mxguard.cli.tenancy import apikey_app, org_app, user_app
from mxguard.cli.tls import tls_app
from mxguard.cli.tlsrpt import tls_report_app

app = typer.Typer(
    name="mxguard",
    help="Inbound email protection gateway: STARTTLS front door, in-line proxy to your mail server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    data_dir: str = typer.Option(None, "--data-dir", show_default=False, metavar="DIR",
                                 help="Data directory (default: $MXGUARD_DATA_DIR, else ./mxguard-data)"),
) -> None:
    common.state.data_dir_option = data_dir


register_core(app)
app.add_typer(domain_app, name="domain")
register_filters(app)
app.add_typer(spool_app, name="spool")
app.add_typer(keys_app, name="keys")
app.add_typer(org_app, name="org")
app.add_typer(user_app, name="user")
app.add_typer(apikey_app, name="apikey")
app.add_typer(tls_app, name="tls")
app.add_typer(relay_app, name="relay")
# The same commands under ``relay`` too, where the outbound story is (``mxguard relay destination-tls``).
relay_app.add_typer(destination_tls_app, name="destination-tls")
app.add_typer(destination_tls_app, name="destination-tls")
app.add_typer(tls_report_app, name="tls-report")
app.add_typer(tls_report_app, name="tlsrpt", help="The same as tls-report.")
register_demo(app)
register_doctor(app)
register_sink(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - no stack trace reaches a user, whatever the command hit
        # Known errors were turned into messages by each command; this is a defect, named in one line.
        print(f"error: unexpected {type(exc).__name__}: {exc} (a defect in mxguard: please report it "
              "with the command you ran)", file=sys.stderr)
        sys.exit(1)
