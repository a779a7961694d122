"""Helpers shared by CLI commands: data-dir state, error handling, running coroutines."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from mxguard.config import Settings, load_settings, resolve_data_dir
from mxguard.errors import ConfigError, MxguardError, ValidationFailed
from mxguard.logsetup import configure_from_settings as configure_logging
from mxguard.storage.db import SQLAlchemyError, Store

console = Console()
if not console.is_terminal:
    # Piped or redirected: rich would wrap tables at 80 columns; operators pipe to less and grep.
    console = Console(width=200)
err_console = Console(stderr=True)
T = TypeVar("T")


@dataclass
class CliState:
    data_dir_option: str | None = None

    @property
    def data_dir(self) -> Path:
        return resolve_data_dir(self.data_dir_option)


state = CliState()


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., T]) -> Callable[..., T]:
    """Turn mxguard errors into one-line messages with exit status 2 (config) or 1."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), 2)
        except ValidationFailed as exc:
            fail(str(exc), 2)
        except MxguardError as exc:
            fail(str(exc), 1)
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), 1)
        except SQLAlchemyError as exc:
            # Migration catches what it sees at start; this is for a database damaged later.
            fail(f"database_url: the database {_database_name()} failed: {_short_db_error(exc)}", 1)
    return wrapper


def _database_name() -> str:
    try:
        return Store.describe_url(load_settings(state.data_dir).effective_database_url)
    except Exception:  # noqa: BLE001 - only for an error message
        return "of the data dir"


def _short_db_error(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion."""
    return asyncio.run(coro)


def settings() -> Settings:
    """The settings of the selected data dir (ConfigError if it is not initialised)."""
    s = load_settings(state.data_dir)
    configure_logging(s)
    return s


async def with_store(func: Callable[[Store], Awaitable[T]]) -> T:
    """Open the data dir's database (migrating it if needed), run ``func``, close."""
    s = settings()
    store = Store(s.effective_database_url)
    try:
        await store.migrate()
        return await func(store)
    finally:
        await store.close()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
