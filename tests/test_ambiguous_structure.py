"""MIME that can be read two ways: each ambiguity is a named finding, and every reading is scanned.

The property tests build hostile messages the way an attacker would: EICAR,
a Windows executable or a script hidden behind one class of structural
ambiguity (a boundary given twice, an RFC 2231 boundary, a boundary with odd
characters or quotes, a defective Content-Type, a boundary that never occurs,
delimiters in the preamble or epilogue, an encoding the stdlib does not
apply), optionally nested one level down. Two invariants:

* with the default settings, none of them is delivered;
* with ``filters.ambiguous_structure = "deliver"`` the hidden payload is still
  *named* (the virus, or the executable or script as an attachment): the
  other readings are scanned whatever the policy.

Well-formed messages built by the stdlib, and every corpus message, get no
``ambiguous-structure`` hit (no false positives).
"""

from __future__ import annotations

import asyncio
import base64
import quopri
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mxguard.config import Settings
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.message import Envelope, parse_message
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.structure import FINDINGS, ambiguity_hits
from tests.support import mail
from tests.support.clamd import EICAR

ENV = Envelope(client_ip="192.0.2.7", helo="client.sender.test", mail_from="a@sender.test",
               rcpts=["bob@example.com"], txn_id="AMBIG")
HEAD = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: Invoice\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <amb@sender.test>\r\nMIME-Version: 1.0\r\n")
TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nPlease see the invoice.\r\n"
#: RFC 2046 bcharsnospace.
BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
TOKEN_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'+_-."


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")


# -- building blocks ---------------------------------------------------------------------------

@st.composite
def payloads(draw):
    """``(kind, part bytes)``: the hidden part, headers and encoded body."""
    kind = draw(st.sampled_from(["eicar", "exe", "js"]))
    if kind == "eicar":
        name = draw(st.sampled_from([b"eicar.com", b"readme.txt", b"a.bin"]))
        enc = draw(st.sampled_from([b"base64", b"quoted-printable", b"7bit"]))
        data = EICAR
    elif kind == "exe":
        name, enc, data = draw(st.sampled_from([b"invoice.exe", b"invoice.pdf", b"scan"])), b"base64", mail.FAKE_PE
    else:
        name = draw(st.sampled_from([b"run.js", b"invoice.pdf.js"]))
        enc, data = draw(st.sampled_from([b"base64", b"7bit"])), b"WScript.Echo('hello');\r\n"
    body = (_b64(data) if enc == b"base64" else quopri.encodestring(data).replace(b"\n", b"\r\n").rstrip()
            if enc == b"quoted-printable" else data.rstrip(b"\r\n"))
    part = (b"Content-Type: application/octet-stream; name=\"" + name + b"\"\r\n"
            b"Content-Disposition: attachment; filename=\"" + name + b"\"\r\n"
            b"Content-Transfer-Encoding: " + enc + b"\r\n\r\n" + body + b"\r\n")
    return kind, part


def multipart_body(boundary: bytes, parts: list[bytes]) -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


boundaries = st.text(alphabet=TOKEN_CHARS, min_size=3, max_size=40).map(lambda s: ("b" + s).encode())


def _quote(value: bytes, quoted: bool) -> bytes:
    return b'"' + value + b'"' if quoted else value


# -- one strategy per class: each returns (Content-Type value, body) ------------------------------

@st.composite
def duplicate_boundary(draw, hidden: bytes):
    a, b = draw(boundaries), draw(boundaries)
    names = st.sampled_from([b"boundary", b"BOUNDARY", b"Boundary"])
    sep = draw(st.sampled_from([b"; ", b";\r\n ", b";\r\n\t"]))
    value = (b"multipart/mixed; " + draw(names) + b"=" + _quote(a, draw(st.booleans())) + sep
             + draw(names) + b"=" + _quote(b, draw(st.booleans())))
    used = draw(st.sampled_from([a, b]))
    body = multipart_body(used, [TEXT, hidden])
    if draw(st.booleans()):  # a decoy multipart in the other boundary, before the real one
        body = multipart_body(a if used == b else b, [TEXT]) + body
    return value, body


@st.composite
def rfc2231_boundary(draw, hidden: bytes):
    b = draw(boundaries)
    cut = draw(st.integers(1, len(b) - 1))
    form = draw(st.sampled_from(["charset", "empty-charset", "continued", "continued-extended", "percent"]))
    if form == "charset":
        param = b"boundary*=utf-8''" + b
    elif form == "empty-charset":
        param = b"boundary*=''" + b
    elif form == "continued":
        param = b"boundary*0=\"" + b[:cut] + b"\"; boundary*1=\"" + b[cut:] + b"\""
    elif form == "continued-extended":
        param = b"boundary*0*=us-ascii''" + b[:cut] + b"; boundary*1*=" + b[cut:]
    else:
        param = b"boundary*=utf-8''" + b"".join(b"%%%02X" % c for c in b)
    value = b"multipart/mixed; " + param
    decoy = draw(boundaries)
    if draw(st.booleans()):  # a plain boundary too: readers that skip RFC 2231 take this one
        value = (value + b"; boundary=\"" + decoy + b"\"") if draw(st.booleans()) else \
            (b"multipart/mixed; boundary=\"" + decoy + b"\"; " + param)
    return value, multipart_body(draw(st.sampled_from([b, decoy])), [TEXT, hidden])


@st.composite
def odd_characters(draw, hidden: bytes):
    head, tail = draw(boundaries), draw(boundaries)
    odd = draw(st.sampled_from(['[', ']', '<', '>', '@', '\\', '"', ' ', '\u00e9', '{', '|', '~', '=', '/', ':', '?']))
    written_form = draw(st.sampled_from(["unquoted", "quoted", "quote-then-text", "text-then-quote"]))
    inner = head + odd.encode() + tail
    if written_form == "unquoted":
        written = inner
    elif written_form == "quoted":
        written = b'"' + inner.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    elif written_form == "quote-then-text":
        written = b'"' + head + b'"' + tail
    else:
        written = head + b'"' + tail + b'"'
    if draw(st.booleans()):
        written = written + b" " * draw(st.integers(1, 3))  # trailing space: not allowed last
    # What a lenient reader takes: the whole text, quotes stripped, or up to the odd character.
    used = draw(st.sampled_from([written.strip(), written.strip().strip(b'"'), head, inner]))
    return b"multipart/mixed; boundary=" + written, multipart_body(used, [TEXT, hidden])


@st.composite
def header_defect(draw, hidden: bytes):
    b = draw(boundaries)
    value = draw(st.sampled_from([
        b"multipart/mixed boundary=\"" + b + b"\"",            # no semicolon
        b"multipart/mixed;; boundary=\"" + b + b"\"",           # empty parameter
        b"multipart/mixed; boundary=\"" + b + b"\" trailing",  # text after the value
        b"multipart/mixed; boundary=\"" + b,                    # unterminated quote
        b"multipart/mixed; =x; boundary=\"" + b + b"\"",        # a parameter without a name
        b"multipart/mixed; boundary",                           # a parameter without a value
        b"multipart; boundary=\"" + b + b"\"",                  # no subtype
        b"multipart/mixed; boundary=(c)\"" + b + b"\"",         # a comment before the value
    ]))
    return value, multipart_body(b, [TEXT, hidden])


@st.composite
def missing_boundary(draw, hidden: bytes):
    b, other = draw(boundaries), draw(boundaries)
    value = draw(st.sampled_from([b"multipart/mixed", b"multipart/mixed; boundary=\"\"",
                                  b"multipart/mixed; boundary=\"" + other + b"x\""]))
    return value, multipart_body(b, [TEXT, hidden])


@st.composite
def preamble_epilogue(draw, hidden: bytes):
    a, b = draw(boundaries), draw(boundaries)
    hidden_multipart = multipart_body(b, [TEXT, hidden])
    where = draw(st.sampled_from(["preamble", "epilogue"]))
    visible = multipart_body(a, [TEXT])
    body = (hidden_multipart + visible) if where == "preamble" else (visible + hidden_multipart)
    return b"multipart/mixed; boundary=\"" + a + b"\"", body


@st.composite
def transfer_encoding(draw, hidden: bytes):
    """The hidden part under an encoding the stdlib does not apply (misspelt, malformed, given twice),
    or the whole multipart encoded (RFC 2045 6.4 forbids it)."""
    b = draw(boundaries)
    form = draw(st.sampled_from(["misspelt", "spaced", "quoted", "trailing", "twice", "encoded-container"]))
    if form == "encoded-container":
        inner = multipart_body(b, [TEXT, hidden])
        return b"multipart/mixed; boundary=\"" + b + b"\"\r\nContent-Transfer-Encoding: base64", _b64(inner) + b"\r\n"
    head, _, rest = hidden.partition(b"Content-Transfer-Encoding: ")
    enc, _, rest = rest.partition(b"\r\n")
    cte = {"misspelt": enc + b"x", "spaced": enc[:3] + b" " + enc[3:], "quoted": b'"' + enc + b'"',
           "trailing": enc + b"; x=y", "twice": b"7bit\r\nContent-Transfer-Encoding: " + enc}[form]
    part = head + b"Content-Transfer-Encoding: " + cte + b"\r\n" + rest
    return b"multipart/mixed; boundary=\"" + b + b"\"", multipart_body(b, [TEXT, part])


CLASSES = {"duplicate-boundary": duplicate_boundary, "rfc2231-boundary": rfc2231_boundary,
           "odd-characters": odd_characters, "header-defect": header_defect, "missing-boundary": missing_boundary,
           "preamble-epilogue": preamble_epilogue, "transfer-encoding": transfer_encoding}


@st.composite
def hostile_messages(draw, cls: str):
    """``(payload kind, message bytes)`` for one class, the ambiguity at the top or one level down."""
    kind, hidden = draw(payloads())
    value, body = draw(CLASSES[cls](hidden))
    entity = b"Content-Type: " + value + b"\r\n\r\n" + body
    if draw(st.booleans(), label="nested"):
        outer = draw(boundaries)
        return kind, HEAD + b"Content-Type: multipart/mixed; boundary=\"" + outer + b"\"\r\n\r\n" + \
            multipart_body(outer, [TEXT, entity])
    return kind, HEAD + entity


def named(verdict, kind: str) -> bool:
    """The hidden payload is named: the virus, or the executable or script among the attachments."""
    exe = any(a["kind"] == "executable" or a["extension"] == "exe" for a in verdict.attachments)
    js = any(a["extension"] == "js" for a in verdict.attachments)
    eicar = "EICAR-Test-File" in verdict.virus_names
    return {"eicar": eicar, "exe": exe, "js": js}[kind]


# -- runners --------------------------------------------------------------------------------------

def _runner(filters: dict):
    loop = asyncio.new_event_loop()
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False, **filters}}))
    return loop, pipeline, (lambda raw: loop.run_until_complete(pipeline.scan(raw, ENV)))


@pytest.fixture(scope="module")
def default_scan():
    loop, pipeline, run = _runner({})
    yield run
    loop.run_until_complete(pipeline.close())
    loop.close()


@pytest.fixture(scope="module")
def deliver_scan():
    """The pipeline with ``ambiguous_structure = "deliver"``: only the readings can catch the payload."""
    loop, pipeline, run = _runner({"ambiguous_structure": "deliver"})
    yield run
    loop.run_until_complete(pipeline.close())
    loop.close()


PROPERTY = settings(max_examples=120, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("cls", list(CLASSES))
@PROPERTY
@given(data=st.data())
def test_hidden_payload_is_never_delivered(default_scan, deliver_scan, cls, data):
    kind, raw = data.draw(hostile_messages(cls), label="message")
    verdict = default_scan(raw)
    disposition = decide(verdict, DomainFilterPolicy.defaults())
    assert disposition.action in ("quarantine", "reject"), (disposition, raw)
    assert verdict.errors == []
    # Whatever the ambiguity policy says, the other readings are scanned and the payload named.
    relaxed = deliver_scan(raw)
    assert named(relaxed, kind), (kind, relaxed.virus_names, relaxed.attachments, raw)
    assert decide(relaxed, DomainFilterPolicy.defaults()).action == "reject"


HIDDEN_EXE = (b"Content-Type: application/octet-stream; name=\"invoice.exe\"\r\n"
              b"Content-Disposition: attachment; filename=\"invoice.exe\"\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(mail.FAKE_PE) + b"\r\n")


@pytest.mark.parametrize("field", [
    # Found by the property test: an unquoted "'" makes the stdlib's tokenizer drop the parameter
    # (no boundary at all), while a reader splitting at ";" and "=" takes it.
    b"multipart/mixed; Boundary=b6TbfDE'h; Boundary=b6TbfDE'h",
    b"multipart/mixed; boundary=a'b",
    # No usable boundary declared: the delimiter lines themselves name it.
    b"multipart/mixed; boundary*=x",
])
def test_parts_after_an_early_close_delimiter_are_read(default_scan, deliver_scan, field):
    """The same boundary closed, then opened again: the parts after the close delimiter are read."""
    boundary = b"a'b" if b"a'b" in field else b"b6TbfDE'h" if b"'h" in field else b"zz"
    body = multipart_body(boundary, [TEXT]) + multipart_body(boundary, [TEXT, HIDDEN_EXE])
    raw = HEAD + b"Content-Type: " + field + b"\r\n\r\n" + body
    assert decide(default_scan(raw), DomainFilterPolicy.defaults()).action in ("quarantine", "reject")
    relaxed = deliver_scan(raw)
    assert named(relaxed, "exe"), relaxed.attachments


@st.composite
def benign_messages(draw):
    """Well-formed messages as the stdlib writes them: text, HTML alternative, attachments, nesting."""
    msg = mail.base(subject=draw(st.sampled_from(["Report", "Lunch", "Re: minutes"])))
    lines = st.sampled_from(["Hello Bob,", "", "-- ", "Alice", "-----Original Message-----", "--", "---",
                             "See you -- tomorrow.", "Regards", "> quoted line", "=3D is an equals sign"])
    text = "\n".join(draw(st.lists(lines, min_size=1, max_size=12))) + "\n"
    msg.set_content(text, cte=draw(st.sampled_from(["7bit", "quoted-printable", "base64"])))
    if draw(st.booleans()):
        msg.add_alternative("<html><body><p>" + text.replace("\n", "<br>") + "</p></body></html>", subtype="html")
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["report.pdf", "photo.png", "notes.txt", "data.csv", "r\u00e9sum\u00e9.pdf",
                                     "a very long file name for the quarterly report 2026.pdf"]))
        if name.endswith((".txt", ".csv")):
            content = draw(st.sampled_from(["a,b,c\n1,2,3\n", "-----BEGIN PGP SIGNATURE-----\n\niQEz\n"
                                            "-----END PGP SIGNATURE-----\n", "--\nnotes -- draft\n"]))
            msg.add_attachment(content, subtype="plain", filename=name)
        else:
            content = draw(st.sampled_from([b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
                                            b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]))
            msg.add_attachment(content, maintype="application", subtype="octet-stream", filename=name)
    for n, part in enumerate(p for p in msg.walk() if p.is_multipart()):
        # A boundary from all of RFC 2046's bchars (quoted as the stdlib quotes it), or the stdlib's
        # own style ("=" signs), drawn here rather than by the stdlib's random generator.
        own = "=" * 15 + str(draw(st.integers(0, 10**19))) + f"=={n}"
        part.set_boundary(draw(st.sampled_from([own, draw(st.text(alphabet=BCHARS + " ", min_size=1, max_size=60))
                                                + f"Z{n}"])))
    return mail.crlf(msg.as_bytes())


@PROPERTY
@given(raw=benign_messages())
def test_well_formed_messages_have_no_finding(default_scan, raw):
    verdict = default_scan(raw)
    assert verdict.findings == [], (verdict.findings, raw)
    assert not [h for h in verdict.policy if h.rule == "ambiguous-structure"]
    assert verdict.viruses == []
    assert decide(verdict, DomainFilterPolicy.defaults()).category in ("clean", "junk"), raw


# -- each finding by name, on one example ---------------------------------------------------------

EXAMPLES = {
    "duplicate-field": b"Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\nx\r\n",
    "duplicate-parameter": b"Content-Type: multipart/mixed; boundary=\"aaa\";\r\n boundary=\"bbb\"\r\n\r\n"
                           b"--bbb\r\n\r\nx\r\n--bbb--\r\n",
    "encoded-parameter": b"Content-Type: multipart/mixed; boundary*=utf-8''bbb\r\n\r\n--bbb\r\n\r\nx\r\n--bbb--\r\n",
    "boundary-characters": b"Content-Type: multipart/mixed; boundary=\"a[b]\"\r\n\r\n--a[b]\r\n\r\nx\r\n--a[b]--\r\n",
    "boundary-unquoted": b"Content-Type: multipart/mixed; boundary=----=_P1\r\n\r\n------=_P1\r\n\r\nx\r\n"
                         b"------=_P1--\r\n",
    "header-defect": b"Content-Type: multipart/mixed boundary=\"b\"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    "boundary-missing": b"Content-Type: multipart/mixed; boundary=\"zzz\"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    "stray-delimiter": b"Content-Type: multipart/mixed; boundary=\"a\"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n"
                       b"--a\r\n\r\ny\r\n--a--\r\n",
    "multipart-encoding": b"Content-Type: multipart/mixed; boundary=\"a\"\r\nContent-Transfer-Encoding: base64"
                          b"\r\n\r\n--a\r\n\r\nx\r\n--a--\r\n",
    "unknown-encoding": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64x\r\n\r\naGk=\r\n",
}


def test_every_finding_has_an_example():
    assert sorted(EXAMPLES) == sorted(FINDINGS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_finding_is_named(name):
    message = parse_message(HEAD + EXAMPLES[name])
    assert name in {f.name for f in message.findings}, message.findings
    hits = ambiguity_hits(message.findings, "reject")
    assert hits and all(h.rule == "ambiguous-structure" and h.action == "reject" for h in hits)
    assert any(h.detail.startswith(name) for h in hits)


async def test_the_issue_example_is_quarantined_and_logged_with_its_finding():
    """The issue's message, harmless content: held (not delivered), the finding in the verdict."""
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=\"aaa\";\r\n boundary=\"bbb\"\r\n\r\n"
           + multipart_body(b"bbb", [TEXT, b"Content-Type: application/pdf; name=\"a.pdf\"\r\n"
                                     b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(b"%PDF-1.4\n") + b"\r\n"]))
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False}}))
    try:
        verdict = await pipeline.scan(raw, ENV)
    finally:
        await pipeline.close()
    d = decide(verdict, DomainFilterPolicy.defaults())
    assert (d.action, d.category) == ("quarantine", "policy") and "ambiguous-structure" in d.reason
    assert {"name": "duplicate-parameter", "path": "0",
            "detail": "content-type: boundary given 2 times"} in verdict.as_dict()["findings"]
    # The other reading found the PDF that the stdlib's reading (boundary "aaa") does not see.
    assert [a["filename"] for a in verdict.attachments if "~" in a["path"]] == ["a.pdf"]


@pytest.mark.parametrize("action", ["deliver", "quarantine", "reject"])
async def test_the_action_is_configurable(action):
    raw = HEAD + EXAMPLES["encoded-parameter"]
    pipeline = FilterPipeline.from_settings(Settings.model_validate(
        {"filters": {"sender_auth": False, "ambiguous_structure": action}}))
    try:
        verdict = await pipeline.scan(raw, ENV)
    finally:
        await pipeline.close()
    assert [h.action for h in verdict.policy if h.rule == "ambiguous-structure"] == [action]
    assert verdict.findings[0]["name"] == "encoded-parameter", "recorded whatever the action"


async def test_ignored_findings_are_recorded_not_acted_on():
    raw = HEAD + EXAMPLES["unknown-encoding"]
    pipeline = FilterPipeline.from_settings(Settings.model_validate(
        {"filters": {"sender_auth": False, "ambiguous_structure_ignore": "unknown-encoding,stray-delimiter"}}))
    try:
        verdict = await pipeline.scan(raw, ENV)
    finally:
        await pipeline.close()
    assert [f["name"] for f in verdict.findings] == ["unknown-encoding"]
    assert not [h for h in verdict.policy if h.rule == "ambiguous-structure"]
    with pytest.raises(ValueError, match="unknown finding 'no-such-finding'"):
        Settings.model_validate({"filters": {"ambiguous_structure_ignore": ["no-such-finding"]}})


# -- the corpus: no false positives ---------------------------------------------------------------

def test_no_corpus_message_is_flagged(corpus_dir):
    recorded = {}
    for path in sorted(p for p in corpus_dir.rglob("*") if p.is_file() and p.name != "SOURCES.md"):
        message = parse_message(path.read_bytes())
        name = str(path.relative_to(corpus_dir))
        assert ambiguity_hits(message.findings, "quarantine", {"stray-delimiter"}) == [], (name, message.findings)
        if message.findings:
            recorded[name] = sorted({f.name for f in message.findings})
    # Outlook Express for Mac nests a multipart under its parent's boundary: recorded, not acted on
    # by default, and the epilogue it leaves is scanned as a reading (its xx.gif part is found).
    assert recorded == {"cpython/msg_15.eml": ["stray-delimiter"]}
    msg15 = parse_message((corpus_dir / "cpython" / "msg_15.eml").read_bytes())
    assert any(p.filename == "xx.gif" and p.origin == "reading" for p in msg15.parts)


# -- clamd reads the other readings too ------------------------------------------------------------

async def test_clamd_scans_what_only_another_reading_finds(clamd):
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=\"aaa\"; boundary=\"bbb\"\r\n\r\n" + multipart_body(
        b"bbb", [TEXT, b"Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
                       b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(EICAR) + b"\r\n"])
    pipeline = FilterPipeline.from_settings(Settings.model_validate({"filters": {
        "sender_auth": False, "virus_engines": ["clamd"], "clamd_address": clamd.address,
        "ambiguous_structure": "deliver"}}))
    try:
        verdict = await pipeline.scan(raw, ENV)
    finally:
        await pipeline.close()
    assert verdict.errors == []
    # One hit for the message as received (clamd's own MIME reading), one for the part that the
    # other reading found, sent as a stream of its own (named by its file name).
    assert {(v.engine, v.part) for v in verdict.viruses} == {("clamd", ""), ("clamd", "a.bin")}, verdict.viruses
    assert all(v.name.startswith("Eicar") for v in verdict.viruses)
    assert decide(verdict, DomainFilterPolicy.defaults()).action == "reject"


# -- through the real gateway over SMTP -----------------------------------------------------------

def _issue_message(hidden: bytes) -> bytes:
    """The issue's message: two boundary parameters, the parts delimited by the second."""
    return (HEAD + b"Content-Type: multipart/mixed; boundary=\"aaa\";\r\n boundary=\"bbb\"\r\n\r\n"
            + multipart_body(b"bbb", [TEXT, hidden]))


def test_gateway_refuses_eicar_behind_two_boundaries(gateway, tls_sink, add_domain):
    from tests.support.smtp import send
    add_domain("example.com", [tls_sink.address])
    exe = (b"Content-Type: application/octet-stream; name=\"setup.exe\"\r\nContent-Transfer-Encoding: base64"
           b"\r\n\r\n" + _b64(EICAR) + b"\r\n")
    out = send(gateway.port, ["bob@example.com"], _issue_message(exe))
    code, text = out.data
    assert code == 554 and text.startswith("5.7.1") and "EICAR-Test-File" in text, out.data
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "rejected"
    assert {f["name"] for f in rec.verdict["findings"]} == {"duplicate-parameter", "boundary-missing"}
    assert any(a["filename"] == "setup.exe" and "~" in a["path"] for a in rec.verdict["attachments"])
    assert tls_sink.messages == [], "nothing reached the downstream server"


def test_gateway_quarantines_a_harmless_ambiguous_message(gateway, tls_sink, add_domain):
    from mxguard.quarantine.store import list_quarantine
    from tests.support.smtp import send
    add_domain("example.com", [tls_sink.address])
    pdf = (b"Content-Type: application/pdf; name=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + _b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n") + b"\r\n")
    out = send(gateway.port, ["bob@example.com"], _issue_message(pdf))
    assert out.data[0] == 250, out.data
    rec = gateway.wait_records(1)[-1]
    assert rec.disposition == "quarantined"
    assert "ambiguous-structure" in rec.verdict["dispositions"]["bob@example.com"]["reason"]
    assert "duplicate-parameter" in {f["name"] for f in rec.verdict["findings"]}
    held = gateway.run(list_quarantine(gateway.store, recipient="bob@example.com"))
    assert len(held) == 1 and held[0].category == "policy"
    assert tls_sink.messages == []
