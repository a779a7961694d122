"""What init writes: an ECDSA P-256 certificate, keys with mode 0600; loading and checking chains."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mxguard.errors import ConfigError
from mxguard.storage.sealing import Sealer, SealingError, append_key
from mxguard.tls.certs import generate_self_signed, load_chain, normalize_fingerprint, write_private
from mxguard.tls.contexts import server_context


def test_init_generates_ecdsa_p256_cert_and_private_files(data_dir):
    cert = x509.load_pem_x509_certificate((data_dir / "tls" / "cert.pem").read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.subject.rfc4514_string() == "CN=mx.gw.test"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mx.gw.test" in sans.get_values_for_type(x509.DNSName)
    for name in ("tls/cert.pem", "tls/key.pem", "keys/sealing.keys"):
        mode = stat.S_IMODE((data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert len(Sealer.from_file(data_dir / "keys" / "sealing.keys").keys) == 1


def test_configured_chain_replaces_the_generated_one(tmp_path, ca):
    leaf = ca.issue_cert("mx.example.com")
    cert_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert_file.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems) + ca.cert_pem.bytes())
    key_file.write_bytes(leaf.private_key_pem.bytes())
    chain = load_chain(cert_file, key_file)
    assert len(chain) == 2
    server_context(cert_file, key_file)


def test_mismatched_key_and_expired_cert_are_refused(tmp_path, ca):
    cert, _ = generate_self_signed("a.example")
    _, other_key = generate_self_signed("b.example")
    write_private(tmp_path / "c.pem", cert)
    write_private(tmp_path / "k.pem", other_key)
    with pytest.raises(ConfigError, match="does not match"):
        load_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="tls.cert_file"):
        load_chain(tmp_path / "missing.pem", tmp_path / "k.pem")
    now = dt.datetime.now(dt.timezone.utc)
    old = ca.issue_cert("old.example", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    write_private(tmp_path / "e.pem", old.cert_chain_pems[0].bytes())
    write_private(tmp_path / "ek.pem", old.private_key_pem.bytes())
    with pytest.raises(ConfigError, match="expired"):
        load_chain(tmp_path / "e.pem", tmp_path / "ek.pem")


def test_server_context_refuses_old_protocols():
    import ssl
    cert, key = generate_self_signed("x.example")
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp())
    write_private(d / "c.pem", cert)
    write_private(d / "k.pem", key)
    ctx = server_context(d / "c.pem", d / "k.pem")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    names = {c["name"] for c in ctx.get_ciphers()}
    assert all(("GCM" in n or "CHACHA20" in n) for n in names), names
    assert not any(n.startswith(("AES", "DHE-RSA-AES128-SHA", "RC4", "DES")) for n in names)
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_fingerprint_normalisation():
    fp = "AB:" * 31 + "AB"
    assert normalize_fingerprint(fp) == "ab" * 32
    with pytest.raises(ValueError):
        normalize_fingerprint("abc")


def test_sealing_round_trip_rotation_and_wrong_key(tmp_path):
    from mxguard.storage.sealing import create_key_file
    path = tmp_path / "keys"
    create_key_file(path)
    sealer = Sealer.from_file(path)
    kid, blob = sealer.seal(b"secret message body", b"ctx")
    assert b"secret" not in blob
    assert sealer.open(blob, b"ctx") == b"secret message body"
    with pytest.raises(SealingError, match="wrong key or altered"):
        sealer.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"ctx")
    new_kid = append_key(path)
    rotated = Sealer.from_file(path)
    assert rotated.current_key_id == new_kid != kid
    assert rotated.open(blob, b"ctx") == b"secret message body"  # old key still opens
    other = tmp_path / "other"
    create_key_file(other)
    with pytest.raises(SealingError, match="not in the key file"):
        Sealer.from_file(other).open(blob, b"ctx")


def test_sealing_key_file_must_be_private(tmp_path):
    from mxguard.storage.sealing import create_key_file
    path = tmp_path / "keys"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Sealer.from_file(path)


def test_certificate_dates_are_sane(data_dir):
    cert = x509.load_pem_x509_certificate((data_dir / "tls" / "cert.pem").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def test_ecdsa_and_rsa_certificates_are_both_offered(gateway, data_dir):
    """init makes ECDSA P-256 the main certificate and RSA-2048 the extra one; each client gets what it can use."""
    import smtplib
    import ssl

    from cryptography.hazmat.primitives.asymmetric import rsa

    assert (data_dir / "tls" / "rsa-cert.pem").exists()

    def peer_key(ciphers: str):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ciphers)
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as c:
            c.ehlo()
            c.starttls(context=ctx)
            return x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True)).public_key()

    assert isinstance(peer_key("ECDHE-ECDSA-AES128-GCM-SHA256"), ec.EllipticCurvePublicKey)
    rsa_key = peer_key("ECDHE-RSA-AES128-GCM-SHA256")
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
