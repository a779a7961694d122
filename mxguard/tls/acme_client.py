"""Certificates from an ACME CA (RFC 8555), validated by HTTP-01, stored as SNI certificates.

One order: register (or find) the account, order the names, publish each
HTTP-01 key authorization in the shared token table (the responder, in the
gateway or started by the CLI, serves it), tell the CA to validate, poll,
finalize with a CSR for a fresh key, download the chain, and store it through
:mod:`mxguard.services.sni_certificates` for every name (so validation,
sealing, tenancy, the audit log and the expiry alert apply as to an upload).

The ``acme`` library is synchronous (``requests``): its calls run in a worker
thread; the database calls stay on the event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

import josepy
import requests
import structlog
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mxguard import __version__
from mxguard.config import Settings
from mxguard.errors import AcmeFailed, AlreadyExists, ConfigError, ValidationFailed
from mxguard.services import sni_certificates as sni
from mxguard.services.access import SYSTEM, Actor
from mxguard.storage.db import Store
from mxguard.storage.sealing import Sealer
from mxguard.tls import acme_store
from mxguard.tls.acme_account import AccountKeyError, ensure_account_key
from mxguard.tls.sni import WILDCARD, normalize_sni_name

log = structlog.get_logger("mxguard.acme")


@dataclass(frozen=True)
class Issued:
    """A certificate issued and stored.

    Attributes:
        names: the identifiers it covers (the first is the main name).
        views: the stored SNI certificate of each name.
    """

    names: tuple[str, ...]
    views: tuple[sni.SniCertView, ...]


def check_names(names: list[str]) -> list[str]:
    """Normalise the names of an order; the first is the main one.

    Raises:
        ValidationFailed: field ``name``: none given, not a host name, or a wildcard
            (RFC 8555 8.3: HTTP-01 cannot validate a wildcard; 7.1.3).
    """
    if not names:
        raise ValidationFailed("name", "give at least one name")
    out: list[str] = []
    for name in names:
        normalized = normalize_sni_name(name)
        if normalized.startswith(WILDCARD):
            raise ValidationFailed("name", f"{normalized}: a wildcard cannot be validated by HTTP-01 "
                                           "(RFC 8555 section 7.1.3); order each host name")
        if normalized not in out:
            out.append(normalized)
    return out


def make_key_and_csr(names: list[str]) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a CSR (RFC 2986) for ``names`` (all in the SAN), both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))  # the names are in the SAN; CAs ignore the subject (RFC 8555 7.4)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _ca_said(error: object) -> str:
    """The CA's problem document (RFC 8555 6.7) in one line: its detail, else its type."""
    if isinstance(error, messages.Error):
        return error.detail or error.description or str(error.typ)
    return str(error)


class _Session:
    """The synchronous ACME conversation (runs in a worker thread)."""

    def __init__(self, settings: Settings, account_key: josepy.JWKEC):
        a = settings.acme
        verify: bool | str = str(settings.path(a.ca_file)) if a.ca_file else True
        self.account_key = account_key
        self.net = client.ClientNetwork(account_key, alg=josepy.ES256, verify_ssl=verify,
                                        user_agent=f"mxguard/{__version__}", timeout=30)
        self.directory_url = a.directory_url
        self.contact = a.contact_email
        self.acme: client.ClientV2 | None = None

    def register(self) -> None:
        """Fetch the directory and register the account, or find it (RFC 8555 7.3, 7.3.1)."""
        directory = client.ClientV2.get_directory(self.directory_url, self.net)
        self.acme = client.ClientV2(directory, self.net)
        reg = messages.NewRegistration.from_data(email=self.contact or None, terms_of_service_agreed=True)
        try:
            self.acme.new_account(reg)
            log.info("ACME account registered", directory=self.directory_url)
        except errors.ConflictError as exc:
            # The key has an account already: use it (the CA said where it is).
            self.net.account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            log.debug("ACME account exists", account=exc.location)


async def _run(step: str, func, *args):
    """Run one blocking ACME call in a thread, turning its failures into :class:`AcmeFailed` for ``step``."""
    try:
        return await asyncio.to_thread(func, *args)
    except errors.ValidationError as exc:
        said = "; ".join(f"{a.body.identifier.value}: {_ca_said(c.error)}" for a in exc.failed_authzrs
                         for c in a.body.challenges if c.error is not None)
        raise AcmeFailed(f"the CA could not validate the challenge: {said}") from None
    except errors.TimeoutError:
        raise AcmeFailed(f"{step}: the CA did not finish in time (acme.order_timeout)") from None
    except errors.IssuanceError as exc:
        raise AcmeFailed(f"{step}: the CA refused to issue: {_ca_said(exc.error)}") from None
    except messages.Error as exc:
        raise AcmeFailed(f"{step}: the CA said: {_ca_said(exc)}") from None
    except requests.exceptions.SSLError as exc:
        raise AcmeFailed(f"{step}: the ACME server's certificate is not trusted (acme.ca_file): "
                         f"{str(exc)[:300]}") from None
    except requests.exceptions.RequestException as exc:
        raise AcmeFailed(f"{step}: cannot reach the ACME server: {str(exc)[:300]}") from None
    except errors.Error as exc:
        raise AcmeFailed(f"{step}: {exc or type(exc).__name__}") from None


def _http01(authzr: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authzr.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    raise AcmeFailed(f"the CA offers no http-01 challenge for {authzr.body.identifier.value}")


async def issue(settings: Settings, store: Store, sealer: Sealer, names: list[str], *, replace: bool = False,
                actor: Actor = SYSTEM) -> Issued:
    """Order a certificate for ``names`` and store it as the SNI certificate of each.

    The HTTP-01 responder must be serving ``acme.http_listen`` for the
    duration (the gateway's, or one the caller started).

    Args:
        settings: ``[acme]`` (directory, contact, account key, CA bundle, order timeout) and ``tls.min_version``.
        store: the database (tokens, the SNI certificates, the ACME records).
        sealer: seals the new private key.
        names: host names; the first is the main one (renewals are tracked by it).
        replace: replace certificates stored for the names already (renewal).
        actor: who asks (tenancy of the SNI service).

    Raises:
        ConfigError: ACME is off (``acme.directory_url``) or the account key is unusable.
        ValidationFailed: a name is not a host name, or is a wildcard.
        AlreadyExists: a name has a certificate and ``replace`` is false (checked before ordering).
        AcmeFailed: the CA refused, a challenge failed (with what the CA said), or it timed out.
        PermissionDenied: the actor may not store certificates for a name.
    """
    a = settings.acme
    if not a.directory_url:
        raise ConfigError("acme.directory_url is empty: ACME is off; set the CA's directory URL in [acme]")
    names = check_names(names)
    stored = await sni.stored_fingerprints(store)
    if not replace:
        taken = [n for n in names if n in stored]
        if taken:
            raise AlreadyExists(f"a certificate for {', '.join(taken)} is stored already; remove it first or "
                                "replace it")
    try:
        account_key = ensure_account_key(settings.path(a.account_key_file))
    except AccountKeyError as exc:
        raise ConfigError(f"acme.account_key_file ({a.account_key_file}): {exc}") from None
    session = _Session(settings, account_key)
    log.info("ACME order starting", names=names, directory=a.directory_url, replace=replace)
    await _run("registering the account", session.register)
    key_pem, csr_pem = make_key_and_csr(names)
    order = await _run("creating the order", session.acme.new_order, csr_pem)
    tokens: list[str] = []
    try:
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reuses a recent validation (RFC 8555 7.1.4)
            challb = _http01(authzr)
            response, validation = challb.response_and_validation(account_key)
            token = challb.chall.encode("token")
            await acme_store.publish_token(store, token, authzr.body.identifier.value, validation)
            tokens.append(token)
            await _run(f"answering the challenge for {authzr.body.identifier.value}",
                       session.acme.answer_challenge, challb, response)
        deadline = dt.datetime.now() + dt.timedelta(seconds=a.order_timeout)
        order = await _run("waiting for validation and the certificate", session.acme.poll_and_finalize,
                           order, deadline)
    finally:
        await acme_store.withdraw_tokens(store, tokens)
    chain_pem = order.fullchain_pem.encode("ascii")
    views = []
    for name in names:
        views.append(await sni.add_sni_certificate(store, sealer, name, chain_pem, key_pem, actor=actor,
                                                   replace=replace,
                                                   min_version=settings.tls.min_version))
    await acme_store.record_issued(store, names, a.directory_url, views[0].not_after)
    log.info("ACME certificate issued", names=names, not_after=views[0].not_after.isoformat(),
             fingerprint=views[0].fingerprint)
    return Issued(tuple(names), tuple(views))
