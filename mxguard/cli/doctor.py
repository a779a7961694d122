"""``mxguard doctor``: find existing data that breaks the tenancy rules."""

from __future__ import annotations

import json

import typer

from mxguard.cli.common import console, handle_errors, run, with_store
from mxguard.services.tenancy import find_violations


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


@handle_errors
def doctor(as_json: bool = typer.Option(False, "--json", help="One JSON object per problem, one per line")) -> None:
    """List users and domains that break the tenancy rules (exit 1 when there is one).

    A Message Center user whose address is not in one of their organization's domains, an
    org-admin whose address is in another organization's domain, and domains of different
    organizations that are the same or sub/parent domains of each other.
    """
    problems = run(with_store(find_violations))
    for p in problems:
        if as_json:
            typer.echo(json.dumps({"kind": p.kind, "target": p.target, "problem": p.problem}))
        else:
            console.print(f"{p.kind:6} {p.target}: {p.problem}", highlight=False, soft_wrap=True)
    if not problems and not as_json:
        console.print("No tenancy problems found.")
    raise typer.Exit(1 if problems else 0)
