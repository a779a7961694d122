"""Content policy and evasion: what a sender does to sneak an executable past a filter.

Each case goes through the whole pipeline (embedded engines) and the default
rules of a new domain; it must be caught, or fail closed (refused).
"""

from __future__ import annotations

import pytest

from mxguard.config import Settings
from mxguard.errors import ValidationFailed
from mxguard.filtering.disposition import DomainFilterPolicy, decide
from mxguard.filtering.pipeline import FilterPipeline
from mxguard.filtering.policy_content import DEFAULT_ATTACHMENT_RULES, validate_rules
from tests.support import mail

HEAD = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: Invoice\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMessage-ID: <ev@sender.test>\r\nMIME-Version: 1.0\r\n")


@pytest.fixture
async def pipeline():
    p = FilterPipeline.from_settings(Settings.model_validate({"filters": {"sender_auth": False}}))
    yield p
    await p.close()


def _policy(**kw) -> DomainFilterPolicy:
    return DomainFilterPolicy(attachment_rules=DomainFilterPolicy.defaults().attachment_rules, **kw)


async def _decide(pipeline, raw: bytes, **kw):
    verdict = await pipeline.scan(raw)
    return verdict, decide(verdict, _policy(**kw))


async def test_exe_renamed_pdf_is_caught_by_detected_type(pipeline):
    raw = mail.with_attachment(mail.FAKE_PE, "invoice.pdf", "application", "pdf")
    verdict, disposition = await _decide(pipeline, raw)
    att = [a for a in verdict.attachments if a["filename"] == "invoice.pdf"][0]
    assert att["kind"] == "executable" and att["content_type"] == "application/pdf"
    assert disposition.action == "reject"
    # Without the YARA engine, the content rule alone still refuses it.
    only_policy = FilterPipeline.from_settings(Settings.model_validate(
        {"filters": {"sender_auth": False, "virus_engines": []}}))
    verdict = await only_policy.scan(raw)
    d = decide(verdict, _policy())
    assert d.action == "reject" and d.category == "policy" and "executable-content" in d.reason


async def test_rfc2231_continuation_filename_is_reassembled(pipeline):
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
           b"--b\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment;\r\n filename*0=\"invoice.pd\";\r\n filename*1=\"f.e\";\r\n"
           b" filename*2=\"xe\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n")
    verdict, disposition = await _decide(pipeline, raw)
    assert [a["filename"] for a in verdict.attachments] == ["invoice.pdf.exe"]
    assert disposition.action == "reject"
    assert "Double-Extension-Executable" in verdict.virus_names


async def test_encoded_word_filename_is_decoded(pipeline):
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
           b"--b\r\nContent-Type: application/octet-stream; name=\"=?UTF-8?B?cmVwb3J0LnNjcg==?=\"\r\n"
           b"Content-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n--b--\r\n")
    verdict, disposition = await _decide(pipeline, raw)
    assert [a["filename"] for a in verdict.attachments] == ["report.scr"]
    assert disposition.action == "reject" and "executable-extension" in disposition.reason


async def test_double_content_type_fails_closed(pipeline):
    raw = (HEAD + b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/octet-stream; "
           b"name=\"a.txt\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n")
    verdict, disposition = await _decide(pipeline, raw)
    assert any(h.rule == "ambiguous-mime-header" for h in verdict.policy)
    assert disposition.action == "reject"


async def test_attachment_inside_nested_message_rfc822(pipeline):
    inner = mail.with_attachment(b"@echo off\r\n", "run.bat")
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n--outer\r\nContent-Type: text/plain\r\n\r\n'
           b"Forwarded.\r\n--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--outer--\r\n")
    verdict, disposition = await _decide(pipeline, raw)
    bat = [a for a in verdict.attachments if a["filename"] == "run.bat"]
    assert bat and bat[0]["path"].count(".") >= 2, "found two MIME levels down"
    assert disposition.action == "reject"


async def test_unterminated_multipart_still_scanned(pipeline):
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
           b"--b\r\nContent-Type: application/zip; name=\"docs.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + __import__("base64").encodebytes(mail.zipped({"docs/readme.js": b"WScript.Echo(1)"}))
           .replace(b"\n", b"\r\n"))
    verdict, disposition = await _decide(pipeline, raw)
    assert "CloseBoundaryNotFoundDefect" in verdict.defects
    assert any(a["filename"] == "readme.js" and a["origin"] == "archive" for a in verdict.attachments)
    assert disposition.action == "reject"


async def test_executable_in_zip_and_encrypted_zip(pipeline):
    raw = mail.with_attachment(mail.zipped({"photos/IMG_001.jpg.exe": mail.FAKE_PE}), "photos.zip",
                               "application", "zip")
    verdict, disposition = await _decide(pipeline, raw)
    assert disposition.action == "reject"
    assert "Double-Extension-Executable" in verdict.virus_names
    # A zip member flagged as encrypted (general purpose bit 0) cannot be scanned: quarantined.
    data = bytearray(mail.zipped({"secret.txt": b"nothing to see"}))
    data[6] |= 1  # local file header flag
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 1  # central directory flag
    raw = mail.with_attachment(bytes(data), "secret.zip", "application", "zip")
    verdict, disposition = await _decide(pipeline, raw)
    assert disposition.action == "quarantine" and "encrypted-archive" in disposition.reason


async def test_html_smuggling_and_macro_documents(pipeline):
    html = (b"<html><body><script>var b=atob('TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAA');"
            b"var blob=new Blob([b]);var a=document.createElement('a');a.href=URL.createObjectURL(blob);"
            b"a.download='update.exe';a.click();</script></body></html>")
    verdict, disposition = await _decide(pipeline, mail.with_attachment(html, "invoice.html", "text", "html"))
    assert "HTML-Smuggling-Executable" in verdict.virus_names and disposition.action == "reject"
    ooxml = mail.zipped({"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w:document/>",
                         "word/vbaProject.bin": b"\xd0\xcf\x11\xe0 macros"})
    verdict, _ = await _decide(pipeline, mail.with_attachment(ooxml, "report.docm"))
    assert "Office-Macro-Container" in verdict.virus_names


async def test_size_and_content_type_rules_and_deliver_exception(pipeline):
    rules = validate_rules([
        {"name": "allow-signed-pdf", "action": "deliver", "filenames": ["*.signed.pdf"]},
        {"name": "big-files", "action": "quarantine", "min_size": 1000},
        {"name": "no-claimed-msdownload", "action": "reject", "content_types": ["application/x-ms*"]},
    ])
    policy = DomainFilterPolicy.of(type("D", (), {"attachment_rules": rules})())
    big = mail.with_attachment(b"%PDF-1.4\n" + b"x" * 2000, "big.pdf", "application", "pdf")
    d = decide(await pipeline.scan(big), policy)
    assert d.action == "quarantine" and "big-files" in d.reason
    signed = mail.with_attachment(b"%PDF-1.4\n" + b"x" * 2000, "contract.signed.pdf", "application", "pdf")
    assert decide(await pipeline.scan(signed), policy).action == "deliver", "first matching rule decides"
    claimed = mail.with_attachment(b"just text", "notes.txt", "application", "x-msdownload")
    d = decide(await pipeline.scan(claimed), policy)
    assert d.action == "reject" and "no-claimed-msdownload" in d.reason


async def test_mime_depth_and_part_limits():
    p = FilterPipeline.from_settings(Settings.model_validate(
        {"filters": {"sender_auth": False, "max_mime_depth": 3, "max_mime_parts": 50}}))
    nested = mail.plain()
    for _ in range(5):
        nested = HEAD + b"Content-Type: message/rfc822\r\n\r\n" + nested
    d = decide(await p.scan(nested), _policy())
    assert d.action == "reject" and "mime-depth" in d.reason
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(60))
    many = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    d = decide(await p.scan(many), _policy())
    assert d.action == "reject" and "mime-parts" in d.reason


def test_rule_validation_names_the_problem():
    assert validate_rules(DEFAULT_ATTACHMENT_RULES) == DEFAULT_ATTACHMENT_RULES
    for bad, needle in [({"name": "x", "action": "zap", "extensions": ["exe"]}, "action"),
                        ({"name": "x", "action": "reject"}, "at least one matcher"),
                        ({"name": "x", "action": "reject", "kinds": ["robot"]}, "unknown kind"),
                        ({"name": "x", "action": "reject", "min_size": "big"}, "min_size"),
                        ({"name": "x", "action": "reject", "colour": "red"}, "unknown key")]:
        with pytest.raises(ValidationFailed) as err:
            validate_rules([bad])
        assert err.value.field == "attachment_rules" and needle in str(err.value)


async def test_text_that_starts_with_mz_is_not_an_executable(pipeline):
    raw = mail.plain("MZ Corp. announces its quarterly results.\n")
    verdict, disposition = await _decide(pipeline, raw)
    assert disposition.action == "deliver" and verdict.attachments == []
    raw = mail.with_attachment(b"MZ Corp. minutes of the meeting\r\n" * 20, "minutes.txt", "text", "plain")
    verdict, disposition = await _decide(pipeline, raw)
    assert disposition.action == "deliver"


# -- one attachment, two names: every name is checked, and disagreeing names are suspicious ----

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


def _named_part(disposition_params: bytes, type_params: bytes = b"", payload: bytes = b"aGVsbG8=") -> bytes:
    return (HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n'
            b"--b\r\nContent-Type: application/octet-stream" + type_params + b"\r\n"
            b"Content-Disposition: attachment" + disposition_params + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"\r\n--b--\r\n")


async def test_the_issue_example_is_caught(pipeline):
    raw = _named_part(b"; filename=\"invoice.pdf\";\r\n filename*0*=us-ascii''invoice.e; filename*1=\"xe\"")
    verdict, disposition = await _decide(pipeline, raw)
    names = sorted(a["filename"] for a in verdict.attachments)
    assert names == ["invoice.exe", "invoice.pdf"]
    assert disposition.action == "reject" and "executable-extension (invoice.exe)" in disposition.reason
    assert any(h.rule == "conflicting-names" and h.action == "quarantine" for h in verdict.policy)


async def test_disagreeing_harmless_names_are_quarantined(pipeline):
    raw = _named_part(b'; filename="report.pdf"', b'; name="summary.pdf"')
    verdict, disposition = await _decide(pipeline, raw)
    assert disposition.action == "quarantine" and "conflicting-names" in disposition.reason
    same = _named_part(b'; filename="Report.PDF"', b'; name="report.pdf"')
    assert (await _decide(pipeline, same))[1].action == "deliver"  # a case difference is not a conflict


async def test_conflicting_names_action_is_configurable():
    p = FilterPipeline.from_settings(Settings.model_validate(
        {"filters": {"sender_auth": False, "conflicting_names": "reject"}}))
    try:
        verdict = await p.scan(_named_part(b'; filename="a.pdf"', b'; name="b.pdf"'))
    finally:
        await p.close()
    assert decide(verdict, _policy()).action == "reject"


def _encodings(name: str):
    """Every way a parameter can carry ``name`` (RFC 2045, RFC 2231 extended and split, RFC 2047)."""
    import base64
    raw = name.encode()
    half = max(1, len(name) // 2)
    return st.sampled_from([
        lambda key: b'; ' + key + b'="' + raw + b'"',
        lambda key: b"; " + key + b"*=utf-8''" + raw.replace(b".", b"%2E"),
        lambda key: b'; ' + key + b'*0="' + name[:half].encode() + b'"; ' + key + b'*1="' + name[half:].encode() + b'"',
        lambda key: b"; " + key + b"*0*=us-ascii''" + name[:half].encode() + b"; " + key + b'*1="'
        + name[half:].encode() + b'"',
        lambda key: b'; ' + key + b'="=?utf-8?B?' + base64.b64encode(raw) + b'?="',
    ])


stems = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stem=stems, bad_ext=st.sampled_from(["exe", "scr", "js", "bat", "vbs"]),
       decoy_ext=st.sampled_from(["pdf", "docx", "jpg", "txt"]),
       bad_in=st.sampled_from(["filename", "name"]), bad_first=st.booleans())
async def test_an_executable_name_anywhere_in_the_part_is_never_delivered(pipeline, data, stem, bad_ext, decoy_ext,
                                                                          bad_in, bad_first):
    """The class: a decoy name plus an executable name, each in any encoding and in either header,
    in either order. Whichever name a client shows, the message is refused (the executable rule)."""
    bad, decoy = f"{stem}.{bad_ext}", f"{stem}.{decoy_ext}"
    bad_params = data.draw(_encodings(bad))(b"filename" if bad_in == "filename" else b"name")
    decoy_params = data.draw(_encodings(decoy))(b"name" if bad_in == "filename" else b"filename")
    disp, ctype = (bad_params, decoy_params) if bad_in == "filename" else (decoy_params, bad_params)
    if bad_first and bad_in == "filename":
        disp = bad_params + data.draw(_encodings(decoy))(b"filename")  # both names in one header
    raw = _named_part(disp, ctype)
    verdict, disposition = await _decide(pipeline, raw)
    names = {a["filename"] for a in verdict.attachments}
    assert bad in names, (raw, names)
    assert disposition.action == "reject", (raw, disposition)
