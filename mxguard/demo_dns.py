"""A tiny authoritative DNS server on loopback for ``mxguard demo`` (dnspython wire format).

The demo's sender domain publishes SPF, DKIM and DMARC records here, so the
demo shows real ``spf=pass dkim=pass dmarc=pass`` results, and no query
leaves the machine: every other name gets NXDOMAIN at once.
"""

from __future__ import annotations

import asyncio
import base64

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[tuple[str, str], list[str]]):
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001 - not a DNS query: ignore it
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            rtype = dns.rdatatype.to_text(question.rdtype)
            values = self.zone.get((name, rtype))
            if values:
                response.answer.append(dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, rtype, values))
            elif not any(n == name for n, _ in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)


def txt_value(text: str) -> str:
    """A TXT rdata in zone-file form: 255-octet quoted strings (RFC 1035 3.3.14)."""
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


class DemoDNS:
    """Serves the records of one sender domain: SPF for loopback, a DKIM key, a DMARC policy.

    Args:
        domain: the sender domain (``sender.test``).
        selector: the DKIM selector.
    """

    def __init__(self, domain: str, selector: str = "demo"):
        self.domain = domain
        self.selector = selector
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
        public = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        self.zone = {
            (domain, "TXT"): [txt_value("v=spf1 ip4:127.0.0.0/8 -all")],
            (f"{selector}._domainkey.{domain}", "TXT"): [txt_value(f"v=DKIM1; k=rsa; p={public}")],
            (f"_dmarc.{domain}", "TXT"): [txt_value("v=DMARC1; p=reject")],
        }
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self) -> "DemoDNS":
        self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Protocol(self.zone), local_addr=("127.0.0.1", 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sign(self, message: bytes) -> bytes:
        """DKIM-sign ``message`` for the demo domain (dkimpy, relaxed/relaxed)."""
        import dkim
        sig = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.private_pem,
                        canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        return sig + message

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
