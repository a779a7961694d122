"""Every command's ``--help`` as an operator reads it on an 80-column terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import typer.main

from mxguard.cli import app

MXGUARD = str(Path(sys.executable).with_name("mxguard"))


def all_commands() -> list[list[str]]:
    """Every command path of the program, e.g. ``[]``, ``["domain"]``, ``["domain", "add"]``."""
    paths: list[list[str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        paths.append(path)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
    walk(typer.main.get_command(app), [])
    return paths


def test_every_help_fits_80_columns_and_shows_no_none_default():
    paths = all_commands()
    assert len(paths) > 30 and ["domain", "add"] in paths and ["serve"] in paths
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    for path in paths:
        out = subprocess.run([MXGUARD, *path, "--help"], capture_output=True, text=True,
                             env=env, timeout=60)
        assert out.returncode == 0, (path, out.stderr)
        assert "[default: None]" not in out.stdout, path
        assert "Usage: mxguard" in out.stdout, path
        widest = max(len(line) for line in out.stdout.splitlines())
        assert widest <= 80, (path, widest)
