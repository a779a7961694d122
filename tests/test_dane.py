"""DANE TLSA lookups and matching (RFC 7672, RFC 6698) against a real DNSSEC chain on loopback:
zones signed by ldns-signzone, served by NSD, validated by unbound."""

from __future__ import annotations

import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st

from mxguard.tls.dane import DaneLookup, DnssecStatus, TlsaRecord, lookup_tlsa, matching_record, record_matches
from tests.support.dnssec import LoopbackDnssec, Zone


def der(cert: trustme.LeafCert | trustme.CA) -> bytes:
    pem = cert.cert_chain_pems[0].bytes() if isinstance(cert, trustme.LeafCert) else cert.cert_pem.bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki_sha256(cert_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def leaf() -> bytes:
    return der(trustme.CA().issue_cert("mx1.dane.test"))


@pytest.fixture(scope="module")
def dnssec(leaf):
    digest = spki_sha256(leaf)
    other = "00" * 32
    zones = [
        Zone("dane.test", [f"_25._tcp.mx1 IN TLSA 3 1 1 {digest}", f"_25._tcp.mx2 IN TLSA 3 1 1 {other}",
                           "_25._tcp.mx3 IN TLSA 1 1 1 " + digest, "mx1 IN A 127.0.0.1"]),
        Zone("plain.test", [f"_25._tcp.mx1 IN TLSA 3 1 1 {digest}"], signed=False),
        Zone("bogus.test", [f"_25._tcp.mx1 IN TLSA 3 1 1 {digest}"], tamper=[(digest, other)]),
    ]
    with LoopbackDnssec(zones) as servers:
        yield servers


async def lookup(dnssec, host: str) -> DaneLookup:
    return await lookup_tlsa(host, nameservers=["127.0.0.1"], nameserver_port=dnssec.resolver_port, timeout=5)


async def test_signed_matching_tlsa_is_secure_and_matches_the_leaf(dnssec, leaf):
    result = await lookup(dnssec, "MX1.dane.test.")
    assert result.status is DnssecStatus.SECURE and result.applies
    assert result.host == "mx1.dane.test"
    assert matching_record(result, [leaf]) == result.records[0]


async def test_signed_mismatching_tlsa_applies_but_matches_nothing(dnssec, leaf):
    result = await lookup(dnssec, "mx2.dane.test")
    assert result.applies and matching_record(result, [leaf]) is None


async def test_pkix_usages_are_not_usable_for_smtp(dnssec, leaf):
    """RFC 7672 3.1.3: PKIX-EE(1) is ignored, so a zone with only such records does not apply DANE."""
    result = await lookup(dnssec, "mx3.dane.test")
    assert result.status is DnssecStatus.SECURE and result.records and not result.applies


async def test_unsigned_zone_is_insecure_and_its_records_are_not_used(dnssec):
    result = await lookup(dnssec, "mx1.plain.test")
    assert result.status is DnssecStatus.INSECURE and result.records == [] and not result.applies


async def test_tampered_zone_is_bogus(dnssec):
    result = await lookup(dnssec, "mx1.bogus.test")
    assert result.status is DnssecStatus.BOGUS and "NoNameservers" in result.error


async def test_no_tlsa_is_none(dnssec):
    assert (await lookup(dnssec, "nothing.dane.test")).status is DnssecStatus.NONE


async def test_a_resolver_that_does_not_answer_is_bogus_not_insecure():
    from tests.support.peers import free_port
    result = await lookup_tlsa("mx1.dane.test", nameservers=["127.0.0.1"], nameserver_port=free_port(), timeout=1)
    assert result.status is DnssecStatus.BOGUS


def test_dane_ta_matches_an_issuer_above_the_leaf_only():
    ca = trustme.CA()
    leaf_der, ca_der = der(ca.issue_cert("mx.example.test")), der(ca)
    ta = TlsaRecord(2, 1, 1, bytes.fromhex(spki_sha256(ca_der)))
    lookup_result = DaneLookup("mx.example.test", 25, DnssecStatus.SECURE, [ta])
    assert matching_record(lookup_result, [leaf_der, ca_der]) == ta
    assert matching_record(lookup_result, [ca_der]) is None  # a TA record never matches the leaf itself
    ee = TlsaRecord(3, 0, 2, hashlib.sha512(leaf_der).digest())
    assert matching_record(DaneLookup("h", 25, DnssecStatus.SECURE, [ee]), [leaf_der, ca_der]) == ee


@settings(max_examples=60, deadline=None)
@given(selector=st.sampled_from([0, 1]), mtype=st.sampled_from([0, 1, 2]), flip=st.integers(min_value=0))
def test_any_changed_byte_breaks_the_match(selector, mtype, flip):
    """A class test: every selector and matching type, and any single changed byte of the data."""
    leaf_der = der(trustme.CA().issue_cert("mx.example.test"))
    cert = x509.load_der_x509_certificate(leaf_der)
    selected = leaf_der if selector == 0 else cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    data = {0: selected, 1: hashlib.sha256(selected).digest(), 2: hashlib.sha512(selected).digest()}[mtype]
    assert record_matches(TlsaRecord(3, selector, mtype, data), leaf_der)
    changed = bytearray(data)
    changed[flip % len(changed)] ^= 0x01
    assert not record_matches(TlsaRecord(3, selector, mtype, bytes(changed)), leaf_der)


_TA_ROOT = trustme.CA()
_TA_INTERMEDIATE = _TA_ROOT.create_child_ca()
_TA_LEAF = _TA_INTERMEDIATE.issue_cert("mx.ta.test")
_TA_CHAIN = [x509.load_pem_x509_certificate(p.bytes()).public_bytes(serialization.Encoding.DER)
             for p in _TA_LEAF.cert_chain_pems]
_OTHER_CHAIN = [x509.load_pem_x509_certificate(p.bytes()).public_bytes(serialization.Encoding.DER)
                for p in trustme.CA().create_child_ca().issue_cert("mx.ta.test").cert_chain_pems]
_TA_RECORD = TlsaRecord(2, 1, 1, bytes.fromhex(spki_sha256(_TA_CHAIN[1])))


def test_dane_ta_verifies_the_chain_to_the_anchor_and_the_name():
    from mxguard.tls.dane import verify_ta_chain
    verify_ta_chain("mx.ta.test", _TA_CHAIN, _TA_RECORD)
    verify_ta_chain("mx.ta.test.", _TA_CHAIN, _TA_RECORD)  # a trailing dot is the same name


@settings(max_examples=40, deadline=None)
@given(host=st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){1,3}", fullmatch=True).filter(lambda h: h != "mx.ta.test"),
       forged=st.booleans())
def test_dane_ta_never_accepts_another_name_or_a_chain_the_anchor_did_not_sign(host, forged):
    """Generated host names other than the leaf's, and a chain from another CA with the anchor's
    record: always refused (RFC 7672 3.1.2 needs both the chain and the name)."""
    from mxguard.tls.dane import TrustAnchorMismatch, verify_ta_chain
    with pytest.raises(TrustAnchorMismatch):
        verify_ta_chain(host, _TA_CHAIN, _TA_RECORD)
    if forged:
        # The anchor's record, a leaf for the right name, but under another intermediate: the record
        # matches nothing above that leaf, and a spliced chain does not verify either.
        with pytest.raises(TrustAnchorMismatch):
            verify_ta_chain("mx.ta.test", _OTHER_CHAIN, _TA_RECORD)
        with pytest.raises(TrustAnchorMismatch):
            verify_ta_chain("mx.ta.test", [_OTHER_CHAIN[0], _TA_CHAIN[1]], _TA_RECORD)
