"""Every message of the shared corpus through the filters, with the disposition this test states.

The corpus was written by other people (CPython's email tests, mail-parser's
real-world samples, SpamAssassin's and ClamAV's test files). Each message
must go through without an exception and get the stated disposition under a
new domain's default settings.
"""

from __future__ import annotations

import pytest

from mxguard.config import Settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.message import Envelope
from mxguard.filtering.pipeline import FilterPipeline

CLEAN = ("deliver", "clean")
#: Embedded engines (YARA, built-in scorer, content policy), sender checks on.
EXPECTED: dict[str, tuple[str, str]] = {
    "clamav/clam.exe.bin": ("reject", "policy"),            # a bare Windows executable
    "clamav/clam.exe.mbox.base64.eml": ("reject", "policy"),  # clam.exe attached
    "clamav/clam.zip": ("reject", "policy"),                # clam.exe inside a zip
    **{f"cpython/msg_{n}.eml": CLEAN for n in
       ("01 02 03 04 05 06 07 08 09 10 11 12 12a 13 14 15 16 17 18 20 21 22 23 24".split())},
    "cpython/msg_19.eml": ("quarantine", "junk"),           # a digest body with no From, Date or Message-ID
    "mail-parser/mail_malformed_2.eml": CLEAN,
    "mail-parser/mail_test_1.eml": ("reject", "policy"),    # carries doc_uvedoml.js
    "mail-parser/mail_test_12.eml": CLEAN,
    "mail-parser/mail_test_13.eml": CLEAN,
    "mail-parser/mail_test_14.eml": CLEAN,
    "mail-parser/mail_test_16.eml": ("quarantine", "junk"),  # GTUBE
    "mail-parser/mail_test_3.eml": CLEAN,
    "mail-parser/mail_test_5.eml": CLEAN,
    "mail-parser/mail_test_7.eml": CLEAN,
    "mail-parser/mail_test_9.eml": CLEAN,
    "spamassassin/sample-nonspam.eml": CLEAN,
    "spamassassin/sample-spam.eml": ("quarantine", "junk"),  # GTUBE
}

ENV = Envelope(client_ip="127.0.0.1", helo="client.sender.test", mail_from="a@sender.test",
               rcpts=["alice@example.com"], txn_id="CORPUS")


def _corpus_files(corpus_dir):
    return sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.name != "SOURCES.md")


def test_the_expectation_covers_the_whole_corpus(corpus_dir):
    assert sorted(str(p.relative_to(corpus_dir)) for p in _corpus_files(corpus_dir)) == sorted(EXPECTED)


async def test_embedded_engines_on_the_corpus(corpus_dir, loopback_dns):
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {"dns_servers": [loopback_dns.address]}}))
    got = {}
    try:
        for path in _corpus_files(corpus_dir):
            verdict = await pipeline.scan(path.read_bytes(), ENV)
            assert verdict.errors == [], path
            assert verdict.auth is not None and verdict.junk, path
            d = decide(verdict, DomainFilterPolicy.defaults())
            got[str(path.relative_to(corpus_dir))] = (d.action, d.category)
    finally:
        await pipeline.close()
    assert got == EXPECTED


@pytest.mark.slow
async def test_every_engine_together_on_the_corpus(corpus_dir, loopback_dns, clamd, rspamd, spamd):
    """clamd, YARA, the built-in scorer, Rspamd and spamd together: every message answered by every engine."""
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {
        "dns_servers": [loopback_dns.address], "virus_engines": ["yara", "clamd"],
        "junk_engines": ["builtin", "rspamd", "spamd"], "clamd_address": clamd.address, "rspamd_url": rspamd.url,
        "spamd_address": spamd.address, "timeout": 30}}))
    try:
        for path in _corpus_files(corpus_dir):
            name = str(path.relative_to(corpus_dir))
            verdict = await pipeline.scan(path.read_bytes(), ENV)
            assert verdict.errors == [], (name, verdict.errors)
            assert [j.engine for j in verdict.junk] == ["builtin", "rspamd", "spamd"], name
            clam = [v.name for v in verdict.viruses if v.engine == "clamd"]
            assert clam == (["ClamAV-Test-File.UNOFFICIAL"] if name.startswith("clamav/") else []), name
            if name in ("mail-parser/mail_test_16.eml", "spamassassin/sample-spam.eml"):
                assert all(j.is_spam and "GTUBE" in j.rules for j in verdict.junk), name
            if name == "spamassassin/sample-nonspam.eml":
                assert not any(j.is_spam for j in verdict.junk)
    finally:
        await pipeline.close()
