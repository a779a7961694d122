"""A virus engine that could not scan a message: ``451 4.3.0``, never held or delivered unscanned.

Only an outright refusal found by the engines that did answer still stands.
The rule is checked over generated verdicts (every combination of viruses,
junk scores, content rules, failed engines and domain settings), over
per-recipient plans with sender lists, through a real gateway whose clamd
address refuses connections, and at quarantine release (a held copy marked
unscanned is scanned again before it goes).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

from mxguard.config import load_settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.policy_content import DEFAULT_ATTACHMENT_RULES
from mxguard.filtering.verdict import EngineError, JunkResult, PolicyHit, Verdict, VirusHit
from mxguard.quarantine.service import ReleaseFailed, release
from mxguard.quarantine.store import get_quarantined, list_quarantine, quarantine_message
from mxguard.services.access import SYSTEM
from mxguard.services.domains import DomainView
from mxguard.smtp.dispositions import plan
from mxguard.smtp.legs import RouteLeg
from mxguard.smtp.routing import Route
from tests.conftest import gateway_environ
from tests.support import mail
from tests.support.gateway import ThreadedGateway
from tests.support.peers import free_port
from tests.support.smtp import send

ENGINES = ["yara", "clamd", "builtin", "rspamd", "spamd", "policy"]

junk_results = st.builds(
    JunkResult, engine=st.sampled_from(["builtin", "rspamd", "spamd"]),
    score=st.floats(min_value=-5, max_value=1000, allow_nan=False), threshold=st.just(5.0),
    is_spam=st.booleans())
policy_hits = st.builds(PolicyHit, rule=st.sampled_from(["mime-depth", "ambiguous-structure", "x"]),
                        action=st.sampled_from(["deliver", "quarantine", "reject"]))
verdicts = st.builds(
    Verdict,
    viruses=st.lists(st.builds(VirusHit, engine=st.sampled_from(["yara", "clamd"]),
                               name=st.sampled_from(["Eicar", "Bad.Macro"])), max_size=2),
    junk=st.lists(junk_results, max_size=2),
    policy=st.lists(policy_hits, max_size=2),
    attachments=st.lists(st.fixed_dictionaries({
        "filename": st.sampled_from(["a.exe", "b.pdf", "c.zip"]), "extension": st.sampled_from(["exe", "pdf", "zip"]),
        "kind": st.sampled_from(["executable", "pdf", "archive"]), "detected": st.just("application/x"),
        "content_type": st.just("application/octet-stream"), "size": st.integers(0, 10**6),
        "encrypted": st.booleans(), "unscanned": st.booleans(), "in_archive": st.booleans()}), max_size=2),
    errors=st.lists(st.builds(EngineError, engine=st.sampled_from(ENGINES), reason=st.just("down")), max_size=3),
)
thresholds = st.one_of(st.none(), st.floats(min_value=0, max_value=50, allow_nan=False))
policies = st.builds(
    DomainFilterPolicy, junk_quarantine=thresholds, junk_reject=thresholds, junk_tag=thresholds,
    virus_action=st.sampled_from(["reject", "quarantine"]), engine_failure=st.sampled_from(["defer", "tag"]),
    attachment_rules=st.just(DomainFilterPolicy.defaults().attachment_rules))


def _answered(verdict: Verdict) -> Verdict:
    """The same verdict as if every engine that failed had answered with nothing."""
    return Verdict(viruses=verdict.viruses, junk=verdict.junk, policy=verdict.policy,
                   attachments=verdict.attachments)


@hsettings(max_examples=600, deadline=None)
@given(verdicts, policies)
def test_a_virus_engine_down_defers_unless_refused_outright(verdict, policy):
    d = decide(verdict, policy)
    assert d.action in ("deliver", "tag", "quarantine", "reject", "defer")
    if verdict.virus_unscanned and policy.engine_failure == "defer":
        assert d.action in ("defer", "reject"), (d, verdict)
        if d.action == "reject":
            # Only a refusal the engines that answered found on their own.
            assert decide(_answered(verdict), policy).action == "reject"
        else:
            assert d.category == "unscanned" and "not scanned" in d.reason
    if not verdict.errors:
        assert d.action != "defer"
    if policy.engine_failure == "tag":
        assert d.action != "defer"
    if verdict.errors and not verdict.virus_unscanned and policy.engine_failure == "defer":
        # A junk engine down: a quarantine the others found still applies (nothing to release unscanned).
        assert d.action in ("defer", "reject", "quarantine")


def test_the_reported_case_gtube_with_clamd_down_is_deferred():
    verdict = Verdict(junk=[JunkResult("builtin", 1000.0, 5.0, True)], errors=[EngineError("clamd", "refused")])
    d = decide(verdict, DomainFilterPolicy.defaults())
    assert (d.action, d.category) == ("defer", "unscanned") and "clamd" in d.reason


class _Lists:
    def __init__(self, kinds: dict[str, str | None]):
        self.kinds = kinds

    def lookup(self, rcpt: str, sender: str) -> str | None:
        return self.kinds.get(rcpt)


def _domain(name: str, **fields) -> DomainView:
    return DomainView(name, ("127.0.0.1:1",), "optional", "opportunistic",
                      attachment_rules=tuple(DEFAULT_ATTACHMENT_RULES), **fields)


domain_settings = st.fixed_dictionaries({
    "engine_failure": st.sampled_from(["defer", "tag"]), "virus_action": st.sampled_from(["reject", "quarantine"]),
    "junk_tag": thresholds, "junk_quarantine": thresholds, "block_action": st.sampled_from(["quarantine", "reject"])})


@hsettings(max_examples=300, deadline=None)
@given(verdicts, st.lists(st.tuples(domain_settings, st.sampled_from([None, "allow", "block"])),
                          min_size=1, max_size=4),
       st.booleans())
def test_no_plan_holds_or_delivers_what_a_virus_engine_did_not_scan(verdict, rcpts, shared_route):
    """Per-recipient splits, sender lists and shared routes: a defer domain's recipient never gets
    a copy or a held copy of a message a virus engine could not scan."""
    legs: list[RouteLeg] = []
    kinds: dict[str, str | None] = {}
    shared = None
    for i, (fields, kind) in enumerate(rcpts):
        domain = _domain(f"d{i}.test", **fields)
        address = f"u{i}@d{i}.test"
        kinds[address] = kind
        if shared_route and shared is not None:
            leg = shared
        else:
            leg = RouteLeg(Route.for_domain(domain), domain)
            legs.append(leg)
            shared = leg
        leg.accepted.append(address)
        leg.rcpt_domains[address] = domain
    result = plan(verdict, legs, "T1", sender="a@sender.test", lists=_Lists(kinds))
    strict = [f"u{i}@d{i}.test" for i, (f, _) in enumerate(rcpts) if f["engine_failure"] == "defer"]
    if verdict.virus_unscanned and strict:
        # Either the whole message is deferred or every recipient is refused outright.
        assert result.deferred or (result.rejected and not result.copies and not result.held), result
        for rcpt in strict:
            assert result.by_rcpt[rcpt].action in ("defer", "reject"), result.by_rcpt[rcpt]


# -- through a real gateway -------------------------------------------------------------

@pytest.fixture
def clamd_down_gateway(tmp_path, loopback_dns):
    """A gateway with YARA and clamd, clamd's address refusing every connection."""
    from tests.support.gateway import init_data_dir
    init_data_dir(tmp_path / "data")
    env = gateway_environ(loopback_dns, MXGUARD_FILTERS__VIRUS_ENGINES='["yara","clamd"]',
                          MXGUARD_FILTERS__CLAMD_ADDRESS=f"127.0.0.1:{free_port()}")
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=env)).start()
    yield gw
    gw.stop()


@pytest.mark.parametrize("case", ["clean", "gtube", "policy-quarantine", "tag", "split"])
def test_clamd_down_defers_every_disposition(clamd_down_gateway, tls_sink, case):
    gw = clamd_down_gateway
    gw.add_domain("example.com", [tls_sink.address])
    body, rcpts = mail.gtube(), ["bob@example.com"]
    if case == "clean":
        body = mail.plain()
    elif case == "policy-quarantine":
        body = mail.with_attachment(b"PK\x03\x04" + b"\0" * 40, "secret.zip", "application", "zip")
    elif case == "tag":
        gw.add_domain("tag.test", [tls_sink.address], junk_tag="1", junk_quarantine="5000")
        rcpts = ["bob@tag.test"]
    elif case == "split":
        # Same downstream server, one domain tags GTUBE and the other quarantines it.
        gw.add_domain("tag.test", [tls_sink.address], junk_tag="1", junk_quarantine="5000")
        rcpts = ["bob@example.com", "carol@tag.test"]
    out = send(gw.port, rcpts, body)
    assert all(code == 250 for code, _ in out.rcpt.values()), out.rcpt
    assert out.data[0] == 451 and out.data[1].startswith("4.3.0"), (case, out.data)
    rec = gw.wait_records(1)[-1]
    assert rec.disposition == "deferred" and any(e["engine"] == "clamd" for e in rec.verdict["errors"])
    time.sleep(0.2)
    assert tls_sink.messages == [], "nothing delivered unscanned"
    assert gw.run(list_quarantine(gw.store)) == [], "nothing held unscanned (it could be released)"


def test_eicar_found_by_yara_is_still_refused_with_clamd_down(clamd_down_gateway, tls_sink):
    clamd_down_gateway.add_domain("example.com", [tls_sink.address])
    out = send(clamd_down_gateway.port, ["bob@example.com"], mail.eicar_variants()["base64"])
    assert out.data[0] == 554 and out.data[1].startswith("5.7.1"), out.data


def test_tag_domain_still_gets_the_unscanned_copy(clamd_down_gateway, tls_sink):
    """``engine_failure = tag`` is the domain's explicit choice to take mail unscanned."""
    clamd_down_gateway.add_domain("example.com", [tls_sink.address], engine_failure="tag")
    out = send(clamd_down_gateway.port, ["bob@example.com"], mail.plain())
    assert out.data[0] == 250 and tls_sink.wait_for(1)
    assert b"unscanned=clamd" in tls_sink.messages[0].data


def _hold_unscanned(gw, body: bytes) -> str:
    """A copy held while clamd was down, as an older gateway (or a ``tag`` domain) held it."""
    verdict = {"errors": [{"engine": "clamd", "reason": "connection refused"}], "viruses": []}
    return gw.run(quarantine_message(gw.store, gw.gateway.keyring.get(), txn_id="T0", recipient="bob@example.com",
                                     sender="a@sender.test", subject="held", reason="junk: builtin score 1000",
                                     category="junk", content=body, verdict=verdict, score=1000.0))


def test_release_of_an_unscanned_copy_rescans_and_refuses_while_clamd_is_down(clamd_down_gateway, tls_sink):
    gw = clamd_down_gateway
    gw.add_domain("example.com", [tls_sink.address])
    qid = _hold_unscanned(gw, mail.gtube())
    with pytest.raises(ReleaseFailed) as failed:
        gw.run(release(gw.store, gw.gateway.keyring.get(), gw.settings, qid, actor=SYSTEM, via="cli"))
    assert failed.value.reply.code == 451 and failed.value.reply.enhanced == "4.3.0"
    assert "clamd" in str(failed.value)
    time.sleep(0.2)
    assert tls_sink.messages == [], "not released unscanned"
    row, _ = gw.run(get_quarantined(gw.store, gw.gateway.keyring.get(), qid))
    assert row.released_at is None, "it stays held"


def test_release_rescans_a_clean_copy_then_delivers_and_finds_a_virus(tmp_path, loopback_dns, tls_sink):
    """Once the virus engines answer, the held copy goes; a virus found then keeps it held as a virus."""
    from tests.support.gateway import init_data_dir
    init_data_dir(tmp_path / "data")
    gw = ThreadedGateway(load_settings(tmp_path / "data", environ=gateway_environ(loopback_dns))).start()
    try:
        gw.add_domain("example.com", [tls_sink.address])
        clean = _hold_unscanned(gw, mail.gtube())
        result = gw.run(release(gw.store, gw.gateway.keyring.get(), gw.settings, clean, actor=SYSTEM, via="cli"))
        assert result.reply.is_positive and tls_sink.wait_for(1)
        virus = _hold_unscanned(gw, mail.eicar_variants()["base64"])
        with pytest.raises(ReleaseFailed) as failed:
            gw.run(release(gw.store, gw.gateway.keyring.get(), gw.settings, virus, actor=SYSTEM, via="cli"))
        assert failed.value.reply.code == 554 and "EICAR" in str(failed.value)
        row, _ = gw.run(get_quarantined(gw.store, gw.gateway.keyring.get(), virus))
        assert row.category == "virus" and row.released_at is None and row.verdict["errors"] == []
        time.sleep(0.2)
        assert len(tls_sink.messages) == 1
    finally:
        gw.stop()
