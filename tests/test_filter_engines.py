"""Each engine against its real peer on loopback, and the pipeline's handling of failures and timeouts."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from mxguard.config import Settings
from mxguard.filtering.engine import EngineUnavailable, ScanContext
from mxguard.filtering.junk_rspamd import RspamdEngine
from mxguard.filtering.junk_spamd import SpamdEngine
from mxguard.filtering.message import Envelope, parse_message
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.virus_clamd import ClamdEngine
from mxguard.filtering.virus_yara import YaraEngine
from tests.support import mail
from tests.support.peers import free_port

ENV = Envelope(client_ip="127.0.0.1", helo="client.sender.test", mail_from="alice@none.test",
               rcpts=["bob@example.com"], txn_id="T1")


def _parsed(raw: bytes):
    return parse_message(raw, ENV)


@pytest.mark.parametrize("variant", list(mail.eicar_variants()))
async def test_yara_and_clamd_find_eicar(clamd, variant):
    raw = mail.eicar_variants()[variant]
    for engine in (YaraEngine(), ClamdEngine(clamd.address), ClamdEngine(f"unix:{clamd.socket_path}")):
        out = await engine.scan(_parsed(raw), ScanContext())
        assert out.viruses, (engine.name, engine.address, variant)
        assert "eicar" in out.viruses[0].name.lower()


async def test_clamd_finds_the_clamav_test_files_and_passes_clean_mail(clamd, corpus_dir):
    engine = ClamdEngine(clamd.address)
    for name in ("clam.exe.mbox.base64.eml", "clam.zip", "clam.exe.bin"):
        out = await engine.scan(_parsed((corpus_dir / "clamav" / name).read_bytes()), ScanContext())
        assert [v.name for v in out.viruses] == ["ClamAV-Test-File.UNOFFICIAL"], name
    assert (await engine.scan(_parsed(mail.plain()), ScanContext())).viruses == []
    status = await engine.probe()
    assert status.reachable and status.version.startswith("ClamAV ")


async def test_clamd_down_is_unavailable(tmp_path):
    engine = ClamdEngine(f"127.0.0.1:{free_port()}")
    with pytest.raises(EngineUnavailable):
        await engine.scan(_parsed(mail.plain()), ScanContext())
    assert not (await engine.probe()).reachable
    with pytest.raises(EngineUnavailable):
        await ClamdEngine(f"unix:{tmp_path / 'none.sock'}").scan(_parsed(mail.plain()), ScanContext())


@pytest.mark.parametrize("engine_name", ["rspamd", "spamd"])
async def test_junk_engines_gtube_spam_and_ham(request, corpus_dir, engine_name):
    peer = request.getfixturevalue(engine_name)
    engine = RspamdEngine(peer.url) if engine_name == "rspamd" else SpamdEngine(peer.address)
    try:
        for raw, spam in [(mail.gtube(), True),
                          ((corpus_dir / "spamassassin" / "sample-spam.eml").read_bytes(), True),
                          ((corpus_dir / "spamassassin" / "sample-nonspam.eml").read_bytes(), False)]:
            result = (await engine.scan(_parsed(raw), ScanContext())).junk
            assert result.is_spam is spam, (engine_name, result)
            if spam:
                assert "GTUBE" in result.rules and result.score >= result.threshold
        status = await engine.probe()
        assert status.reachable and status.version
    finally:
        await engine.close()


async def test_rspamd_test_patterns_map_to_actions(rspamd):
    """With enable_test_patterns, the GTUBE variant picks Rspamd's action; 'add header' is junk, 'no action' is not."""
    engine = RspamdEngine(rspamd.url)
    try:
        y = mail.plain("YJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n")
        a = mail.plain("AJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n")
        ry = (await engine.scan(_parsed(y), ScanContext())).junk
        ra = (await engine.scan(_parsed(a), ScanContext())).junk
        assert (ry.action, ry.is_spam) == ("add header", True)
        assert (ra.action, ra.is_spam) == ("no action", False)
    finally:
        await engine.close()


class _Silent:
    """A TCP server that accepts connections and never answers (an engine that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


async def test_a_hanging_engine_times_out_and_the_verdict_says_so():
    silent = _Silent()
    try:
        settings = Settings.model_validate({"filters": {
            "sender_auth": False, "virus_engines": ["yara", "clamd"], "junk_engines": ["builtin", "spamd"],
            "clamd_address": f"127.0.0.1:{silent.port}", "spamd_address": f"127.0.0.1:{silent.port}",
            "engine_timeouts": {"clamd": 0.3, "spamd": 0.3}}})
        pipeline = FilterPipeline.from_settings(settings)
        loop = asyncio.get_running_loop()
        started = loop.time()
        verdict = await pipeline.scan(mail.plain(), ENV)
        elapsed = loop.time() - started
        assert sorted(e.engine for e in verdict.errors) == ["clamd", "spamd"]
        assert all("0.3 s" in e.reason for e in verdict.errors)
        assert elapsed < 2, "engines run concurrently, each bounded by its own timeout"
        assert [j.engine for j in verdict.junk] == ["builtin"], "the engines that answered still count"
        await pipeline.close()
    finally:
        silent.close()


async def test_rspamd_down_is_an_engine_error():
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {
        "sender_auth": False, "junk_engines": ["rspamd"], "rspamd_url": f"http://127.0.0.1:{free_port()}"}}))
    verdict = await pipeline.scan(mail.plain(), ENV)
    assert [e.engine for e in verdict.errors] == ["rspamd"]
    await pipeline.close()


async def test_unparseable_input_still_gets_a_verdict():
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False}}))
    for raw in (b"", b"\x00\xff" * 100, b"Content-Type: multipart/mixed\r\n\r\nno boundary at all",
                b"Subject: =?bogus?Q?x?=\r\nContent-Type: text/plain; charset=klingon\r\n\r\n\xe9\xe8"):
        verdict = await pipeline.scan(raw, ENV)
        assert verdict.errors == [] and verdict.junk, raw
