"""``mxguard init``: create a data dir with settings, a certificate, sealing keys and the schema."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import make_url

from mxguard.config import (CONFIG_FILE_NAME, Settings, describe_validation_error, load_settings,
                            render_settings_file)
from mxguard.errors import ConfigError
from mxguard.netaddr import parse_host_port
from mxguard.storage.db import Store
from mxguard.storage.sealing import create_key_file, ensure_secret_file
from mxguard.tls.certs import generate_self_signed, write_private


def default_hostname() -> str:
    """This machine's FQDN, or ``localhost`` when it has none."""
    name = socket.getfqdn()
    return name if name and "." in name else "localhost"


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
                     smtp_listen: list[str] | None = None) -> tuple[Settings, bool]:
    """Create (or bring up to date) a data dir.

    A new data dir gets ``mxguard.toml``, a self-signed ECDSA P-256 certificate
    for ``hostname``, a 256-bit sealing key, a link-signing secret (files mode 0600) and the database
    schema. An existing one keeps its files; only its schema is migrated.

    Returns:
        ``(settings, created)``.

    Raises:
        ConfigError: the directory cannot be written, a value is invalid, or
            the database cannot be reached.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
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
        config_path.write_text(render_settings_file(settings), encoding="utf-8")
    else:
        settings = load_settings(data_dir)
        if hostname and hostname != settings.hostname:
            raise ConfigError(f"{config_path} exists with hostname {settings.hostname}; edit the file to change it")
        if database_url and database_url != settings.database_url:
            raise ConfigError(f"{config_path} exists with another database_url; edit the file to change it")
    cert, key = settings.path(settings.tls.cert_file), settings.path(settings.tls.key_file)
    if not cert.exists() and not key.exists():
        cert_pem, key_pem = generate_self_signed(settings.hostname, extra_names=certificate_names(settings))
        write_private(key, key_pem)
        write_private(cert, cert_pem)
    if created and settings.tls.extra_cert_file:
        # RSA-2048 beside the ECDSA certificate, for senders that cannot use ECDSA.
        extra_cert, extra_key = settings.path(settings.tls.extra_cert_file), settings.path(settings.tls.extra_key_file)
        if not extra_cert.exists() and not extra_key.exists():
            cert_pem, key_pem = generate_self_signed(settings.hostname, extra_names=certificate_names(settings),
                                                     key_type="rsa")
            write_private(extra_key, key_pem)
            write_private(extra_cert, cert_pem)
    sealing = settings.path(settings.sealing_key_file)
    if not sealing.exists():
        create_key_file(sealing)
    ensure_secret_file(settings.path(settings.quarantine.link_key_file))  # signs Message Center links
    store = Store(settings.effective_database_url)
    try:
        await store.migrate()
    finally:
        await store.close()
    _restrict_sqlite_file(settings.effective_database_url)
    return settings, created


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
