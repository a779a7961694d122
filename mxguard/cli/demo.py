"""``mxguard demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from mxguard.cli.common import console, handle_errors, run


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@handle_errors
def demo(
    corpus: Path = typer.Option(None, "--corpus", show_default=False, metavar="DIR", exists=True, file_okay=False,
                                help="Send every file under DIR (any depth) instead of the built-in messages"),
    keep_running: bool = typer.Option(False, "--keep-running", help="Keep the gateway up after sending, until Ctrl-C"),
) -> None:
    """Run the gateway on loopback with its own downstream servers and show what it does with real mail."""
    from mxguard.demo import run_demo

    status = run(run_demo(corpus=corpus, keep_running=keep_running, console=console))
    raise typer.Exit(status)
