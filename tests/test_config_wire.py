"""Settings that reach the SMTP wire: the gateway's host name (greeting, Received, EHLO downstream,
authserv-id, certificate) and the greeting banner; and which source an unknown setting is blamed on."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.config import check_host_name, load_settings
from mxguard.errors import ConfigError

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

_LDH_INNER = string.ascii_letters + string.digits + "-"
_ALNUM = string.ascii_letters + string.digits

#: An RFC 1123 label: 1-63 letters, digits, hyphens; a letter or digit at each end.
label = st.one_of(
    st.text(_ALNUM, min_size=1, max_size=1),
    st.builds(lambda a, mid, b: a + mid + b, st.sampled_from(_ALNUM), st.text(_LDH_INNER, max_size=61),
              st.sampled_from(_ALNUM)),
)
#: A valid host name: labels joined by dots, at most 253 characters, last label not all digits.
host_name = (st.lists(label, min_size=1, max_size=6)
             .map(lambda labels: ".".join(labels))
             .filter(lambda name: len(name) <= 253 and not name.rsplit(".", 1)[-1].isdigit()))


def toml_string(value: str) -> str:
    """A TOML basic string for any text (escapes for everything but printable ASCII)."""
    out = []
    for char in value:
        if " " <= char <= "~" and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _write(data_dir, text: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "mxguard.toml").write_text(text, encoding="utf-8")


@EXAMPLES
@given(name=host_name, trailing_dot=st.booleans())
def test_valid_host_names_are_accepted_from_file_and_environment(tmp_path_factory, name, trailing_dot):
    d = tmp_path_factory.mktemp("h")
    given_name = name + ("." if trailing_dot else "")
    _write(d, f"hostname = {toml_string(given_name)}\n")
    assert load_settings(d, environ={}).hostname == name.lower()
    assert load_settings(d, environ={"MXGUARD_HOSTNAME": given_name}).hostname == name.lower()


def _break(name: str, how: str, where: int) -> str:
    labels = name.split(".")
    i = where % len(labels)
    if how == "empty label":
        labels.insert(i, "")
    elif how == "leading hyphen":
        labels[i] = "-" + labels[i]
    elif how == "trailing hyphen":
        labels[i] = labels[i] + "-"
    elif how == "long label":
        labels[i] = "a" * 64
    elif how == "too long":
        labels = ["a" * 63] * 4 + labels  # 256+ characters
    elif how == "leading dot":
        labels.insert(0, "")
    return ".".join(labels)


@EXAMPLES
@given(name=host_name, where=st.integers(0, 10),
       how=st.sampled_from(["empty label", "leading hyphen", "trailing hyphen", "long label", "too long",
                            "leading dot", "bad character"]),
       bad=st.sampled_from(list("_ @!/\\:;,*'\"\t\r\n\x00\x7fé") + ["\u00fc", "\u2024"]))
def test_invalid_host_names_stop_start_up_naming_the_key(tmp_path_factory, name, where, how, bad):
    if how == "bad character":
        cut = where % (len(name) + 1)
        broken = name[:cut] + bad + name[cut:]
    else:
        broken = _break(name, how, where)
    with pytest.raises(ValueError):
        check_host_name(broken)
    d = tmp_path_factory.mktemp("h")
    _write(d, f"hostname = {toml_string(broken)}\n")
    with pytest.raises(ConfigError, match="setting 'hostname'"):
        load_settings(d, environ={})
    _write(d, "")
    with pytest.raises(ConfigError, match="environment variable MXGUARD_HOSTNAME: setting 'hostname'"):
        load_settings(d, environ={"MXGUARD_HOSTNAME": broken})


@pytest.mark.parametrize("name", ["mx..example.com", "-x", "a_b.example.com", "a" * 70 + ".example.com",
                                  "mx.example.com-", "", "10.0.0.1", "a" * 254])
def test_trial_host_names_are_refused(tmp_path, name):
    _write(tmp_path, f"hostname = {toml_string(name)}\n")
    with pytest.raises(ConfigError, match="setting 'hostname'"):
        load_settings(tmp_path, environ={})


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"


@EXAMPLES
@given(text=st.text(_PRINTABLE, max_size=60))
def test_printable_banners_are_accepted(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("b")
    _write(d, "")
    assert load_settings(d, environ={"MXGUARD_SMTP__BANNER": text}).smtp.banner == text


@EXAMPLES
@given(before=st.text(_PRINTABLE, max_size=30), after=st.text(_PRINTABLE, max_size=30),
       bad=st.one_of(st.sampled_from(["\r", "\n", "\r\n", "\x00", "\x7f", "\x1b", "\x85", "\u2028"]),
                     st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                                   blacklist_categories=("Cs",))))
def test_a_banner_with_a_control_character_is_refused_naming_the_key(tmp_path_factory, before, after, bad):
    d = tmp_path_factory.mktemp("b")
    _write(d, f"[smtp]\nbanner = {toml_string(before + bad + after)}\n")
    with pytest.raises(ConfigError, match=r"mxguard.toml: setting 'smtp.banner'"):
        load_settings(d, environ={})
    _write(d, "")
    with pytest.raises(ConfigError, match="environment variable MXGUARD_SMTP__BANNER: setting 'smtp.banner'"):
        load_settings(d, environ={"MXGUARD_SMTP__BANNER": before + bad + after})


def test_the_trial_banner_injection_is_refused(tmp_path):
    _write(tmp_path, "")
    with pytest.raises(ConfigError, match="MXGUARD_SMTP__BANNER: setting 'smtp.banner'"):
        load_settings(tmp_path, environ={"MXGUARD_SMTP__BANNER": "ESMTP x\r\n250 fake"})


@pytest.mark.parametrize("value", ["ops@example.com\r\nRCPT TO:<x@evil.test>", "ops@exa\x00mple.com"])
def test_alert_address_with_control_characters_is_refused(tmp_path, value):
    _write(tmp_path, "")
    with pytest.raises(ConfigError, match="setting 'notify.admin_address'"):
        load_settings(tmp_path, environ={"MXGUARD_NOTIFY__ADMIN_ADDRESS": value})


@pytest.mark.parametrize("variable,key", [
    ("MXGUARD_FOO__BAR", "foo"),
    ("MXGUARD_FOO", "foo"),
    ("MXGUARD_SMTP__NOPE", "smtp.nope"),
    ("MXGUARD_FOO__BAR__BAZ", "foo"),
])
def test_an_unknown_environment_setting_names_the_variable_not_the_file(tmp_path, variable, key):
    _write(tmp_path, "")
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path, environ={variable: "1"})
    message = str(err.value)
    assert message.startswith(f"environment variable {variable}: setting '{key}'"), message
    assert "mxguard.toml" not in message


def test_an_unknown_setting_in_the_file_still_names_the_file(tmp_path):
    _write(tmp_path, "[foo]\nbar = 1\n")
    with pytest.raises(ConfigError, match=r"mxguard.toml: setting 'foo'"):
        load_settings(tmp_path, environ={})
