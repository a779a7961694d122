"""An archive member the filter cannot read is held, never delivered as clean.

Windows Explorer and 7-Zip open Deflate64 members that Python's ``zipfile`` cannot
read; a member's declared size is the sender's word. Each variant below hides
content from the filter in one such way: the message must not be delivered as
clean, whatever the member's name and bytes. A readable control must be delivered,
so the property can fail.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mxguard.config import Settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.pipeline import FilterPipeline
from tests.support import mail

#: Compression methods (APPNOTE 4.4.5) ``zipfile`` cannot decompress but other tools can:
#: shrink, implode, Deflate64, IBM TERSE, ZStandard, MP3, XZ, JPEG, WavPack, PPMd, AES.
UNSUPPORTED_METHODS = [1, 6, 9, 18, 93, 94, 95, 96, 97, 98, 99]


@pytest.fixture
async def pipeline():
    p = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False}}))
    yield p
    await p.close()


def _central(data: bytearray) -> int:
    return data.rfind(b"PK\x01\x02")


def with_method(data: bytes, method: int) -> bytes:
    out = bytearray(data)
    out[8:10] = struct.pack("<H", method)  # local file header
    c = _central(out)
    out[c + 10:c + 12] = struct.pack("<H", method)
    return bytes(out)


def with_flag(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[6] |= bit
    c = _central(out)
    out[c + 8] |= bit
    return bytes(out)


def with_bad_crc(data: bytes) -> bytes:
    out = bytearray(data)
    out[14] ^= 0xFF
    c = _central(out)
    out[c + 16] ^= 0xFF
    return bytes(out)


def with_new_version(data: bytes) -> bytes:
    out = bytearray(data)
    c = _central(out)
    out[c + 6:c + 8] = struct.pack("<H", 90)  # version needed to extract: 9.0
    return bytes(out)


def nested(members: dict[str, bytes], depth: int) -> bytes:
    data = mail.zipped(members)
    for level in range(depth):
        data = mail.zipped({f"inner{level}.zip": data})
    return data


HIDING = {
    "unsupported compression": lambda z, m: with_method(z, m),
    "compressed patched data (bit 5)": lambda z, m: with_flag(z, 0x20),
    "strong encryption (bit 6)": lambda z, m: with_flag(z, 0x40),
    "damaged member (CRC)": lambda z, m: with_bad_crc(z),
    "zip version the reader lacks": lambda z, m: with_new_version(z),
}

names = st.builds(lambda stem, ext: f"{stem}.{ext}",
                  st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12),
                  st.sampled_from(["pdf", "txt", "jpg", "docx", "csv", "bin"]))
payloads = st.one_of(st.just(mail.FAKE_PE), st.binary(min_size=1, max_size=2000))


async def _action(pipeline, archive: bytes) -> tuple[str, str]:
    verdict = await pipeline.scan(mail.with_attachment(archive, "documents.zip", "application", "zip"))
    disposition = decide(verdict, DomainFilterPolicy.defaults())
    return disposition.action, disposition.reason


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, payload=payloads, how=st.sampled_from(sorted(HIDING)),
       method=st.sampled_from(UNSUPPORTED_METHODS))
async def test_a_member_hidden_from_the_filter_is_never_delivered_as_clean(pipeline, name, payload, how, method):
    archive = HIDING[how](mail.zipped({name: payload}), method)
    action, reason = await _action(pipeline, archive)
    assert action in ("quarantine", "reject"), (how, method, name, reason)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, text=st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n",
                                 min_size=1, max_size=2000))
async def test_the_same_member_readable_is_delivered(pipeline, name, text):
    """The control: without the hiding step the same archive of harmless text goes through.
    (Random bytes are not a control: they may start with an ELF or PE signature.)"""
    action, reason = await _action(pipeline, mail.zipped({name: text.encode()}))
    assert action == "deliver", reason


async def test_a_declared_size_is_not_trusted(pipeline):
    """A member claiming to be larger than the member limit used to be listed by name only."""
    data = bytearray(mail.zipped({"invoice.pdf": mail.FAKE_PE}))
    c = _central(data)
    data[c + 24:c + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size in the central directory
    action, reason = await _action(pipeline, bytes(data))
    assert action != "deliver", reason


async def test_archives_nested_too_deep_are_held_and_shallow_ones_read(pipeline):
    assert (await _action(pipeline, nested({"notes.txt": b"hello"}, 2)))[0] == "deliver"
    action, reason = await _action(pipeline, nested({"notes.txt": b"hello"}, 3))
    assert action == "quarantine" and "nested more than 3 deep" in reason
    assert (await _action(pipeline, nested({"invoice.pdf": mail.FAKE_PE}, 2)))[0] == "reject"


async def test_an_archive_whose_directory_cannot_be_read_is_held(pipeline):
    broken = mail.zipped({"notes.txt": b"hello"})[:-10]  # the end of central directory record cut
    action, reason = await _action(pipeline, broken)
    assert action == "quarantine" and "directory cannot be read" in reason


async def test_a_custom_rule_can_deliver_unscanned_members():
    from mxguard.filtering.policy_content import validate_rules
    rules = validate_rules([{"name": "let-them-through", "action": "deliver", "unscanned": True}])
    p = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False}}))
    try:
        verdict = await p.scan(mail.with_attachment(with_method(mail.zipped({"a.txt": b"x"}), 9),
                                                    "a.zip", "application", "zip"))
    finally:
        await p.close()
    custom = DomainFilterPolicy.of(type("Domain", (), {"attachment_rules": rules})())
    assert decide(verdict, custom).action == "deliver"
    assert decide(verdict, DomainFilterPolicy.defaults()).action == "quarantine"
