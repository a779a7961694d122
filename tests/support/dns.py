"""A DNS server on loopback (dnslib) with SPF, DKIM and DMARC records for the test domains.

Every lookup the filters (and Rspamd) make in the tests goes here, so no
DNS query leaves the machine. Names it does not know get NXDOMAIN at once.

Test domains:

=================  ==================================  =====================  =====================
domain             SPF                                 DKIM (selector sel)    DMARC
=================  ==================================  =====================  =====================
``pass.test``      ``ip4:127.0.0.0/8 -all``            key of ``dkim_key``    ``p=reject``
``fail.test``      ``ip4:192.0.2.1 -all``              key of another pair    ``p=reject``
``soft.test``      ``~all``                            —                      ``p=quarantine``
``none.test``      —                                   —                      —
=================  ==================================  =====================  =====================
"""

from __future__ import annotations

import base64
import threading

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def _rsa_pair() -> tuple[bytes, str]:
    """``(PEM private key, base64 SubjectPublicKeyInfo)`` of a new 2048-bit RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def _txt_chunks(text: str) -> TXT:
    # A TXT character-string holds at most 255 octets (RFC 1035 3.3.14).
    data = text.encode()
    return TXT([data[i:i + 255] for i in range(0, len(data), 255)])


class _ZoneResolver(BaseResolver):
    def __init__(self, zone: dict[tuple[str, str], list]):
        self.zone = zone
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
        with self._lock:
            answers = list(self.zone.get((qname, qtype), ()))
            alias = self.zone.get((qname, "CNAME")) if qtype != "CNAME" else None
            target = str(alias[0].label).rstrip(".").lower() if alias and not answers else None
            chased = list(self.zone.get((target, qtype), ())) if target else []
            known = any(name == qname for name, _ in self.zone)
        if answers:
            for rdata in answers:
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=60))
        elif target:
            # An alias: the CNAME, then the target's records (RFC 1034 3.6.2), as a recursive server answers.
            reply.add_answer(RR(request.q.qname, QTYPE.CNAME, rdata=alias[0], ttl=60))
            for rdata in chased:
                reply.add_answer(RR(target + ".", request.q.qtype, rdata=rdata, ttl=60))
        elif not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class LoopbackDNS:
    """``start()``, then ``address`` (``127.0.0.1:PORT``); ``sign(message, domain)`` DKIM-signs for a test domain."""

    def __init__(self):
        self.dkim_key, pass_pub = _rsa_pair()
        self.other_key, other_pub = _rsa_pair()
        zone: dict[tuple[str, str], list] = {}

        def txt(name: str, value: str) -> None:
            zone.setdefault((name, "TXT"), []).append(_txt_chunks(value))

        txt("pass.test", "v=spf1 ip4:127.0.0.0/8 -all")
        txt("sel._domainkey.pass.test", f"v=DKIM1; k=rsa; p={pass_pub}")
        txt("_dmarc.pass.test", "v=DMARC1; p=reject; adkim=r; aspf=r")
        txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        txt("sel._domainkey.fail.test", f"v=DKIM1; k=rsa; p={pass_pub}")
        txt("_dmarc.fail.test", "v=DMARC1; p=reject")
        txt("soft.test", "v=spf1 ~all")
        txt("_dmarc.soft.test", "v=DMARC1; p=quarantine")
        zone[("mx.pass.test", "A")] = [A("127.0.0.1")]
        zone[("none.test", "A")] = [A("127.0.0.1")]
        self.resolver = _ZoneResolver(zone)
        self.server: DNSServer | None = None
        self.port = 0

    def start(self) -> "LoopbackDNS":
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self.server = DNSServer(self.resolver, port=0, address="127.0.0.1", logger=quiet)
        self.server.start_thread()
        self.port = self.server.server.server_address[1]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server.server.server_close()

    def set_records(self, name: str, qtype: str, rdatas: list) -> None:
        """Replace the records of ``(name, qtype)`` (dnslib rdata objects; ``[]`` removes them)."""
        key = (name.rstrip(".").lower(), qtype)
        with self.resolver._lock:
            if rdatas:
                self.resolver.zone[key] = list(rdatas)
            else:
                self.resolver.zone.pop(key, None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        return list(self.resolver.queries)

    def sign(self, message: bytes, domain: str = "pass.test", *, wrong_key: bool = False,
             length: bool = False, canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed")) -> bytes:
        """DKIM-sign ``message`` as ``d=domain; s=sel`` (relaxed/relaxed by default).

        Args:
            wrong_key: sign with a key whose public half is not published (verification fails).
            length: add the body length tag ``l=`` (dkimpy ``length=True``).
        """
        key = self.other_key if wrong_key else self.dkim_key
        signature = dkim.sign(message, b"sel", domain.encode(), key, canonicalize=canonicalize, length=length,
                              include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        return signature.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + message
