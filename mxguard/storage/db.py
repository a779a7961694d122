"""The database engine: embedded SQLite by default, PostgreSQL (asyncpg) for several nodes.

SQLite runs in WAL mode with ``synchronous=FULL`` so that a committed spool
record survives power loss; PostgreSQL commits are durable by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from mxguard.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: The newest migration's ``revision`` (``migrations/versions``). A database already at it
#: starts without importing alembic (about 11 MB in every gateway process); a test checks
#: this against alembic's own head, so a new migration must update it.
SCHEMA_HEAD = "0016_ids_never_reused"

#: Alembic's bookkeeping table (its default name).
_VERSION_TABLE = "alembic_version"


class SchemaError(Exception):
    """Alembic could not bring the schema to the head (e.g. the database has a revision this
    version does not know)."""


def current_revisions(connection) -> list[str]:
    """The schema revisions the database records (empty: never initialised).

    Args:
        connection: a synchronous SQLAlchemy ``Connection`` (inside ``run_sync``).

    Read with plain SQL from alembic's version table, so that a start needs no alembic.
    """
    if not inspect(connection).has_table(_VERSION_TABLE):
        return []
    return list(connection.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars())


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


#: No text column stores these: NUL (PostgreSQL refuses it outright) and lone surrogates
#: (undecodable bytes kept by ``surrogateescape``; neither driver can encode them).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value`` with every string made storable: NUL and lone surrogates become U+FFFD.

    Walks tuples, lists and dict values (rows of an executemany, JSON data);
    copy-on-write: the very same object comes back when nothing needed a change.
    """
    if isinstance(value, str):
        if value.isascii():
            return value.replace("\x00", "\ufffd") if "\x00" in value else value
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if isinstance(value, (tuple, list)):
        cleaned = [storable(v) for v in value]
        return value if all(c is v for c, v in zip(cleaned, value)) else type(value)(cleaned)
    if isinstance(value, dict):
        changed = {k: c for k, v in value.items() if (c := storable(v)) is not v}
        return {**value, **changed} if changed else value
    return value


def _storable_parameters(conn, cursor, statement, parameters, context, executemany):
    """Every string bound to a statement becomes storable: NUL and lone surrogates turn into U+FFFD.

    One place for the whole class: a NUL typed into a search field or a form
    used to make PostgreSQL refuse the statement (a 500 and a dropped
    connection), where SQLite stored it; now both store and match U+FFFD.
    The parameters' shape varies (one row, many rows, one flattened
    insertmanyvalues batch), so it is walked rather than assumed.
    """
    return statement, storable(parameters)


def make_engine(url: str) -> AsyncEngine:
    """Create the async engine for ``url``.

    Accepts ``sqlite+aiosqlite:///PATH`` and ``postgresql+asyncpg://...``
    (``postgresql://`` is taken to mean asyncpg).

    Raises:
        ConfigError: the URL does not parse or names an unsupported driver.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url: cannot parse {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
        engine = create_async_engine(parsed, pool_size=10, max_overflow=20, pool_pre_ping=True)
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        raise ConfigError(f"database_url: unsupported database {backend!r}; use sqlite+aiosqlite or postgresql+asyncpg")
    event.listen(engine.sync_engine, "before_cursor_execute", _storable_parameters, retval=True)
    return engine


def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


class Store:
    """Owns the engine and hands out sessions.

    Usage::

        store = Store(url)
        await store.migrate()
        async with store.session() as s: ...
        await store.close()
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent).

        Raises:
            ConfigError: the database cannot be reached.
        """
        def upgrade(connection) -> None:
            if current_revisions(connection) == [SCHEMA_HEAD]:
                return  # the usual start: nothing to do, and alembic stays unimported
            from alembic import command
            from alembic.util.exc import CommandError

            try:
                command.upgrade(_alembic_config(connection), "head")
            except CommandError as exc:
                raise SchemaError(str(exc)) from None

        async with self.connection_errors():
            async with self.engine.begin() as conn:
                await conn.run_sync(upgrade)

    @property
    def display_name(self) -> str:
        """The database for messages: an SQLite file's path, else the URL without its password."""
        return self.describe_url(self.url)

    @staticmethod
    def describe_url(url: str) -> str:
        """``url`` for messages: an SQLite file's path, else the URL without its password."""
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return parsed.database or ":memory:"
        return parsed.render_as_string(hide_password=True)

    @contextlib.asynccontextmanager
    async def connection_errors(self):
        """Turn a database that cannot be reached or used into a one-line ConfigError.

        Raises:
            ConfigError: naming ``database_url``, the database and the cause (unreachable,
                refused login, not a database at all, a schema revision this version does
                not know).
        """
        try:
            yield
        except (OperationalError, OSError, asyncio.TimeoutError) as exc:
            raise ConfigError(f"database_url: cannot reach the database {self.display_name}: {_short(exc)}") from None
        except (DBAPIError, SchemaError) as exc:
            # e.g. "file is not a database" (a damaged or foreign SQLite file), a refused login
            raise ConfigError(f"database_url: cannot use the database {self.display_name}: {_short(exc)}") from None

    async def has_schema(self) -> bool:
        """True when the database was initialised before (it has a schema revision).

        Raises:
            ConfigError: the database cannot be reached or used (see :meth:`connection_errors`).
        """
        async with self.connection_errors():
            async with self.engine.connect() as conn:
                return bool(await conn.run_sync(current_revisions))

    async def schema_is_current(self) -> bool:
        """True when the database is at the newest migration."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(current_revisions) == [SCHEMA_HEAD]

    async def ping(self) -> None:
        """Run ``SELECT 1``. Raises SQLAlchemyError when the database is down."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()


def _short(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc)
    return text_.splitlines()[0] if text_ else type(exc).__name__


__all__ = ["Store", "make_engine", "storable", "current_revisions", "SCHEMA_HEAD", "SchemaError",
           "AsyncSession", "SQLAlchemyError"]
