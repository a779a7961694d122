"""ACME (RFC 8555) for the CLI, the REST API and the console alike: status per name, a
certificate requested for names, a renewal now.

The order itself is :func:`mxguard.tls.acme_client.issue` (imported only when a certificate is
ordered: its libraries cost a gateway process memory); what this layer adds is who may
ask (administrators: the ACME account, the CA's rate limits and port 80 are the gateway's,
not one organization's), making sure an HTTP-01 responder answers for the order's duration,
and recording a failed renewal as the gateway's own renewal loop does.

The HTTP-01 responder: if ``acme.http_listen`` is free, one is started for the order and
stopped after it; if it is taken, it must be a responder reading this database (a running
gateway, which also serves the console and the API), which a probe token checks. The caller
passes the function that makes a responder (the web layer's ``responder_server``), so this
layer does not reach up into the web.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from mxguard.config import Settings
from mxguard.errors import ConfigError, MxguardError, NotFound
from mxguard.netaddr import parse_host_port
from mxguard.services.access import SYSTEM, Actor
from mxguard.storage.db import Store
from mxguard.storage.models import utcnow
from mxguard.storage.sealing import Sealer
from mxguard.tls import acme_store
from mxguard.tls.sni import normalize_sni_name

if TYPE_CHECKING:
    from mxguard.tls.acme_client import Issued

log = structlog.get_logger("mxguard.acme")

#: Host the probe token is published for: .invalid never names a real host (RFC 6761 6.4).
PROBE_HOST = "responder-probe.mxguard.invalid"


class Responder(Protocol):
    """An HTTP-01 listener: ``start()`` binds (``ConfigError`` when the address is taken), ``stop()`` closes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


#: ``(store, listen)`` -> a responder serving that store's tokens on ``listen`` (not started yet).
ResponderFactory = Callable[[Store, str], Responder]


@dataclass(frozen=True)
class AcmeNameStatus:
    """One name ACME issued, as the status shows it.

    Attributes:
        name: the main name (the first identifier ordered; renewals are tracked by it).
        names: every identifier on the certificate.
        directory_url: the CA it came from.
        issued_at: when the last certificate was issued (UTC).
        not_after: expiry of the certificate stored for the name now (UTC); ``None``: removed since.
        days_left: days until ``not_after`` (``None``: removed).
        state: ``valid``, ``due`` (within ``acme.renew_before_days``: the gateway renews it),
            ``expired``, ``failed`` (the last renewal failed; the certificate stays in use) or
            ``removed`` (its SNI certificate was removed: not renewed).
        last_attempt: when the last renewal attempt started (UTC), if any.
        last_error: what went wrong with it (``None``: it worked or none was tried).
    """

    name: str
    names: tuple[str, ...]
    directory_url: str
    issued_at: dt.datetime
    not_after: dt.datetime | None
    days_left: float | None
    state: str
    last_attempt: dt.datetime | None
    last_error: str | None

    def as_dict(self) -> dict:
        return {"name": self.name, "names": list(self.names), "directory_url": self.directory_url,
                "issued_at": self.issued_at, "not_after": self.not_after,
                "days_left": None if self.days_left is None else int(self.days_left), "state": self.state,
                "last_attempt": self.last_attempt, "last_error": self.last_error}


@dataclass(frozen=True)
class AcmeStatus:
    """ACME as configured, and every name it issued.

    Attributes:
        enabled: ``acme.directory_url`` is set.
        directory_url: the CA's directory (empty: ACME is off).
        http_listen: where the HTTP-01 responder listens (``acme.http_listen``).
        renew_before_days: renewal window (``acme.renew_before_days``).
        entries: by name.
    """

    enabled: bool
    directory_url: str
    http_listen: str
    renew_before_days: int
    entries: tuple[AcmeNameStatus, ...]


def _state(entry: acme_store.AcmeEntry, renew_before_days: int, now: dt.datetime) -> str:
    days = entry.days_left(now)
    if days is None:
        return "removed"
    if days <= 0:
        return "expired"
    if entry.last_error:
        return "failed"
    return "due" if days <= renew_before_days else "valid"


async def acme_status(settings: Settings, store: Store, *, actor: Actor = SYSTEM,
                      now: dt.datetime | None = None) -> AcmeStatus:
    """ACME's settings and the state of every name it issued.

    Raises:
        PermissionDenied: the actor is not an administrator.
    """
    actor.require_admin()
    a = settings.acme
    now = now or utcnow()
    entries = tuple(AcmeNameStatus(e.name, e.names, e.directory_url, e.issued_at, e.stored_not_after,
                                   e.days_left(now), _state(e, a.renew_before_days, now), e.last_attempt,
                                   e.last_error)
                    for e in await acme_store.list_entries(store))
    return AcmeStatus(bool(a.directory_url), a.directory_url or "", a.http_listen, a.renew_before_days, entries)


async def responder_answers(store: Store, listen: str) -> bool:
    """Whether what listens on ``listen`` is an HTTP-01 responder reading this database (a probe token).

    Args:
        listen: ``HOST:PORT`` (``acme.http_listen``); a wildcard address is probed on loopback.
    """
    host, port = parse_host_port(listen, default_port=80, allow_zero=True)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    token = secrets.token_urlsafe(24)
    await acme_store.publish_token(store, token, PROBE_HOST, f"{token}.probe")
    url_host = f"[{host}]" if ":" in host else host
    import httpx  # here: the console imports this module, and most consoles never probe (memory)

    try:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            reply = await http.get(f"http://{url_host}:{port}/.well-known/acme-challenge/{token}",
                                   headers={"Host": PROBE_HOST})
        return reply.status_code == 200 and reply.text == f"{token}.probe"
    except httpx.HTTPError:
        return False
    finally:
        await acme_store.withdraw_tokens(store, [token])


async def _ordered(settings: Settings, store: Store, sealer: Sealer, names: list[str], *, replace: bool,
                   actor: Actor, make_responder: ResponderFactory) -> Issued:
    """One order with a responder answering: this process's for the order, or the running gateway's."""
    # Imported here: the ACME client's libraries (acme, josepy, requests) would cost every gateway
    # process memory, and most never order a certificate.
    from mxguard.tls import acme_client

    if not settings.acme.directory_url:
        raise ConfigError("acme.directory_url is empty: ACME is off; set the CA's directory URL in [acme]")
    acme_client.check_names(names)  # a bad name fails before anything listens
    listen = settings.acme.http_listen
    responder: Responder | None = make_responder(store, listen)
    try:
        await responder.start()
        log.info("HTTP-01 responder started for this order", listen=listen)
    except ConfigError:
        responder = None
        if not await responder_answers(store, listen):
            raise ConfigError(f"acme.http_listen: {listen} is in use by something that is not this "
                              "gateway's HTTP-01 responder; free the port or start mxguard serve") from None
        log.info("the running gateway answers the HTTP-01 challenges", listen=listen)
    try:
        return await acme_client.issue(settings, store, sealer, names, replace=replace, actor=actor)
    finally:
        if responder is not None:
            await responder.stop()


async def request_certificate(settings: Settings, store: Store, sealer: Sealer, names: list[str], *,
                              make_responder: ResponderFactory, replace: bool = False,
                              actor: Actor = SYSTEM) -> Issued:
    """Order a certificate for ``names`` from the ACME CA and store it as their SNI certificate.

    Blocks until the order is over (bounded by ``acme.order_timeout``); the gateway renews
    it from then on.

    Args:
        settings: ``[acme]`` and ``tls.min_version``.
        store, sealer: the database and the key that seals the new private key.
        names: host names, the first being the main one; wildcards cannot be validated by HTTP-01.
        make_responder: makes the HTTP-01 responder if this process is to run one.
        replace: replace certificates stored for the names already.
        actor: who asks; administrators only.

    Raises:
        PermissionDenied: the actor is not an administrator.
        ConfigError: ACME is off, the account key is unusable, or ``acme.http_listen`` is taken
            by something that is not this gateway's responder.
        ValidationFailed: (``name``) none given, not a host name, or a wildcard (RFC 8555 7.1.3).
        AlreadyExists: a name has a certificate and ``replace`` is false (before ordering).
        AcmeFailed: the CA refused, a challenge failed (with what the CA said), or it timed out.
    """
    actor.require_admin()
    return await _ordered(settings, store, sealer, names, replace=replace, actor=actor,
                          make_responder=make_responder)


async def renew_now(settings: Settings, store: Store, sealer: Sealer, name: str, *,
                    make_responder: ResponderFactory, actor: Actor = SYSTEM) -> Issued:
    """Renew the certificate ACME issued for ``name`` now, whatever its expiry.

    The same names are ordered again and the stored certificate replaced; a
    failure is recorded for the status (as the gateway's renewal loop does) and
    raised, and the current certificate stays in use.

    Raises:
        PermissionDenied: the actor is not an administrator.
        ValidationFailed: ``name`` is not a host name.
        NotFound: ACME issued nothing for ``name``.
        ConfigError, AcmeFailed: as :func:`request_certificate`.
    """
    actor.require_admin()
    normalized = normalize_sni_name(name)
    entry = next((e for e in await acme_store.list_entries(store) if e.name == normalized), None)
    if entry is None:
        raise NotFound(f"ACME issued no certificate for {normalized}")
    try:
        return await _ordered(settings, store, sealer, list(entry.names), replace=True, actor=actor,
                              make_responder=make_responder)
    except MxguardError as exc:
        if not isinstance(exc, ConfigError):
            await acme_store.record_failure(store, entry.name, str(exc))
        raise
