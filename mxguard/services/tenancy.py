"""Who owns an address and a domain: the tenancy rules every caller (API, console, CLI) goes through.

* A ``user`` (Message Center) account's address must be in a domain of the
  user's own organization: mail is shown and released by address, so an
  address in another organization's domain would read that organization's
  quarantine. An ``org-admin``'s login address may be outside every served
  domain (an outside administrator) but never in a domain another
  organization serves. A global ``admin`` may have any address.
* A domain belongs to one organization: only a global admin may add a domain
  that is, or is a subdomain or parent of, a domain another organization (or
  no organization) serves.

Every refusal is written to the audit log (action ``*.refused``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from mxguard.errors import Conflict, ValidationFailed
from mxguard.services import audit
from mxguard.services.access import Actor, Role
from mxguard.storage.db import Store
from mxguard.storage.models import Domain, Organization, User


def address_domain(email: str) -> str:
    """The domain part of an address, lower case, without a trailing dot."""
    return email.rpartition("@")[2].rstrip(".").lower()


def overlaps(name: str, other: str) -> bool:
    """``name`` and ``other`` are the same domain, or one is a subdomain of the other (labels, not text:
    ``ab.test`` does not overlap ``b.test``)."""
    name, other = name.rstrip(".").lower(), other.rstrip(".").lower()
    return name == other or name.endswith("." + other) or other.endswith("." + name)


async def _refuse(store: Store, actor: Actor, action: str, target: str, reason: str) -> None:
    """Write the refusal to the audit log in its own transaction (the refused change rolls back)."""
    async with store.session() as session:
        audit.record(session, actor, action, target, org_id=actor.org_id, after={"refused": reason})
        await session.commit()


async def _owner(session, domain: str) -> tuple[bool, int | None]:
    """``(served, org_id)`` of a served domain name (exact match)."""
    row = (await session.execute(select(Domain.org_id).where(Domain.name == domain))).first()
    return (row is not None, row[0] if row else None)


async def check_user_address(store: Store, session, actor: Actor, email: str, role: str, org_id: int | None,
                             org_name: str | None) -> None:
    """Refuse an account whose address belongs to another organization (see the module docstring).

    Args:
        email: the normalised address.
        role: the account's role.
        org_id, org_name: the account's organization.

    Raises:
        ValidationFailed: field ``email`` (HTTP 422), after an audit entry ``user.add.refused``.
    """
    if role == Role.ADMIN:
        return
    domain = address_domain(email)
    served, owner = await _owner(session, domain)
    reason = None
    if role == Role.USER and (not served or owner != org_id):
        reason = (f"{domain} is not a domain of organization {org_name!r}: a Message Center user's address must "
                  "be in one of the organization's domains")
    elif role == Role.ORG_ADMIN and served and owner is None:
        # Served for no organization: only global administrators manage it, so it is no org-admin's.
        reason = (f"{domain} is served for no organization (only global administrators manage it); give it to "
                  f"{org_name!r} first: mxguard domain set {domain} --org {org_name!r}")
    elif role == Role.ORG_ADMIN and served and owner != org_id:
        reason = f"{domain} is served for another organization, not {org_name!r}"
    if reason:
        await _refuse(store, actor, "user.add.refused", email, reason)
        raise ValidationFailed("email", reason)


async def check_domain_claim(store: Store, session, actor: Actor, name: str, org_id: int | None) -> None:
    """Refuse an org-admin a domain that overlaps one another organization (or none) serves.

    Raises:
        Conflict: HTTP 409, after an audit entry ``domain.add.refused``.
    """
    if actor.is_admin:
        return
    rows = (await session.execute(select(Domain.name, Domain.org_id))).all()
    clashes = sorted(other for other, owner in rows if owner != org_id and overlaps(name, other))
    if clashes:
        reason = (f"{name} overlaps {', '.join(clashes)}, served for another organization; "
                  "only a global administrator can add it")
        await _refuse(store, actor, "domain.add.refused", name, reason)
        raise Conflict(reason)


@dataclass(frozen=True)
class Violation:
    """One existing account or domain that breaks the rules (data from before they were enforced)."""

    kind: str  # "user" or "domain"
    target: str
    problem: str


async def find_violations(store: Store) -> list[Violation]:
    """Every user and domain that breaks the tenancy rules, for ``mxguard doctor``."""
    async with store.session() as session:
        domains = (await session.execute(select(Domain.name, Domain.org_id))).all()
        orgs = dict((await session.execute(select(Organization.id, Organization.name))).all())
        users = (await session.execute(select(User.email, User.role, User.org_id))).all()
    owner = {name: org for name, org in domains}
    found: list[Violation] = []
    for email, role, org_id in users:
        domain = address_domain(email)
        org = orgs.get(org_id)
        if role == Role.USER and (domain not in owner or owner[domain] != org_id):
            holder = orgs.get(owner.get(domain)) if domain in owner else None
            where = f"served for {holder!r}" if holder else ("served for no organization" if domain in owner
                                                              else "not served")
            found.append(Violation("user", email, f"Message Center user of {org!r}, but {domain} is {where}"))
        elif role == Role.ORG_ADMIN and domain in owner and owner[domain] != org_id:
            found.append(Violation("user", email, f"org-admin of {org!r}, but {domain} is served for "
                                                   f"{orgs.get(owner[domain])!r}"))
    for i, (name, org_id) in enumerate(domains):
        for other, other_org in domains[i + 1:]:
            if other_org != org_id and overlaps(name, other):
                found.append(Violation("domain", name, f"overlaps {other} of {orgs.get(other_org)!r} "
                                                       f"(this one: {orgs.get(org_id)!r})"))
    return found
