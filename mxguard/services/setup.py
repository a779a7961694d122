"""``mxguard init``: create a data dir with settings, a certificate, sealing keys and the schema."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import exists, inspect, select
from sqlalchemy.engine import make_url

from mxguard.config import (CONFIG_FILE_NAME, Settings, check_host_name, describe_validation_error,
                            load_settings, render_settings_file)
from mxguard.errors import ConfigError
from mxguard.netaddr import parse_host_port
from mxguard.storage.db import Store
from mxguard.storage.models import Base
from mxguard.storage.sealing import create_key_file, ensure_secret_file
from mxguard.tls.certs import generate_self_signed, write_private


def default_hostname() -> str:
    """This machine's name for ``init`` without ``--hostname``, as ``hostname -f`` finds it.

    The canonical name of the host name (``getaddrinfo`` with ``AI_CANONNAME``), else
    ``socket.getfqdn()`` when it has a dot and is not ``localhost`` (it maps the name to an
    address and back, and a host name on 127.0.0.1 in /etc/hosts comes back as ``localhost``),
    else the host name itself; the first that is a valid host name, else ``localhost``.
    A name without a dot may well be all the machine knows of itself (a bare ``vm``):
    it is used, and :func:`hostname_warning` says to set the real one.
    """
    candidates: list[str] = []
    own = socket.gethostname()
    try:
        infos = socket.getaddrinfo(own, None, 0, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
        candidates += [info[3] for info in infos[:1] if info[3]]
    except (OSError, UnicodeError):
        pass
    fqdn = socket.getfqdn()
    if "." in fqdn and not fqdn.startswith("localhost"):
        candidates.append(fqdn)
    candidates.append(own)
    valid = []
    for name in candidates:
        try:
            valid.append(check_host_name(name))
        except ValueError:
            continue
    # A dotted name first: the canonical name may be the bare host name while getfqdn has more.
    return next((n for n in valid if "." in n and n.split(".")[0] != "localhost"), valid[0] if valid else "localhost")


def hostname_warning(hostname: str) -> str | None:
    """A warning for a gateway host name other mail servers cannot use, or None.

    The name is in the greeting, Received fields, the certificate, EHLO downstream and the
    authserv-id (RFC 8601): ``localhost`` or a name without a dot is no FQDN (RFC 5321 4.1.4).
    """
    if "." not in hostname or hostname.split(".")[0] == "localhost":
        return (f"the gateway host name is {hostname!r}, not a fully qualified domain name; set the real one "
                f"with 'mxguard init --hostname mx1.example.com' on a new data dir, or the 'hostname' key in "
                f"{CONFIG_FILE_NAME} (then replace the self-signed certificate in tls/)")
    return None


def certificate_names(settings: Settings) -> list[str]:
    """The subject alternative names of a generated certificate.

    The host name first, then ``localhost``, ``127.0.0.1`` and ``::1`` (so
    ``curl --cacert cert.pem https://127.0.0.1:8443/`` verifies), then every
    specific address or name in ``smtp.listen`` and ``web.listen`` (wildcards
    such as ``0.0.0.0`` and ``::`` name no host and are left out).

    Args:
        settings: validated settings of the data dir.

    Returns:
        Names in order, without duplicates (case-insensitive).
    """
    names = [settings.hostname, "localhost", "127.0.0.1", "::1"]
    for endpoint in [*settings.smtp.listen, settings.web.listen]:
        try:
            host, _ = parse_host_port(endpoint, default_port=25, allow_zero=True)
        except ValueError:
            continue
        try:
            if ipaddress.ip_address(host).is_unspecified:
                continue
        except ValueError:
            pass  # a host name: kept as a DNS name
        names.append(host)
    unique: dict[str, str] = {}
    for name in names:
        unique.setdefault(name.lower(), name)
    return list(unique.values())


async def initialize(data_dir: Path, *, hostname: str | None = None, database_url: str | None = None,
                     smtp_listen: list[str] | None = None, new_sealing_key: bool = False) -> tuple[Settings, bool]:
    """Create (or bring up to date) a data dir.

    A new data dir gets ``mxguard.toml``, a self-signed ECDSA P-256 certificate
    for ``hostname``, a 256-bit sealing key, a link-signing secret (files mode 0600) and the database
    schema. An existing one keeps its files; only its schema is migrated.

    A missing sealing key file is made only while the database has never been initialised:
    otherwise the spool, quarantine, SNI and DKIM keys in it are sealed with the missing key,
    and a new key would silently make them unreadable (a restore that forgot
    ``keys/sealing.keys``; the service unit runs ``init`` at every start). ``new_sealing_key``
    makes one anyway.

    If anything fails, every file and directory this call created is removed again, so
    ``init`` can simply be run again with a corrected option.

    Args:
        data_dir: the data directory (created if missing).
        hostname: the gateway's host name (None: :func:`default_hostname`); new data dirs only.
        database_url: the database (None: SQLite in the data dir); new data dirs only.
        smtp_listen: the inbound listeners; new data dirs only.
        new_sealing_key: make a new sealing key even though the database holds data.

    Returns:
        ``(settings, created)``.

    Raises:
        ConfigError: the directory cannot be written, a value is invalid, the database
            cannot be reached or is not usable, or the sealing key file is missing while
            the database was initialised before.
    """
    made: list[Path] = []  # what this call created, removed again if it fails
    try:
        return await _initialize(data_dir, made, hostname=hostname, database_url=database_url,
                                 smtp_listen=smtp_listen, new_sealing_key=new_sealing_key)
    except BaseException:
        _remove_created(made)
        raise


def _mkdir(path: Path, made: list[Path]) -> None:
    """``mkdir -p`` that records each directory it makes."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    made.extend(reversed(missing))


def _remove_created(made: list[Path]) -> None:
    """Remove files and (empty) directories in reverse order of creation; best effort."""
    for path in reversed(made):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only if empty: a directory someone else filled stays
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass


def _track_new(path: Path, made: list[Path]) -> None:
    """Make ``path``'s directory (recorded) and record ``path`` itself if it does not exist yet."""
    _mkdir(path.parent, made)
    if not path.exists():
        made.append(path)


async def _initialize(data_dir: Path, made: list[Path], *, hostname: str | None, database_url: str | None,
                      smtp_listen: list[str] | None, new_sealing_key: bool) -> tuple[Settings, bool]:
    _mkdir(data_dir, made)
    data_dir.chmod(0o700)
    config_path = data_dir / CONFIG_FILE_NAME
    created = not config_path.exists()
    if created:
        fields: dict = {"hostname": hostname or default_hostname(), "database_url": database_url or "",
                        "tls": {"extra_cert_file": "tls/rsa-cert.pem", "extra_key_file": "tls/rsa-key.pem"}}
        if smtp_listen:
            fields["smtp"] = {"listen": smtp_listen}
        try:
            settings = Settings.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, "init")) from None
        settings.data_dir = data_dir
    else:
        settings = load_settings(data_dir)
        try:
            wanted = check_host_name(hostname) if hostname else None
        except ValueError as exc:
            raise ConfigError(f"hostname: {exc}") from None
        if wanted and wanted != settings.hostname:
            raise ConfigError(f"{config_path} exists with hostname {settings.hostname}; edit the file to change it")
        if database_url and database_url != settings.database_url:
            raise ConfigError(f"{config_path} exists with another database_url; edit the file to change it")
    url = settings.effective_database_url
    # The database first: an unreachable one must fail before any file is written.
    store = Store(url)
    sqlite_file = _sqlite_path(url)
    if sqlite_file is not None and not sqlite_file.exists():
        # Only a database this call creates is removed on failure: never the WAL of one in use.
        for suffix in ("", "-wal", "-shm", "-journal"):
            _track_new(Path(str(sqlite_file) + suffix), made)
    try:
        sealing = settings.path(settings.sealing_key_file)
        if not sealing.exists() and not new_sealing_key and await store.has_schema():
            # This data dir's database was initialised before (a restore without the key file),
            # or a new node's shared database holds data sealed by another node's key.
            sealed = await sealed_tables(store)
            if not created or sealed:
                held = f" (sealed rows in {', '.join(sealed)})" if sealed else ""
                raise ConfigError(
                    f"sealing_key_file: {sealing} is missing, but the database {store.display_name} was "
                    f"initialised before{held}: what it holds is sealed with the keys in that file. Restore it "
                    "from your backup of the data dir, or copy it from another node that shares the database, "
                    "then run init again. Only if it is lost for good: 'mxguard init --new-sealing-key' makes "
                    "a new one, and mail and keys sealed with the old one stay unreadable")
        if created:
            made.append(config_path)
            config_path.write_text(render_settings_file(settings), encoding="utf-8")
        cert, key = settings.path(settings.tls.cert_file), settings.path(settings.tls.key_file)
        if not cert.exists() and not key.exists():
            cert_pem, key_pem = generate_self_signed(settings.hostname, extra_names=certificate_names(settings))
            _track_new(key, made)
            write_private(key, key_pem)
            _track_new(cert, made)
            write_private(cert, cert_pem)
        if created and settings.tls.extra_cert_file:
            # RSA-2048 beside the ECDSA certificate, for senders that cannot use ECDSA.
            extra_cert = settings.path(settings.tls.extra_cert_file)
            extra_key = settings.path(settings.tls.extra_key_file)
            if not extra_cert.exists() and not extra_key.exists():
                cert_pem, key_pem = generate_self_signed(settings.hostname, extra_names=certificate_names(settings),
                                                         key_type="rsa")
                _track_new(extra_key, made)
                write_private(extra_key, key_pem)
                _track_new(extra_cert, made)
                write_private(extra_cert, cert_pem)
        if not sealing.exists():
            _track_new(sealing, made)
            create_key_file(sealing)
        link_key = settings.path(settings.quarantine.link_key_file)
        _track_new(link_key, made)
        ensure_secret_file(link_key)  # signs Message Center links
        await store.migrate()
    finally:
        await store.close()
    _restrict_sqlite_file(url)
    return settings, created


async def sealed_tables(store: Store) -> list[str]:
    """The tables that hold at least one row sealed with a sealing key (a ``key_id`` column:
    spool, quarantine, SNI certificates, DKIM keys, and whatever is sealed in future), in the
    schema as it is (an older revision may lack some of them)."""
    wanted = [table for table in Base.metadata.sorted_tables if "key_id" in table.c]

    def present(connection) -> set[str]:
        return set(inspect(connection).get_table_names())

    found: list[str] = []
    async with store.connection_errors():
        async with store.engine.connect() as conn:
            existing = await conn.run_sync(present)
            for table in wanted:
                if table.name in existing and await conn.scalar(select(exists().select_from(table))):
                    found.append(table.name)
    return found


def _sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL, or None (another database, or in memory)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def _restrict_sqlite_file(url: str) -> None:
    """Mode 0600 for an SQLite database (and its WAL files): it holds the message log, password
    and key hashes and sessions. The data dir is 0700 already; this holds when it is opened up
    (a backup group, a shared mount)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return
    for suffix in ("", "-wal", "-shm"):
        path = Path(parsed.database + suffix)
        if path.exists():
            path.chmod(0o600)
