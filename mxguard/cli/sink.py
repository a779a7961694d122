"""``mxguard sink``: the package's small downstream server, for trying a set-up and for tests."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer

from mxguard.cli.common import console, handle_errors
from mxguard.netaddr import parse_host_port


def register(app: typer.Typer) -> None:
    app.command("sink", hidden=False)(sink)


@handle_errors
def sink(
    listen: str = typer.Option("127.0.0.1:2526", "--listen", metavar="HOST:PORT"),
    tls_cert: Path = typer.Option(None, "--tls-cert", show_default=False, help="Offer STARTTLS with this PEM certificate"),
    tls_key: Path = typer.Option(None, "--tls-key", show_default=False, help="Key for --tls-cert"),
    require_tls: bool = typer.Option(False, "--require-tls", help="Refuse mail before STARTTLS"),
    outdir: Path = typer.Option(None, "--outdir", show_default=False, help="Write each message as NNNNN.eml + NNNNN.json"),
) -> None:
    """Run a test downstream mail server that records what it receives (not for production)."""
    from mxguard.sink import DownstreamSink
    from mxguard.tls.contexts import server_context

    host, port = parse_host_port(listen, default_port=25)
    ctx = server_context(tls_cert, tls_key) if tls_cert else None

    async def main() -> None:
        s = DownstreamSink(host, port, tls_context=ctx, require_tls=require_tls, outdir=outdir)
        await s.start()
        console.print(f"sink listening on {s.address} (STARTTLS {'on' if ctx else 'off'})", highlight=False)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await s.stop()

    asyncio.run(main())
