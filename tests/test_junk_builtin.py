"""The built-in junk scorer's rules, one message per rule."""

from __future__ import annotations


from mxguard.filtering.junk_builtin import BuiltinJunkEngine
from mxguard.filtering.message import Envelope, parse_message
from mxguard.filtering.verdict import AuthResults
from tests.support import mail


def _score(raw: bytes, auth: AuthResults | None = None):
    return BuiltinJunkEngine(threshold=5.0).score(parse_message(raw, Envelope()), auth)


def _html(html: str, text: str | None = None, **headers) -> bytes:
    msg = mail.base()
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    if text is not None:
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    return mail.crlf(msg.as_bytes())


def test_clean_message_scores_zero():
    result = _score(mail.plain())
    assert result.score == 0 and not result.is_spam and result.rules == {}


def test_gtube():
    result = _score(mail.gtube())
    assert result.rules == {"GTUBE": 1000.0} and result.is_spam


def test_html_only_with_hidden_text_and_executable_link():
    html = ('<html><body><p>Your invoice</p><div style="display:none">lorem ipsum free money</div>'
            '<a href="http://files.example.net/invoice.pdf.exe">download</a></body></html>')
    result = _score(_html(html))
    assert {"HTML_ONLY", "HTML_HIDDEN_TEXT", "EXECUTABLE_LINK"} <= set(result.rules)
    assert result.score >= 5 and result.is_spam
    benign = _score(_html('<html><body><p style="color: #333">Hello</p><a href="https://x.test/a.pdf">a</a>'
                          "</body></html>", text="Hello"))
    assert benign.rules == {}


def test_plain_text_executable_link():
    result = _score(mail.plain("Get it at https://dl.example.net/setup.exe now\n"))
    assert "EXECUTABLE_LINK" in result.rules


def test_header_anomalies():
    raw = mail.crlf(b"From: \"support@bank.example\" <x@cheap.test>\nReply-To: claims@elsewhere.test\n"
                    b"To: bob@example.com\nSubject: hi\n\nbody\n")
    result = _score(raw)
    assert {"MISSING_DATE", "MISSING_MESSAGE_ID", "FROM_NAME_OTHER_ADDRESS", "REPLYTO_OTHER_DOMAIN"} <= set(
        result.rules)
    same_org = mail.crlf(b"From: Bob <bob@news.example.com>\nReply-To: help@example.com\nTo: a@b.test\n"
                         b"Date: Sun, 29 Nov 2026 10:00:00 +0000\nMessage-ID: <1@x>\nSubject: s\n\nb\n")
    assert _score(same_org).rules == {}


def test_authentication_results_are_scored():
    fail = AuthResults(spf="fail", dkim=[{"result": "fail", "domain": "x.test", "selector": "s"}], dmarc="fail",
                       dmarc_policy="reject")
    result = _score(mail.plain(), fail)
    assert result.rules == {"SPF_FAIL": 2.0, "DKIM_INVALID": 1.0, "DMARC_FAIL_REJECT": 3.5} and result.is_spam
    ok = AuthResults(spf="pass", dkim=[{"result": "pass", "domain": "x.test", "selector": "s"}], dmarc="pass")
    assert _score(mail.plain(), ok).score < 0


def test_uuencoded_block_at_the_start_of_a_body_is_found():
    import binascii
    data = b"hello world, this is a file"
    raw = mail.crlf(b"From: a@b.test\nSubject: uu\n\nbegin 644 notes.bat\n" + binascii.b2a_uu(data) + b"`\nend\n")
    parts = parse_message(raw, Envelope()).parts
    assert [(p.filename, p.data) for p in parts if p.origin == "uuencode"] == [("notes.bat", data)]
