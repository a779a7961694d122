"""Who may relay: the decision the SMTP front door asks for each session.

A session may relay for an organization when (checked in this order):

1. it showed, at STARTTLS, a **client certificate** the organization registered
   (the leaf's SHA-256 fingerprint, or one issued by a registered CA; the chain is
   checked with ``cryptography``'s RFC 5280 client profile);
2. it **authenticated** (SMTP AUTH PLAIN or LOGIN, RFC 4954, only inside TLS) with
   one of the organization's credentials (argon2id, verified in a worker thread);
3. it comes from one of the organization's **source networks** (the most specific
   registered network decides).

Anyone else is never relayed. A relaying session's envelope sender must be in
one of the organization's domains (:meth:`RelayAccess.sender_allowed`).

The gateway keeps every entry in memory, reloaded with the configuration
generation (:meth:`RelayAccess.load`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from mxguard.services.passwords import verify_password
from mxguard.services.relay import RelayAccessData, load_access_data
from mxguard.storage.db import Store
from mxguard.tls.client_certs import PeerCertificate, chain_problem

log = structlog.get_logger("mxguard.relay")

EMPTY = RelayAccessData({}, {}, [], {}, {}, [], ())


@dataclass(frozen=True)
class RelayGrant:
    """A session's right to relay for one organization.

    Attributes:
        org_id, org: the organization.
        method: ``certificate``, ``auth`` or ``network``.
        identity: the certificate's SHA-256, the AUTH user name, or the matching network.
        domains: the organization's domains (the envelope sender must be in one).
    """

    org_id: int
    org: str
    method: str
    identity: str
    domains: frozenset[str]

    def describe(self) -> str:
        """``auth:relay@example.com (Example)`` — for the log and the Received comment."""
        return f"{self.method}:{self.identity} ({self.org})"


def sender_domain(address: str) -> str | None:
    """The lower-cased domain of an envelope sender, ``None`` for ``<>`` or an address without one."""
    local, at, domain = (address or "").rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    return domain if at and local and domain else None


class RelayAccess:
    """The relay entries of every organization, kept in step with the database.

    Args:
        store: the database (``None``: entries only through :meth:`set_data`, for tests).
        trust_dir: where the PEM bundle of registered CAs and leaves is written for the TLS context.
        on_client_cas: called after each load with the bundle's path (``[]`` when nothing is
            registered): the inbound TLS context asks clients for a certificate while there is one.
    """

    def __init__(self, store: Store | None = None, *, trust_dir: Path | None = None,
                 on_client_cas: Callable[[list[str]], None] | None = None):
        self.store = store
        self.trust_dir = trust_dir
        self.on_client_cas = on_client_cas
        self.data = EMPTY
        #: Certificate SHA-256 -> grant (or None), for the current data: a chain check per
        #: certificate, not per message. Bounded: cleared when it reaches 10,000 entries.
        self._cert_grants: dict[str, RelayGrant | None] = {}

    async def load(self) -> None:
        """Read every organization's entries (raises SQLAlchemyError if the database is down)."""
        self.set_data(await load_access_data(self.store))

    def set_data(self, data: RelayAccessData) -> None:
        """Use these entries from now on (replaced whole; sessions read them without locks)."""
        self.data = data
        self._cert_grants = {}
        files: list[str] = []
        if data.trust_pem and self.trust_dir is not None:
            bundle = "".join(data.trust_pem).encode()
            # A new name for new contents: the TLS context reloads CA files by name.
            path = self.trust_dir / f"relay-client-cas-{hashlib.sha256(bundle).hexdigest()[:16]}.pem"
            if not path.exists():
                self.trust_dir.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(bundle)
                tmp.replace(path)
            files.append(str(path))
        if self.on_client_cas is not None:
            self.on_client_cas(files)
        log.debug("relay access loaded", networks=len(data.networks), credentials=len(data.credentials),
                  certificates=len(data.fingerprints) + len(data.cas))

    @property
    def has_credentials(self) -> bool:
        """True when some organization has an SMTP AUTH credential (AUTH is offered only then, inside TLS)."""
        return bool(self.data.credentials)

    @property
    def wants_certificates(self) -> bool:
        """True when some organization registered a client certificate."""
        return bool(self.data.fingerprints or self.data.cas)

    def _grant(self, org_id: int, method: str, identity: str) -> RelayGrant | None:
        org = self.data.orgs.get(org_id)
        if org is None:
            return None
        return RelayGrant(org_id, org, method, identity, self.data.domains.get(org_id, frozenset()))

    def by_network(self, ip: str) -> RelayGrant | None:
        """The grant of the most specific registered network holding ``ip``, else ``None``."""
        if not self.data.networks:
            return None
        try:
            addr = ipaddress.ip_address((ip or "").split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net, org_id in self.data.networks:
            if addr.version == net.version and addr in net:
                return self._grant(org_id, "network", str(net))
        return None

    def by_certificate(self, cert: PeerCertificate | None) -> RelayGrant | None:
        """The grant of a registered client certificate (fingerprint first, then issuing CA), else ``None``."""
        if cert is None:
            return None
        if cert.sha256 in self._cert_grants:
            return self._cert_grants[cert.sha256]
        grant = None
        org_id = self.data.fingerprints.get(cert.sha256)
        if org_id is not None:
            grant = self._grant(org_id, "certificate", cert.sha256)
        else:
            for ca, ca_org in self.data.cas:
                if chain_problem(cert.cert, (ca,)) is None:
                    grant = self._grant(ca_org, "certificate", cert.sha256)
                    break
        if len(self._cert_grants) >= 10_000:
            self._cert_grants.clear()
        self._cert_grants[cert.sha256] = grant
        return grant

    async def authenticate(self, username: str, password: str) -> RelayGrant | None:
        """The grant for an SMTP AUTH identity whose password matches, else ``None``.

        An unknown user name costs as much as a wrong password (argon2 against a dummy hash),
        so the answer's timing does not tell which names exist.
        """
        entry = self.data.credentials.get(username)
        ok = await asyncio.to_thread(verify_password, entry[1] if entry else None, password)
        if not ok or entry is None:
            return None
        return self._grant(entry[0], "auth", username)

    @staticmethod
    def sender_allowed(grant: RelayGrant, sender: str) -> bool:
        """True when the envelope sender's domain is one of the grant's organization's domains."""
        domain = sender_domain(sender)
        return domain is not None and domain in grant.domains
