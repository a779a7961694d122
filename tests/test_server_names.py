"""A route's downstream servers are ``HOST[:PORT]`` with HOST an IP address or an RFC 1123
host name: the value is refused with a message naming the entry, never stored as given."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxguard.config import check_host_name
from mxguard.errors import ValidationFailed
from mxguard.services.domains import normalize_servers
from mxguard.netaddr import parse_host_port

_host_chars = st.text(alphabet=st.sampled_from(list("abcXYZ019-_.:[]@ /\\")), min_size=1, max_size=30)


@given(host=st.one_of(_host_chars, st.text(min_size=1, max_size=30)), port=st.integers(min_value=1, max_value=65535))
def test_every_stored_server_is_an_address_or_a_host_name(host, port):
    entry = f"{host}:{port}"
    try:
        stored = normalize_servers([entry])
    except ValidationFailed as exc:
        assert exc.field == "servers" and repr(entry) in exc.message
        return
    name, got_port = parse_host_port(stored[0], default_port=25)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        assert check_host_name(name) == name
    assert 1 <= got_port <= 65535


@pytest.mark.parametrize("entry", ["host_with_underscore:25", "mx .example.com", "-mx.example.com:25",
                                   "mx..example.com", "127.0.0.1:25:25"])
def test_known_bad_entries_are_refused_naming_the_entry(entry):
    with pytest.raises(ValidationFailed) as exc:
        normalize_servers([entry])
    assert repr(entry) in str(exc.value)


def test_names_and_addresses_are_kept_in_order_with_the_default_port():
    assert normalize_servers(["MX1.Example.COM", "192.0.2.1:2525", "[2001:db8::1]"]) == [
        "mx1.example.com:25", "192.0.2.1:2525", "[2001:db8::1]:25"]
