"""Renewal of the certificates ACME issued: a check every ``acme.check_interval`` seconds (daily).

A name is renewed when the certificate stored for it now expires within
``acme.renew_before_days``; a name whose SNI certificate was removed is left
alone. Each renewal is claimed with a conditional update, so of several nodes
one orders it.
"""

from __future__ import annotations

import datetime as dt

import structlog

from mxguard.config import Settings
from mxguard.errors import MxguardError
from mxguard.periodic import PeriodicCheck
from mxguard.storage.db import Store
from mxguard.storage.models import utcnow
from mxguard.storage.sealing import KeyRing
from mxguard.tls import acme_store

log = structlog.get_logger("mxguard.acme")


async def renew_due(settings: Settings, store: Store, keyring: KeyRing, *,
                    now: dt.datetime | None = None) -> dict[str, str | None]:
    """Renew every ACME name due now.

    Args:
        settings: ``[acme]``; ``renew_before_days`` decides what is due.
        store, keyring: the database and the sealing keys.
        now: the time to judge expiry at (UTC; default now).

    Returns:
        ``{name: None (renewed) | error text}`` for each name tried.
    """
    a = settings.acme
    horizon = (now or utcnow()) + dt.timedelta(days=a.renew_before_days)
    outcome: dict[str, str | None] = {}
    for entry in await acme_store.list_entries(store):
        if entry.stored_not_after is None or entry.stored_not_after > horizon:
            continue
        # Less than one check interval: the next check may try again after a failure.
        if not await acme_store.claim_renewal(store, entry.name, retry_after=dt.timedelta(seconds=a.check_interval / 2)):
            continue
        log.info("ACME certificate due for renewal", name=entry.name, not_after=entry.stored_not_after.isoformat())
        try:
            # Imported here: the ACME client (acme, josepy, requests, pyOpenSSL) costs a gateway
            # process about 20 MB, and most gateways never renew through it.
            from mxguard.tls.acme_client import issue

            await issue(settings, store, keyring.get(), list(entry.names), replace=True)
            outcome[entry.name] = None
        except MxguardError as exc:
            log.warning("ACME renewal failed; the current certificate stays in use", name=entry.name,
                        error=str(exc))
            await acme_store.record_failure(store, entry.name, str(exc))
            outcome[entry.name] = str(exc)
    return outcome


class AcmeRenewal:
    """The gateway's renewal loop (only while ``acme.directory_url`` is set).

    Args:
        settings, store, keyring: as for :func:`renew_due`.
    """

    def __init__(self, settings: Settings, store: Store, keyring: KeyRing):
        self.settings = settings
        self._check = PeriodicCheck("acme-renewal", settings.acme.check_interval,
                                    lambda: renew_due(settings, store, keyring))

    def start(self) -> None:
        if self.settings.acme.directory_url:
            self._check.start()

    async def stop(self) -> None:
        await self._check.stop()
