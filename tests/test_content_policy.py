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
