"""Served domains: add, change, remove, list — with validation, tenancy and the audit log.

Every function takes the acting :class:`~mxguard.services.access.Actor`
(default: the internal ``system`` actor). An org-admin sees and changes only
the domains of their organization; any other domain is ``NotFound``, the same
as a domain that does not exist. Each change writes an audit entry (before →
after) in the same transaction and bumps the configuration generation, so
running gateways apply it to the next SMTP transaction.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from mxguard.config import check_host_name
from mxguard.errors import AlreadyExists, Conflict, NotFound, PermissionDenied, ValidationCollector, ValidationFailed
from mxguard.filtering.policy_content import DEFAULT_ATTACHMENT_RULES, validate_rules
from mxguard.netaddr import format_host_port, is_ip_address, parse_host_port
from mxguard.services import audit
from mxguard.services.access import SYSTEM, Actor
from mxguard.services.orgs import org_id_for
from mxguard.services.tenancy import check_domain_claim
from mxguard.storage.db import Store
from mxguard.storage.models import ConfigGeneration, Domain, SpoolEntry, utcnow
from mxguard.tls.certs import normalize_fingerprint
from mxguard.tls.client_certs import load_crl
from mxguard.tls.policy import DownstreamTls, InboundTls, TlsVersion

#: Fields an operator may set, with their defaults for a new domain.
DOMAIN_DEFAULTS: dict[str, Any] = {
    "inbound_tls": InboundTls.OPTIONAL.value,
    "downstream_tls": DownstreamTls.OPPORTUNISTIC.value,
    "tls_ca_file": None,
    "tls_fingerprint": None,
    "tls_min_version": TlsVersion.V1_2.value,
    "tls_crl_file": None,
    "on_unreachable": "spool",
    # Filtering (issue 3): see mxguard.filtering.disposition.
    "junk_quarantine": None,
    "junk_reject": None,
    "junk_tag": None,
    "virus_action": "reject",
    "engine_failure": "defer",
    "attachment_rules": None,  # None: the default blocklist (DEFAULT_ATTACHMENT_RULES)
    # Quarantine (issue 7): summaries every N hours (0: none) at this UTC hour; block-list action.
    "summary_interval": 24,
    "summary_hour": 8,
    "block_action": "quarantine",
}

#: Junk thresholds: a score, or "off" / "" to clear (None means "leave as is" in updates).
THRESHOLD_FIELDS = ("junk_quarantine", "junk_reject", "junk_tag")
VIRUS_ACTIONS = ("reject", "quarantine")
ENGINE_FAILURE_ACTIONS = ("defer", "tag")
BLOCK_ACTIONS = ("quarantine", "reject")


@dataclass(frozen=True)
class DomainView:
    """A read-only snapshot of one domain's settings."""

    name: str
    servers: tuple[str, ...]
    inbound_tls: str
    downstream_tls: str
    tls_ca_file: str | None = None
    tls_fingerprint: str | None = None
    tls_min_version: str = "1.2"
    #: CRL checked against the downstream leaf in ``verify`` mode (a listed certificate: 451 4.7.5).
    tls_crl_file: str | None = None
    #: ``spool`` (accept and hold when every server is down) or ``defer`` (``451 4.4.1``).
    on_unreachable: str = "spool"
    #: Owning organization's name (``None``: administrators only).
    org: str | None = None
    junk_quarantine: float | None = None
    junk_reject: float | None = None
    junk_tag: float | None = None
    virus_action: str = "reject"
    engine_failure: str = "defer"
    attachment_rules: tuple = ()
    #: Hours between quarantine summaries (0: none); the UTC hour a daily summary goes out.
    summary_interval: int = 24
    summary_hour: int = 8
    #: ``quarantine`` or ``reject``: mail from a sender on a recipient's block list.
    block_action: str = "quarantine"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["servers"] = list(self.servers)
        data["attachment_rules"] = json.loads(json.dumps(self.attachment_rules))
        return data


def _view(row: Domain) -> DomainView:
    values = {f.name: getattr(row, f.name) for f in fields(DomainView) if f.name != "org"}
    values["servers"] = tuple(values["servers"])
    rules = DEFAULT_ATTACHMENT_RULES if values["attachment_rules"] is None else values["attachment_rules"]
    values["attachment_rules"] = tuple(rules)
    values["virus_action"] = values["virus_action"] or "reject"
    values["engine_failure"] = values["engine_failure"] or "defer"
    values["block_action"] = values["block_action"] or "quarantine"
    values["summary_interval"] = 24 if values["summary_interval"] is None else values["summary_interval"]
    values["summary_hour"] = 8 if values["summary_hour"] is None else values["summary_hour"]
    return DomainView(**values, org=row.org.name if row.org else None)


def normalize_domain_name(name: str) -> str:
    """Lower-case ASCII (IDNA) form of a domain name.

    Raises:
        ValidationFailed: not a syntactically valid domain name (RFC 1035, RFC 5890).
    """
    value = (name or "").strip().rstrip(".").lower()
    try:
        value = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationFailed("domain", f"{name!r} is not a valid domain name") from None
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(
            0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and all(c.isalnum() or c == "-" for c in label) for label in labels) or labels[-1].isdigit():
        # (An all-numeric last label is an IP address, not a domain: RFC 1123 2.1.)
        raise ValidationFailed("domain", f"{name!r} is not a valid domain name")
    return value


def normalize_servers(servers: list[str] | tuple[str, ...]) -> list[str]:
    """Validate ``host[:port]`` entries; return them as ``host:port`` in the given order.

    Raises:
        ValidationFailed: empty list, a bad entry, or a duplicate.
    """
    if not servers:
        raise ValidationFailed("servers", "at least one downstream server is needed")
    out: list[str] = []
    for item in servers:
        try:
            host, port = parse_host_port(item, default_port=25)
            if not is_ip_address(host):
                host = check_host_name(host)  # RFC 1123 2.1: an MX or server name, not any string
        except ValueError as exc:
            raise ValidationFailed("servers", f"{item!r} is not HOST[:PORT]: {exc}") from None
        entry = format_host_port(host, port)
        if entry in out:
            raise ValidationFailed("servers", f"{entry} is listed twice")
        out.append(entry)
    return out


def _validate_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Normalise and check every given field.

    Raises:
        ValidationFailed: every invalid field at once (``errors`` lists them).
    """
    out = dict(fields)
    check = ValidationCollector()
    if "servers" in out:
        with check:
            out["servers"] = normalize_servers(out["servers"])
    for key, enum in (("inbound_tls", InboundTls), ("downstream_tls", DownstreamTls), ("tls_min_version", TlsVersion)):
        if key in out:
            with check:
                try:
                    out[key] = enum(str(out[key]).lower()).value
                except ValueError:
                    allowed = ", ".join(e.value for e in enum)
                    raise ValidationFailed(key, f"{out[key]!r} is not one of: {allowed}") from None
    if "on_unreachable" in out and out["on_unreachable"] not in ("spool", "defer"):
        with check:
            raise ValidationFailed("on_unreachable", f"{out['on_unreachable']!r} is not one of: spool, defer")
    if out.get("tls_fingerprint"):
        with check:
            try:
                out["tls_fingerprint"] = normalize_fingerprint(out["tls_fingerprint"])
            except ValueError as exc:
                raise ValidationFailed("tls_fingerprint", str(exc)) from None
    elif "tls_fingerprint" in out:
        out["tls_fingerprint"] = None
    for key in THRESHOLD_FIELDS:
        if key in out:
            with check:
                out[key] = _threshold(key, out[key])
    for key, low, high in (("summary_interval", 0, 24 * 31), ("summary_hour", 0, 23)):
        if key in out:
            with check:
                try:
                    out[key] = int(str(out[key]).strip())
                except ValueError:
                    raise ValidationFailed(key, f"{out[key]!r} is not a whole number") from None
                if not low <= out[key] <= high:
                    raise ValidationFailed(key, f"must be between {low} and {high}")
    for key, allowed in (("virus_action", VIRUS_ACTIONS), ("engine_failure", ENGINE_FAILURE_ACTIONS),
                         ("block_action", BLOCK_ACTIONS)):
        if key in out:
            with check:
                value = str(out[key]).strip().lower()
                if value not in allowed:
                    raise ValidationFailed(key, f"{out[key]!r} is not one of: {', '.join(allowed)}")
                out[key] = value
    if "attachment_rules" in out:
        with check:
            rules = out["attachment_rules"]
            if isinstance(rules, str):
                try:
                    rules = json.loads(rules)
                except ValueError as exc:
                    raise ValidationFailed("attachment_rules", f"not valid JSON: {exc}") from None
            out["attachment_rules"] = None if rules is None else validate_rules(list(rules) if isinstance(
                rules, tuple) else rules)
    if out.get("tls_ca_file"):
        with check:
            path = os.path.abspath(out["tls_ca_file"])
            if not os.path.isfile(path):
                raise ValidationFailed("tls_ca_file", f"{path} does not exist")
            out["tls_ca_file"] = path
    elif "tls_ca_file" in out:
        out["tls_ca_file"] = None
    if out.get("tls_crl_file"):
        with check:
            path = os.path.abspath(out["tls_crl_file"])
            if not os.path.isfile(path):
                raise ValidationFailed("tls_crl_file", f"{path} does not exist")
            try:
                load_crl(path)
            except (OSError, ValueError) as exc:
                raise ValidationFailed("tls_crl_file", str(exc)) from None
            out["tls_crl_file"] = path
    elif "tls_crl_file" in out:
        out["tls_crl_file"] = None
    check.raise_if_any()
    return out


def _threshold(key: str, value: Any) -> float | None:
    """A junk score threshold: a number, or ``off``/``""`` for none."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValidationFailed(key, f"{value!r} is not a score (a number, or 'off')") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValidationFailed(key, f"{value!r} is not a finite score")
    return number


def _check_consistent(values: dict[str, Any]) -> None:
    """Checks across fields (after each field is valid on its own).

    Raises:
        ValidationFailed: every inconsistency at once.
    """
    check = ValidationCollector()
    mode = values["downstream_tls"]
    if values.get("tls_fingerprint") and mode != DownstreamTls.VERIFY:
        with check:
            raise ValidationFailed("tls_fingerprint", "a pinned fingerprint is only used with downstream TLS 'verify'")
    if values.get("tls_ca_file") and mode not in (DownstreamTls.VERIFY, DownstreamTls.MTA_STS):
        with check:
            raise ValidationFailed("tls_ca_file", "a CA file is only used with downstream TLS 'verify' or 'mta-sts'")
    if values.get("tls_crl_file") and (mode != DownstreamTls.VERIFY or values.get("tls_fingerprint")):
        with check:
            raise ValidationFailed("tls_crl_file", "a CRL is only used with downstream TLS 'verify' by CA chain "
                                                   "(not with a pinned fingerprint)")
    # Junk thresholds must be ordered: tag <= quarantine <= reject (when set).
    order = [(k, values.get(k)) for k in ("junk_tag", "junk_quarantine", "junk_reject") if values.get(k) is not None]
    for (low_key, low), (high_key, high) in zip(order, order[1:]):
        if low > high:
            with check:
                raise ValidationFailed(high_key, f"{high:g} is below {low_key} {low:g}; "
                                                 "expected junk_tag <= junk_quarantine <= junk_reject")
    check.raise_if_any()


async def bump_generation(session) -> None:
    """Mark configuration as changed so running gateways reload (same transaction)."""
    await session.execute(update(ConfigGeneration).where(ConfigGeneration.id == 1)
                          .values(value=ConfigGeneration.value + 1))


async def current_generation(store: Store) -> int:
    async with store.session() as session:
        return (await session.execute(select(ConfigGeneration.value).where(ConfigGeneration.id == 1))).scalar_one()


async def _scoped_row(session, domain: str, actor: Actor) -> Domain:
    actor.require_console()
    row = (await session.execute(select(Domain).where(Domain.name == domain))).scalar_one_or_none()
    if row is None or not actor.may_see_org(row.org_id):
        raise NotFound(f"domain {domain} is not configured")
    return row


async def _org_for_actor(session, org: str | None, actor: Actor) -> int | None:
    """The org id a new or moved domain gets; org-admins can only use their own."""
    if actor.is_admin:
        return await org_id_for(session, org) if org else None
    if org and org.strip() != actor.org:
        raise ValidationFailed("org", f"no organization called {org.strip()!r}")
    return actor.org_id


def _check_ca_file_allowed(actor: Actor, new: str | None, current: str | None = None,
                           key: str = "tls_ca_file") -> None:
    # A CA or CRL file is a path on the gateway host: only administrators may point at files there.
    if new and new != current and not actor.is_admin:
        hint = "use tls_fingerprint to pin a certificate" if key == "tls_ca_file" else "ask an administrator"
        raise PermissionDenied(f"only an administrator sets {key} (a path on the gateway); {hint}")


async def add_domain(store: Store, name: str, servers: list[str], *, actor: Actor = SYSTEM, org: str | None = None,
                     **fields: Any) -> DomainView:
    """Create a served domain.

    Args:
        store: the database.
        name: the domain (``example.com``); IDNA names are stored in ASCII form.
        servers: downstream servers in failover order, ``host[:port]`` (port 25 by default).
        actor: who asks (audit log, tenancy); an org-admin's domain joins their organization.
        org: owning organization's name (admins only; ``None``: no organization).
        **fields: any of ``inbound_tls``, ``downstream_tls``, ``tls_ca_file``,
            ``tls_fingerprint``, ``tls_min_version``, ``on_unreachable``, ``junk_quarantine``,
            ``junk_reject``, ``junk_tag`` (scores, or ``"off"``),
            ``virus_action`` (``reject``/``quarantine``), ``engine_failure``
            (``defer``/``tag``), ``attachment_rules`` (a list or its JSON text)
            (see ``DOMAIN_DEFAULTS``); ``None`` values take the default.

    Raises:
        ValidationFailed: a value is invalid (the exception names the field).
        AlreadyExists: the domain is configured already.
        Conflict: an org-admin asks for a domain that is, or is a subdomain or parent of,
            one another organization serves (:mod:`mxguard.services.tenancy`).
        PermissionDenied: the actor is a plain user.
    """
    actor.require_console()
    check = ValidationCollector()
    with check:
        domain = normalize_domain_name(name)
    values = {**DOMAIN_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    for key in sorted(set(values) - set(DOMAIN_DEFAULTS)):
        with check:
            raise ValidationFailed(key, "unknown domain setting")
    values["servers"] = servers
    with check:
        values = _validate_fields(values)
    check.raise_if_any()
    if values.get("attachment_rules") is None:
        values["attachment_rules"] = json.loads(json.dumps(DEFAULT_ATTACHMENT_RULES))
    _check_consistent(values)
    _check_ca_file_allowed(actor, values.get("tls_ca_file"))
    _check_ca_file_allowed(actor, values.get("tls_crl_file"), key="tls_crl_file")
    async with store.session() as session:
        org_id = await _org_for_actor(session, org, actor)
        await check_domain_claim(store, session, actor, domain, org_id)
        row = Domain(name=domain, org_id=org_id, **values)
        session.add(row)
        try:
            await session.flush()
        except IntegrityError:
            raise AlreadyExists(f"domain {domain} exists already; change its settings instead") from None
        await bump_generation(session)
        row = (await session.execute(select(Domain).where(Domain.name == domain))).unique().scalar_one()
        view = _view(row)
        audit.record(session, actor, "domain.add", domain, org_id=org_id, after=view.as_dict())
        await session.commit()
        return view


async def update_domain(store: Store, name: str, *, actor: Actor = SYSTEM, **changes: Any) -> tuple[DomainView, DomainView]:
    """Change settings of a domain; ``None`` values mean "leave as is".

    ``org`` (admins only) moves the domain to another organization; ``""`` removes it from any.

    Returns:
        ``(before, after)`` snapshots.

    Raises:
        NotFound: no such domain, or not the actor's.
        ValidationFailed: a value is invalid.
    """
    domain = normalize_domain_name(name)
    org = changes.pop("org", None)
    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - set(DOMAIN_DEFAULTS) - {"servers"}
    if unknown:
        raise ValidationFailed.combine([ValidationFailed(key, "unknown domain setting") for key in sorted(unknown)])
    changes = _validate_fields(changes)
    async with store.session() as session:
        row = await _scoped_row(session, domain, actor)
        before = _view(row)
        merged = {**before.as_dict(), **changes}
        _check_consistent(merged)
        _check_ca_file_allowed(actor, changes.get("tls_ca_file"), before.tls_ca_file)
        _check_ca_file_allowed(actor, changes.get("tls_crl_file"), before.tls_crl_file, key="tls_crl_file")
        for key, value in changes.items():
            setattr(row, key, value)
        if org is not None and (org or None) != before.org:
            actor.require_admin()
            row.org_id = await org_id_for(session, org) if org else None
        row.updated_at = utcnow()
        await bump_generation(session)
        await session.flush()
        await session.refresh(row, ["org"])
        after = _view(row)
        if after != before:
            audit.record(session, actor, "domain.update", domain, org_id=row.org_id,
                         before=before.as_dict(), after=after.as_dict())
        await session.commit()
        return before, after


async def remove_domain(store: Store, name: str, *, actor: Actor = SYSTEM, force: bool = False) -> DomainView:
    """Delete a domain; mail for it is refused from the next transaction on.

    Mail already in the spool for the domain would have no route left, so the
    removal is refused while any is queued, unless ``force`` is true: the
    queued entries then fail at their next attempt with 550 5.1.2 (and a DSN
    to a sender that passed SPF or DKIM alignment), as the spool worker does
    for any recipient without a route.

    Raises:
        NotFound: no such domain, or not the actor's.
        Conflict: messages for the domain are still queued and ``force`` is false.
    """
    domain = normalize_domain_name(name)
    async with store.session() as session:
        row = await _scoped_row(session, domain, actor)
        if not force:
            queued = await session.scalar(
                select(func.count()).select_from(SpoolEntry)
                .where(SpoolEntry.domain == domain, SpoolEntry.status == "queued"))
            if queued:
                raise Conflict(
                    f"{queued} message(s) for {domain} are still in the spool; deliver or delete them first, "
                    "or remove the domain anyway with force (mxguard domain remove --force; API ?force=true)")
        view = _view(row)
        audit.record(session, actor, "domain.remove", domain, org_id=row.org_id, before=view.as_dict())
        await session.delete(row)
        await bump_generation(session)
        await session.commit()
        return view


async def get_domain(store: Store, name: str, *, actor: Actor = SYSTEM) -> DomainView:
    """One domain's settings. Raises NotFound (also for another organization's domain)."""
    domain = normalize_domain_name(name)
    async with store.session() as session:
        return _view(await _scoped_row(session, domain, actor))


async def list_domains(store: Store, *, actor: Actor = SYSTEM) -> list[DomainView]:
    """Every domain the actor may see, sorted by name."""
    actor.require_console()
    q = actor.scope(select(Domain).order_by(Domain.name), Domain.org_id)
    async with store.session() as session:
        rows = (await session.execute(q)).unique().scalars().all()
        return [_view(r) for r in rows]
