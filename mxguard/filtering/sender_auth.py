"""Sender authentication: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489).

* DNS goes through dnspython, to the resolvers named in ``filters.dns_servers``
  (the system resolver when the list is empty). Tests point it at a DNS
  server on loopback, so no query leaves the machine.
* SPF is evaluated by pyspf in a worker thread; its lookups go through this
  module's resolver (pyspf's one lookup hook is routed by a context variable,
  so several checks with different resolvers can run at once).
* DKIM keys are fetched with dnspython's async resolver first, then dkimpy
  verifies with those keys (in a thread when the message is large).
* DMARC: the policy record of the From domain, else of its organizational
  domain (public suffix list); SPF or DKIM must pass *aligned* with the From
  domain (relaxed or strict, ``aspf``/``adkim``).

A DNS failure is an authentication result (``temperror``), never a reason to
defer a message.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import time
import logging
from concurrent.futures import ThreadPoolExecutor

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from mxguard.filtering.message import ParsedMessage, parse_addresses
from mxguard.filtering.verdict import AuthResults
from mxguard.netaddr import parse_host_port

_PSL = PublicSuffixList()
_current_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "mxguard_spf_resolver", default=None)
_original_lookup = spf.DNSLookup
#: dkimpy logs every failed signature at ERROR; the results say it already.
_DKIM_LOG = logging.getLogger("mxguard.dkim")
_DKIM_LOG.setLevel(logging.CRITICAL)
#: DKIM verification of bigger messages runs in a thread (RSA over the body hash is cheap, hashing is not).
DKIM_THREAD_THRESHOLD = 256 * 1024


def _routed_lookup(name, qtype, tcpfallback=True, timeout=30):
    """pyspf's lookup hook, sent to the resolver of the check that runs in this context."""
    resolver = _current_resolver.get()
    if resolver is None:
        return _original_lookup(name, qtype, tcpfallback, timeout)
    out = []
    try:
        answers = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime), search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return out
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from None
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {exc}") from None
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _routed_lookup


def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registered domain (public suffix plus one label)."""
    domain = domain.lower().rstrip(".")
    return _PSL.privatesuffix(domain) or domain


def aligned(a: str, b: str, strict: bool) -> bool:
    """RFC 7489 3.1: identifier alignment, strict (equal) or relaxed (same organizational domain)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if strict else organizational_domain(a) == organizational_domain(b)


def parse_tags(text: str) -> dict[str, str]:
    """A DMARC/DKIM tag list (``v=DMARC1; p=reject``) as a dict with lower-case keys."""
    tags: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    return tags


def _body_coverage(raw: bytes, canonicalization: str, length: str) -> tuple[int, int]:
    """``(l= value, canonicalized body length)`` in bytes for a DKIM signature (RFC 6376 3.4, 3.5).

    The body is canonicalized with dkimpy's own policy for the signature's ``c=`` tag, so the
    count is the one the signer's ``l=`` refers to. An ``l=`` that is not a number counts as 0.
    """
    _, body = dkim.rfc822_parse(raw)
    try:
        policy = CanonicalizationPolicy.from_c_value(canonicalization.strip().encode())
    except InvalidCanonicalizationPolicyError:
        policy = CanonicalizationPolicy.from_c_value(b"simple/simple")
    total = len(policy.canonicalize_body(body))
    covered = int(length) if length.strip().isdigit() and len(length.strip()) <= 76 else 0
    return covered, total


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")


class SenderAuth:
    """Runs the three checks for one message.

    Args:
        dns_servers: ``HOST[:PORT]`` resolvers; empty for the system resolver.
        timeout: seconds per DNS query.
        hostname: the gateway's name (pyspf's receiver, for explanations).
        body_length: what a passing signature whose ``l=`` covers less than the whole body
            counts as: ``fail`` (default; the unsigned tail could say anything, RFC 6376
            section 8.2) or ``allow`` (a pass, as RFC 6376 permits).
    """

    def __init__(self, dns_servers: list[str] | None = None, timeout: float = 3.0, hostname: str = "localhost",
                 body_length: str = "fail"):
        self.timeout = timeout
        self.body_length = body_length
        self.hostname = hostname
        self.resolver = self._configure(dns.resolver.Resolver(configure=not dns_servers), dns_servers)
        self.aresolver = self._configure(dns.asyncresolver.Resolver(configure=not dns_servers), dns_servers)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mxguard-auth")
        # SPF results by (client IP, sender, HELO) for a few minutes: a sending server
        # usually sends many messages in a row, and each check costs a thread hop and
        # several lookups. Only pass/fail/softfail/neutral/none are kept; errors are not.
        self._spf_cache: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._txt_cache: dict[str, tuple[float, list[str]]] = {}
        self.spf_cache_ttl = 300.0
        self.spf_cache_size = 10000

    def _configure(self, resolver, servers):
        if servers:
            hosts = [parse_host_port(s, default_port=53) for s in servers]
            resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in hosts]
        resolver.timeout = self.timeout
        # One try per query within the timeout: a resolver that is down must not stall each message.
        resolver.lifetime = self.timeout
        resolver.cache = dns.resolver.LRUCache(4096)
        return resolver

    async def txt(self, name: str) -> list[str] | None:
        """TXT strings at ``name``: ``[]`` when there are none, ``None`` on a DNS error.

        Answers are kept for their TTL (at most an hour) and "no such record" for a
        minute (RFC 2308 negative caching, simplified), so a sender's DMARC record is
        not looked up again for every message it sends.
        """
        now = time.monotonic()
        cached = self._txt_cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answer = await self.aresolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self._remember_txt(name, now + 60, [])
            return []
        except dns.exception.DNSException:
            return None
        strings = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        self._remember_txt(name, now + min(3600, answer.rrset.ttl if answer.rrset is not None else 60), strings)
        return strings

    def _remember_txt(self, name: str, expires: float, value: list[str]) -> None:
        if len(self._txt_cache) >= 10000:
            self._txt_cache.clear()
        self._txt_cache[name] = (expires, value)

    # -- SPF ----------------------------------------------------------------------------

    def _spf_sync(self, ip: str, sender: str, helo: str) -> tuple[str, str]:
        token = _current_resolver.set(self.resolver)
        try:
            query = spf.query(i=ip, s=sender, h=helo, receiver=self.hostname, timeout=self.timeout * 3,
                              querytime=self.timeout * 6)
            result, _code, _text = query.check()
        finally:
            _current_resolver.reset(token)
        return result, _code

    async def spf(self, client_ip: str, mail_from: str, helo: str) -> tuple[str, str]:
        """``(result, domain)`` for the envelope sender, or the HELO name for ``<>`` (RFC 7208 2.3/2.4)."""
        if not client_ip:
            return "none", ""
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return "none", ""
        sender = mail_from or f"postmaster@{helo}"
        domain = _domain_of(sender)
        if not domain or "." not in domain:
            return "none", domain
        key = (client_ip, sender.lower(), helo.lower())
        now = time.monotonic()
        cached = self._spf_cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1], domain
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        try:
            result, _ = await loop.run_in_executor(self._pool, ctx.run, self._spf_sync, client_ip, sender, helo)
        except Exception:  # noqa: BLE001 - pyspf raises on odd input; that is a permerror
            return "permerror", domain
        result = (result or "none").lower()
        if result in ("pass", "fail", "softfail", "neutral", "none"):
            if len(self._spf_cache) >= self.spf_cache_size:
                self._spf_cache.clear()
            self._spf_cache[key] = (now + self.spf_cache_ttl, result)
        return result, domain

    # -- DKIM ---------------------------------------------------------------------------

    async def dkim(self, message: ParsedMessage, *, tlsrpt: bool = False) -> list[dict[str, str]]:
        """One ``{"result", "domain", "selector"}`` per DKIM-Signature (at most 5).

        Args:
            tlsrpt: the message is a TLS-RPT report (RFC 8460 5.3): keys published for reports
                only (``s=tlsrpt``) are accepted, which ordinary mail must not be.
        """
        signatures = message.msg.get_all("DKIM-Signature") or []
        if not signatures:
            return []
        results: list[dict[str, str]] = []
        keys: dict[bytes, bytes | None] = {}
        wanted = []
        lengths: list[tuple[str, str | None]] = []  # (c=, l=) of each signature
        for sig in signatures[:5]:
            tags = parse_tags(" ".join(str(sig).split()))
            domain, selector = tags.get("d", "").lower(), tags.get("s", "")
            wanted.append((domain, selector))
            lengths.append((tags.get("c", "simple/simple"), tags.get("l")))
            if domain and selector:
                name = f"{selector}._domainkey.{domain}"
                if name.encode() not in keys:
                    records = await self.txt(name)
                    keys[name.encode()] = None if records is None else ("".join(records).encode() or b"")
        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            key = name.rstrip(b".")
            value = keys.get(key)
            if value is None and key in keys:
                raise dkim.DnsTimeoutError("DNS lookup failed")
            return value or None

        def verify_all() -> list[str]:
            verdicts = []
            d = dkim.DKIM(message.raw, logger=_DKIM_LOG, tlsrpt=tlsrpt)
            for idx, (domain, selector) in enumerate(wanted):
                if domain and selector and keys.get(f"{selector}._domainkey.{domain}".encode(), b"") is None:
                    verdicts.append("temperror")  # the key lookup failed (RFC 6376 6.1.2: TEMPFAIL)
                    continue
                try:
                    verdicts.append("pass" if d.verify(idx=idx, dnsfunc=dnsfunc) else "fail")
                except dkim.DnsTimeoutError:
                    verdicts.append("temperror")
                except dkim.KeyFormatError:
                    verdicts.append("permerror")
                except dkim.ValidationError:
                    verdicts.append("permerror")
                except dkim.DKIMException as exc:
                    verdicts.append("neutral" if "no key" in str(exc).lower() else "permerror")
                except Exception:  # noqa: BLE001 - dkimpy on hostile input
                    verdicts.append("permerror")
            return verdicts

        if len(message.raw) > DKIM_THREAD_THRESHOLD:
            verdicts = await asyncio.get_running_loop().run_in_executor(self._pool, verify_all)
        else:
            verdicts = verify_all()
        for (domain, selector), verdict, (canon, length) in zip(wanted, verdicts, lengths):
            if verdict == "fail" and domain and keys.get(f"{selector}._domainkey.{domain}".encode()) == b"":
                verdict = "permerror"  # no key published (RFC 6376 6.1.2)
            result = {"result": verdict, "domain": domain, "selector": selector}
            if verdict == "pass" and length is not None and self.body_length == "fail":
                covered, total = _body_coverage(message.raw, canon, length)
                if covered < total:
                    # RFC 6376 8.2: text after the l= count is unsigned; the signature does not
                    # vouch for this message, so it does not count (Rspamd's default too).
                    result = {**result, "result": "fail",
                              "reason": f"body length l={covered} is shorter than the body ({total} bytes)"}
            results.append(result)
        return results

    # -- DMARC ---------------------------------------------------------------------------

    async def dmarc_record(self, from_domain: str) -> tuple[dict[str, str] | None, bool, bool]:
        """``(tags, from_org_domain, dns_error)``: the DMARC record for the domain, else its org domain."""
        for domain, is_org in ((from_domain, False), (organizational_domain(from_domain), True)):
            if is_org and domain == from_domain:
                break
            records = await self.txt(f"_dmarc.{domain}")
            if records is None:
                return None, False, True
            found = [parse_tags(r) for r in records if r.strip().lower().startswith("v=dmarc1")]
            if len(found) == 1 and found[0].get("p"):
                return found[0], is_org, False
        return None, False, False

    # -- all of it ---------------------------------------------------------------------

    async def check(self, message: ParsedMessage) -> AuthResults:
        """The three checks for one message (never raises on DNS or message problems)."""
        env = message.envelope
        from_domain = ""
        try:
            addresses = parse_addresses(message.header("From"))
            if addresses and addresses[0][1]:
                from_domain = _domain_of(addresses[0][1])
        except (TypeError, ValueError, IndexError):
            from_domain = ""
        (spf_result, spf_domain), dkim_results = await asyncio.gather(
            self.spf(env.client_ip, env.mail_from, env.helo), self.dkim(message))
        auth = AuthResults(spf=spf_result, spf_domain=spf_domain, dkim=dkim_results, from_domain=from_domain)
        sender_domain = _domain_of(env.mail_from) if env.mail_from else ""
        auth.sender_aligned = bool(sender_domain) and (
            (spf_result == "pass" and spf_domain == sender_domain)
            or any(d["result"] == "pass" and aligned(d["domain"], sender_domain, False) for d in dkim_results))
        if from_domain:
            record, _, dns_error = await self.dmarc_record(from_domain)
            if dns_error:
                auth.dmarc = "temperror"
            elif record is not None:
                strict_spf = record.get("aspf", "r").lower() == "s"
                strict_dkim = record.get("adkim", "r").lower() == "s"
                passed = (spf_result == "pass" and aligned(spf_domain, from_domain, strict_spf)) or any(
                    d["result"] == "pass" and aligned(d["domain"], from_domain, strict_dkim) for d in dkim_results)
                auth.dmarc = "pass" if passed else "fail"
                auth.dmarc_policy = record.get("p", "none").lower()
        return auth

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
