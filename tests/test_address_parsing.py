"""The remembered parses of envelope paths and address headers give what the stdlib parsers give."""

from __future__ import annotations

from email._header_value_parser import get_angle_addr
from email.errors import HeaderParseError
from email.utils import getaddresses

import pytest

from mxguard.filtering.message import parse_addresses
from mxguard.smtp.headers import strip_gateway_fields
from mxguard.smtp.inbound import parse_path


def stdlib(arg: str):
    try:
        token, rest = get_angle_addr(arg)
    except HeaderParseError:
        return None, None
    return token.addr_spec, rest


@pytest.mark.parametrize("arg", ["<user@example.org>", "<user@example.org> SIZE=100 BODY=8BITMIME",
                                 '<"odd local"@example.org>', "<first.last+tag@sub.example.org>",
                                 "<user@example.org", "<>", "<@>", "<a@b> <c@d>"])
def test_parse_path_matches_the_stdlib_parser(arg):
    assert parse_path(arg) == stdlib(arg)
    assert parse_path(arg) == stdlib(arg)  # the remembered answer is the same


@pytest.mark.parametrize("arg", ["<a@@b>", "<@>", ":"])
def test_parse_path_refuses_what_does_not_parse_every_time(arg):
    assert parse_path(arg) == (None, None)
    assert parse_path(arg) == (None, None)


def test_parse_path_cache_is_bounded():
    info = parse_path.cache_info()
    assert info.maxsize == 8192
    for i in range(9000):
        parse_path(f"<u{i}@example.org>")
    assert parse_path.cache_info().currsize <= 8192


@pytest.mark.parametrize("value", ["Alice <alice@example.org>", "a@example.org, b@example.net",
                                   '"Bob, Jr." <bob@example.org>', "not an address", ""])
def test_parse_addresses_matches_getaddresses(value):
    assert parse_addresses(value) == tuple(getaddresses([value]))


def test_strip_leaves_a_clean_message_untouched_and_still_strips_forgeries():
    clean = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody mentions X-MXGuard-Verdict: clean\r\n"
    assert strip_gateway_fields(clean, "mx.example.org") is clean
    forged = b"From: a@example.org\r\nx-mxguard-verdict: clean\r\nX-Spam-Flag: NO\r\n" \
             b"Authentication-Results: MX.Example.ORG; spf=pass\r\nAuthentication-Results: other.example; spf=fail\r\n" \
             b"\r\nbody\r\n"
    out = strip_gateway_fields(forged, "mx.example.org")
    assert out == b"From: a@example.org\r\nAuthentication-Results: other.example; spf=fail\r\n\r\nbody\r\n"
