"""MTA-STS (RFC 8461): the ``_mta-sts`` TXT record, the HTTPS policy, its cache, MX matching.

A policy is found in two steps (RFC 8461 section 3): the TXT record
``_mta-sts.<domain>`` (``v=STSv1; id=...``) says a policy exists and names its
version; the policy itself is fetched over HTTPS with a verified certificate
from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``, without following
redirects, as ``text/plain`` of at most 64 KiB. A fetched policy is cached for
its ``max_age`` and fetched again when the TXT ``id`` changes (section 5.1).

``enforce`` means: deliver only to MX hosts matching one of the ``mx``
patterns, over TLS with a PKIX-valid certificate for that host (section 4);
``testing`` delivers anyway and reports; ``none`` (or no policy) applies
nothing.
"""

from __future__ import annotations

import re
import ssl
import time
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.resolver

#: RFC 8461 section 3.3: "the policy body MUST NOT be larger than 64 KiB".
MAX_POLICY_BYTES = 64 * 1024
#: RFC 8461 section 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31557600
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(Exception):
    """A TXT record or policy that cannot be used.

    Attributes:
        result_type: the RFC 8460 result type (``sts-policy-fetch-error`` or ``sts-policy-invalid``).
    """

    def __init__(self, message: str, result_type: str = "sts-policy-invalid"):
        super().__init__(message)
        self.result_type = result_type


@dataclass(frozen=True)
class StsPolicy:
    """A parsed policy (RFC 8461 section 3.2).

    Attributes:
        mode: ``enforce``, ``testing`` or ``none``.
        mx: the MX patterns, lower case (``mail.example.com`` or ``*.example.com``).
        max_age: seconds it may be cached.
        policy_id: the TXT record's ``id`` it was fetched for.
    """

    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""

    def matches(self, host: str) -> bool:
        """Whether an MX host name matches one of the patterns (RFC 8461 section 4.1:
        a leading ``*.`` stands for exactly one label)."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                head, _, rest = host.partition(".")
                if head and "." + rest == suffix:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(values: list[str]) -> str | None:
    """The policy ``id`` from the ``_mta-sts`` TXT strings, or ``None`` when there is no usable record.

    RFC 8461 section 3.1: records not starting with ``v=STSv1`` are ignored; more than one
    STSv1 record means no policy.

    Raises:
        PolicyError: the one STSv1 record has no valid ``id``.
    """
    records = [v for v in values if v.startswith("v=STSv1")]
    if len(records) != 1:
        return None
    fields = dict(part.strip().partition("=")[::2] for part in records[0].split(";") if part.strip())
    policy_id = fields.get("id", "").strip()
    if not _ID.match(policy_id):
        raise PolicyError(f"_mta-sts TXT id {policy_id!r} is not 1-32 letters or digits")
    return policy_id


def parse_policy(text: str, policy_id: str = "") -> StsPolicy:
    """Parse the policy body (RFC 8461 section 3.2: ``key: value`` lines, CRLF or LF).

    Raises:
        PolicyError: wrong version, unknown mode, missing or bad ``max_age``, no ``mx`` for
            ``enforce``/``testing``.
    """
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"policy line without ':': {line[:60]!r}")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError(f"policy version {fields.get('version')!r} is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none") or len(fields.get("mode", [])) != 1:
        raise PolicyError(f"policy mode {mode!r} is not enforce, testing or none")
    age_text = (fields.get("max_age") or [""])[0]
    if not age_text.isdigit() or len(age_text) > 10:
        raise PolicyError(f"policy max_age {age_text!r} is not a whole number of seconds")
    max_age = min(int(age_text), MAX_AGE_LIMIT)
    mx = tuple(p.lower().rstrip(".") for p in fields.get("mx", []) if p)
    if mode != "none" and not mx:
        raise PolicyError("policy has no mx pattern")
    return StsPolicy(mode, mx, max_age, policy_id)


@dataclass
class _Cached:
    policy: StsPolicy
    expires: float


@dataclass
class StsFetcher:
    """Finds, fetches and caches MTA-STS policies.

    Args:
        nameservers: resolver addresses for the TXT and address lookups (``None``: the system's).
        nameserver_port: their port.
        timeout: seconds per DNS lookup and for the HTTPS fetch.
        verify: what httpx verifies the policy host's certificate with (``True``: the
            system trust store; an :class:`ssl.SSLContext` for a private CA).
        https_port: the policy host's port (443; another only for tests on loopback).
    """

    nameservers: list[str] | None = None
    nameserver_port: int = 53
    timeout: float = 5.0
    verify: bool | ssl.SSLContext = True
    https_port: int = 443
    _cache: dict[str, _Cached] = field(default_factory=dict)

    def _resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=self.nameservers is None)
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
            resolver.port = self.nameserver_port
        resolver.lifetime = self.timeout
        return resolver

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self._resolver().resolve(f"_mta-sts.{domain}.", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise PolicyError(f"_mta-sts.{domain} TXT lookup failed: {type(exc).__name__}",
                              "sts-policy-fetch-error") from None
        return parse_txt([b"".join(r.strings).decode("ascii", "replace") for r in answer])

    async def _address(self, host: str) -> str:
        try:
            answer = await self._resolver().resolve(host, "A")
        except dns.exception.DNSException as exc:
            raise PolicyError(f"{host}: no address ({type(exc).__name__})", "sts-policy-fetch-error") from None
        return answer[0].address

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        import httpx  # here, not at the top: most gateways never fetch a policy (memory per process)

        host = f"mta-sts.{domain}"
        address = await self._address(host) if self.nameservers is not None else host
        url = f"https://{address}:{self.https_port}/.well-known/mta-sts.txt"
        try:
            async with httpx.AsyncClient(verify=self.verify, timeout=self.timeout, follow_redirects=False,
                                         trust_env=False) as client:
                # Connect to the address, but send SNI and Host for the policy host: the
                # certificate is checked against mta-sts.<domain> (RFC 8461 section 3.3).
                async with client.stream("GET", url, headers={"Host": host},
                                         extensions={"sni_hostname": host}) as response:
                    if response.status_code != 200:
                        raise PolicyError(f"{host}: HTTP {response.status_code} (redirects are not followed)",
                                          "sts-policy-fetch-error")
                    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if ctype != "text/plain":
                        raise PolicyError(f"{host}: Content-Type {ctype!r} is not text/plain")
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_POLICY_BYTES:
                            raise PolicyError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise PolicyError(f"{host}: fetch failed: {type(exc).__name__}: {str(exc)[:120]}",
                              "sts-policy-fetch-error") from None
        return parse_policy(body.decode("utf-8", "replace"), policy_id)

    async def policy(self, domain: str) -> StsPolicy | None:
        """The domain's current policy, or ``None`` when it publishes none.

        A cached policy is used until ``max_age`` unless the TXT ``id`` changed; when a
        refresh fails, a policy still cached is kept (RFC 8461 section 5.1).

        Raises:
            PolicyError: no usable policy could be had and none is cached.
        """
        domain = domain.rstrip(".").lower()
        now = time.monotonic()
        cached = self._cache.get(domain)
        try:
            policy_id = await self._txt_id(domain)
        except PolicyError:
            if cached and cached.expires > now:
                return cached.policy
            raise
        if policy_id is None:
            if cached and cached.expires > now:
                return cached.policy  # section 5.1: a vanished TXT does not end a cached policy
            return None
        if cached and cached.expires > now and cached.policy.policy_id == policy_id:
            return cached.policy
        try:
            fresh = await self._fetch(domain, policy_id)
        except PolicyError:
            if cached and cached.expires > now:
                return cached.policy
            raise
        self._cache[domain] = _Cached(fresh, now + fresh.max_age)
        return fresh
