"""Hosted MTA-STS (RFC 8461): the policy the gateway serves for each domain, its id, the DNS records.

A served domain whose MX records point at the gateway can publish an MTA-STS
policy that the gateway itself serves at
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (see
:mod:`mxguard.web.mta_sts_host`). The policy's ``mx`` lines are the gateway's
own MX host names (``[server] mx_hosts``, default ``[hostname]``), so the text
depends on the domain's settings *and* on the configuration; its ``id`` (the
one the ``_mta-sts`` TXT record carries, RFC 8461 section 3.1) is issued anew
whenever the text changes: a UTC timestamp and the start of the text's SHA-256,
stored with that hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass

import structlog
from sqlalchemy import select

from mxguard.errors import ValidationCollector, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.domains import _scoped_row, normalize_domain_name
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, utcnow

log = structlog.get_logger("mxguard.mta_sts")

#: ``off`` serves nothing; the others are RFC 8461 section 5 policy modes.
MODES = ("off", "none", "testing", "enforce")
#: max_age bounds, seconds: at least a day, at most RFC 8461 section 3.2's 31557600 (about a year).
MIN_MAX_AGE = 86400
MAX_MAX_AGE = 31557600
DEFAULT_MAX_AGE = 604800
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
#: The policy host's first label (RFC 8461 section 3.3).
HOST_PREFIX = "mta-sts."
_LDH_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
_PORT = re.compile(r":[0-9]{1,5}$")


def render_policy(mode: str, mx: list[str] | tuple[str, ...], max_age: int) -> str:
    """The policy body of RFC 8461 section 3.2: ``version``, ``mode``, one ``mx`` per host,
    ``max_age``; each line ends in CRLF.

    Args:
        mode: ``none``, ``testing`` or ``enforce``.
        mx: MX host names, lower case, without a trailing dot.
        max_age: seconds, 0..31557600.

    Raises:
        ValueError: ``mode`` is ``off`` or unknown (nothing is served then).
    """
    if mode not in MODES[1:]:
        raise ValueError(f"no policy text for mode {mode!r}")
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {host}" for host in mx), f"max_age: {int(max_age)}"]
    return "".join(line + "\r\n" for line in lines)


def text_hash(text: str) -> str:
    """Hex SHA-256 of a policy text (what its stored id was issued for)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_policy_id(text: str, now: dt.datetime | None = None) -> str:
    """A fresh policy id: ``YYYYMMDDHHMMSS`` (UTC) and 8 hex digits of the text's SHA-256.

    22 letters and digits, within RFC 8461 section 3.1's ``1*32(ALPHA / DIGIT)``.
    """
    now = (now or utcnow()).astimezone(dt.timezone.utc)
    return now.strftime("%Y%m%d%H%M%S") + text_hash(text)[:8]


@dataclass(frozen=True)
class DnsRecord:
    """One DNS record the domain's zone should hold, in zone-file form.

    Attributes:
        name: owner name with the trailing dot (``_mta-sts.example.com.``).
        type: ``MX``, ``TXT``, ``CNAME``.
        value: the record data as written in a zone file (TXT quoted).
        purpose: what it is for, one sentence.
    """

    name: str
    type: str
    value: str
    purpose: str

    @property
    def line(self) -> str:
        return f"{self.name} IN {self.type} {self.value}"


@dataclass(frozen=True)
class HostedPolicy:
    """One domain's hosted MTA-STS settings and what they mean.

    Attributes:
        domain: the served domain (ASCII form).
        mode: ``off``, ``none``, ``testing`` or ``enforce``.
        max_age: seconds.
        mx: the gateway's MX host names (the policy's ``mx`` lines).
        policy_id: the id for the ``_mta-sts`` TXT record (``None`` while ``off`` and never served).
        gateway_host: the gateway's host name (``mta-sts.<domain>`` is a CNAME to it).
    """

    domain: str
    mode: str
    max_age: int
    mx: tuple[str, ...]
    policy_id: str | None
    gateway_host: str

    @property
    def served(self) -> bool:
        return self.mode != "off"

    @property
    def text(self) -> str | None:
        """The policy body, or ``None`` when ``off``."""
        return render_policy(self.mode, self.mx, self.max_age) if self.served else None

    @property
    def url(self) -> str:
        return f"https://{HOST_PREFIX}{self.domain}{WELL_KNOWN_PATH}"

    @property
    def tlsrpt_suggestion(self) -> str:
        """A TLS-RPT record value (RFC 8460 section 3) with a report address in the domain."""
        return f"v=TLSRPTv1; rua=mailto:tlsrpt@{self.domain}"

    def records(self) -> list[DnsRecord]:
        """The records to publish: MX per gateway host, and while served the policy host and the
        ``_mta-sts`` TXT record; the TLS-RPT record always (reports help without MTA-STS too)."""
        d = self.domain
        out = [DnsRecord(f"{d}.", "MX", f"10 {host}.", "mail for the domain goes to the gateway")
               for host in self.mx]
        if self.served:
            out.append(DnsRecord(f"{HOST_PREFIX}{d}.", "CNAME", f"{self.gateway_host}.",
                                 "the policy host: senders fetch the policy from the gateway's HTTPS listener "
                                 "(port 443, a certificate valid for this name); an A/AAAA record with the "
                                 "gateway's address does as well"))
            out.append(DnsRecord(f"_mta-sts.{d}.", "TXT", f'"v=STSv1; id={self.policy_id}"',
                                 "announces the policy; the id changes whenever the policy does (RFC 8461 3.1)"))
        out.append(DnsRecord(f"_smtp._tls.{d}.", "TXT", f'"{self.tlsrpt_suggestion}"',
                             "where senders send TLS reports (RFC 8460); any rua of yours will do"))
        return out

    def as_dict(self) -> dict:
        return {"domain": self.domain, "mode": self.mode, "max_age": self.max_age, "mx": list(self.mx),
                "policy_id": self.policy_id, "served": self.served, "url": self.url, "policy": self.text,
                "records": [{"name": r.name, "type": r.type, "value": r.value, "purpose": r.purpose}
                            for r in self.records()]}


def _audit_state(row: Domain) -> dict:
    return {"mta_sts_mode": row.mta_sts_mode or "off", "mta_sts_max_age": row.mta_sts_max_age,
            "mta_sts_id": row.mta_sts_id}


def _sync_id(row: Domain, mx: list[str]) -> bool:
    """Issue a new id when the served text differs from the one the stored id names.

    Returns:
        whether the row changed.
    """
    mode = row.mta_sts_mode or "off"
    if mode == "off":
        return False
    digest = text_hash(render_policy(mode, mx, row.mta_sts_max_age))
    if row.mta_sts_id and row.mta_sts_hash == digest:
        return False
    row.mta_sts_id = new_policy_id(render_policy(mode, mx, row.mta_sts_max_age))
    row.mta_sts_hash = digest
    return True


def _policy(row: Domain, mx: list[str], gateway_host: str) -> HostedPolicy:
    return HostedPolicy(row.name, row.mta_sts_mode or "off", row.mta_sts_max_age or DEFAULT_MAX_AGE, tuple(mx),
                        row.mta_sts_id, gateway_host)


def validate_settings(mode: str | None, max_age: int | str | None) -> tuple[str | None, int | None]:
    """Normalise a mode and a max_age (``None``: leave as is).

    Raises:
        ValidationFailed: ``mta_sts_mode`` not one of :data:`MODES`, or ``mta_sts_max_age`` not a
            whole number of seconds in 86400..31557600 (RFC 8461 section 3.2 caps it at 31557600).
    """
    check = ValidationCollector()
    if mode is not None:
        with check:
            mode = str(mode).strip().lower()
            if mode not in MODES:
                raise ValidationFailed("mta_sts_mode", f"{mode!r} is not one of: {', '.join(MODES)}")
    if max_age is not None:
        with check:
            try:
                max_age = int(str(max_age).strip())
            except ValueError:
                raise ValidationFailed("mta_sts_max_age", f"{max_age!r} is not a whole number of seconds") from None
            if not MIN_MAX_AGE <= max_age <= MAX_MAX_AGE:
                raise ValidationFailed("mta_sts_max_age", f"must be between {MIN_MAX_AGE} and {MAX_MAX_AGE} seconds")
    check.raise_if_any()
    return mode, max_age


async def get_hosted_policy(store: Store, name: str, mx: list[str], gateway_host: str, *,
                            actor: Actor = SYSTEM) -> HostedPolicy:
    """One domain's hosted MTA-STS settings, records and policy text.

    When the served text no longer matches the stored id (``server.mx_hosts`` changed), a new id
    is issued and stored first (audit entry ``domain.mta_sts`` by ``system``), so what the page
    tells the administrator to publish always names the text being served.

    Args:
        name: the domain.
        mx: the gateway's MX host names (:attr:`mxguard.config.Settings.mx_hosts`).
        gateway_host: the gateway's host name (``settings.hostname``).

    Raises:
        NotFound: no such domain, or not the actor's.
    """
    domain = normalize_domain_name(name)
    async with store.session() as session:
        row = await _scoped_row(session, domain, actor)
        before = _audit_state(row)
        if _sync_id(row, mx):
            audit.record(session, SYSTEM, "domain.mta_sts", domain, org_id=row.org_id, before=before,
                         after=_audit_state(row))
            log.info("MTA-STS policy id renewed: the policy text changed", domain=domain, policy_id=row.mta_sts_id)
            await session.commit()
        return _policy(row, mx, gateway_host)


async def set_hosted_policy(store: Store, name: str, mx: list[str], gateway_host: str, *, actor: Actor = SYSTEM,
                            mode: str | None = None, max_age: int | str | None = None
                            ) -> tuple[HostedPolicy, HostedPolicy]:
    """Change a domain's hosted MTA-STS mode and/or max_age (``None``: leave as is).

    A change of the policy text issues a new id; the change is in the audit log (``domain.mta_sts``).

    Returns:
        ``(before, after)``.

    Raises:
        ValidationFailed: a bad mode or max_age (see :func:`validate_settings`).
        NotFound: no such domain, or not the actor's.
    """
    domain = normalize_domain_name(name)
    mode, max_age = validate_settings(mode, max_age)
    async with store.session() as session:
        row = await _scoped_row(session, domain, actor)
        _sync_id(row, mx)
        before_state, before = _audit_state(row), _policy(row, mx, gateway_host)
        if mode is not None:
            row.mta_sts_mode = mode
        if max_age is not None:
            row.mta_sts_max_age = max_age
        _sync_id(row, mx)
        after = _policy(row, mx, gateway_host)
        if after != before:
            row.updated_at = utcnow()
            audit.record(session, actor, "domain.mta_sts", domain, org_id=row.org_id, before=before_state,
                         after=_audit_state(row))
            log.info("hosted MTA-STS changed", domain=domain, mode=after.mode, max_age=after.max_age,
                     policy_id=after.policy_id, actor=actor.name)
        await session.commit()
        return before, after


async def renew_changed_ids(store: Store, mx: list[str]) -> list[tuple[str, str]]:
    """Issue new ids for every served policy whose text changed since its id was issued (the
    gateway calls it at start: ``server.mx_hosts`` may have changed); audit entry by ``system``.

    Returns:
        ``[(domain, new id)]``: the ``_mta-sts`` records the administrator must update.
    """
    renewed: list[tuple[str, str]] = []
    async with store.session() as session:
        rows = (await session.execute(select(Domain).where(Domain.mta_sts_mode != "off"))).unique().scalars().all()
        for row in rows:
            before = _audit_state(row)
            if _sync_id(row, mx):
                audit.record(session, SYSTEM, "domain.mta_sts", row.name, org_id=row.org_id, before=before,
                             after=_audit_state(row))
                renewed.append((row.name, row.mta_sts_id))
        await session.commit()
    for domain, policy_id in renewed:
        log.warning("MTA-STS policy text changed (server.mx_hosts?): publish the new id", domain=domain,
                    record=f'_mta-sts.{domain}. IN TXT "v=STSv1; id={policy_id}"')
    return renewed


def policy_domain_for_host(host: str) -> str | None:
    """The domain whose policy a ``Host`` header asks for, or ``None`` when it is not a policy host.

    The value is lower-cased, a port (``:8443``) and one trailing dot are dropped; what is left must
    be ``mta-sts.`` and an LDH (ASCII) domain name, so a name written any other way (unicode,
    spaces, a second dot) names no domain and cannot select another domain's policy.
    """
    value = _PORT.sub("", host.strip().lower())
    value = value[:-1] if value.endswith(".") else value
    if not value.startswith(HOST_PREFIX):
        return None
    domain = value[len(HOST_PREFIX):]
    return domain if len(domain) <= 253 and _LDH_NAME.match(domain) else None


def is_policy_host(host: str) -> bool:
    """Whether a ``Host`` header is an MTA-STS policy host (``mta-sts.`` first), valid or not."""
    return host.strip().lower().startswith(HOST_PREFIX)


async def served_policy_text(store: Store, domain: str, mx: list[str]) -> str | None:
    """The policy text served for ``domain`` (exact ASCII name), or ``None``: not served, or ``off``.

    Args:
        domain: as :func:`policy_domain_for_host` returns it.
        mx: the gateway's MX host names.
    """
    async with store.session() as session:
        row = (await session.execute(select(Domain.mta_sts_mode, Domain.mta_sts_max_age)
                                     .where(Domain.name == domain))).one_or_none()
    if row is None or (row.mta_sts_mode or "off") == "off":
        return None
    return render_policy(row.mta_sts_mode, mx, row.mta_sts_max_age)
