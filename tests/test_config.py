"""Bootstrap settings: defaults, environment overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from mxguard.config import load_settings, resolve_data_dir
from mxguard.errors import ConfigError


def test_defaults_and_env_override(data_dir):
    s = load_settings(data_dir, environ={})
    assert s.hostname == "mx.gw.test"
    assert s.smtp.max_message_size == 25 * 1024 * 1024
    assert s.effective_database_url.startswith("sqlite+aiosqlite:///")
    s = load_settings(data_dir, environ={"MXGUARD_SMTP__MAX_RECIPIENTS": "250",
                                         "MXGUARD_HOSTNAME": "MX2.Example.COM."})
    assert s.smtp.max_recipients == 250
    assert s.hostname == "mx2.example.com"


@pytest.mark.parametrize("text,key", [
    ("[smtp]\nmax_message_size = 'big'\n", "smtp.max_message_size"),
    ("[smtp]\nlisten = ['127.0.0.1:99999']\n", "smtp.listen"),
    ("[tls]\nmin_version = '1.1'\n", "tls.min_version"),
    ("[smtp]\nmax_recipent = 5\n", "smtp.max_recipent"),
    ("hostname = 'has space'\n", "hostname"),
    ("[smtp]\nsubmission_listen = ['0.0.0.0:70000']\n", "smtp.submission_listen"),
    ("[relay]\nsender_rate = 0\n", "relay.sender_rate"),
    ("[relay]\nrate_window = 5\n", "relay.rate_window"),
    ("[relay]\nmax_auth_failure = 3\n", "relay.max_auth_failure"),
])
def test_invalid_value_names_the_key(tmp_path, text, key):
    (tmp_path / "mxguard.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path, environ={})
    assert f"'{key}'" in str(err.value)


def test_env_value_is_validated_too(data_dir):
    with pytest.raises(ConfigError, match="'downstream.connect_timeout'"):
        load_settings(data_dir, environ={"MXGUARD_DOWNSTREAM__CONNECT_TIMEOUT": "-1"})


def test_broken_toml_and_missing_dir(tmp_path):
    (tmp_path / "mxguard.toml").write_text("hostname = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(tmp_path, environ={})
    with pytest.raises(ConfigError, match="mxguard init"):
        load_settings(tmp_path / "nope", environ={})


def test_data_dir_resolution(monkeypatch):
    monkeypatch.delenv("MXGUARD_DATA_DIR", raising=False)
    assert str(resolve_data_dir(None)) == "mxguard-data"
    monkeypatch.setenv("MXGUARD_DATA_DIR", "/srv/mx")
    assert str(resolve_data_dir(None)) == "/srv/mx"
    assert str(resolve_data_dir("/other")) == "/other"


def test_unknown_environment_variable_is_named(data_dir):
    with pytest.raises(ConfigError, match="environment variable MXGUARD_SMTP__MAX_RECIPENTS"):
        load_settings(data_dir, environ={"MXGUARD_SMTP__MAX_RECIPENTS": "5"})


def test_env_list_setting_error_names_the_variable(data_dir):
    with pytest.raises(ConfigError, match="environment variable MXGUARD_FILTERS__VIRUS_ENGINES"):
        load_settings(data_dir, environ={"MXGUARD_FILTERS__VIRUS_ENGINES": "bogus"})


def test_dns_servers_must_be_ip_addresses(data_dir):
    with pytest.raises(ConfigError, match="'filters.dns_servers'.*IP address"):
        load_settings(data_dir, environ={"MXGUARD_FILTERS__DNS_SERVERS": "notanip"})
    assert load_settings(data_dir, environ={"MXGUARD_FILTERS__DNS_SERVERS": "127.0.0.1:5353,[::1]:53"}
                         ).filters.dns_servers == ["127.0.0.1:5353", "[::1]:53"]


@pytest.mark.parametrize("value", ['127.0.0.1:2600,[::1]:2601', '["127.0.0.1:2600", "[::1]:2601"]',
                                   ' 127.0.0.1:2600 , [::1]:2601 '])
def test_list_settings_from_the_environment_take_json_or_commas(data_dir, value):
    """The environment has no lists: a JSON array or comma-separated items, for every list setting."""
    s = load_settings(data_dir, environ={"MXGUARD_SMTP__LISTEN": value,
                                         "MXGUARD_DOWNSTREAM__DNS_SERVERS": value.replace("2600", "53").replace("2601", "53"),
                                         "MXGUARD_SERVER__MX_HOSTS": '["mx1.example.net", "mx2.example.net"]'})
    assert s.smtp.listen == ["127.0.0.1:2600", "[::1]:2601"]
    assert s.downstream.dns_servers == ["127.0.0.1:53", "[::1]:53"]
    assert s.server.mx_hosts == ["mx1.example.net", "mx2.example.net"]
    with pytest.raises(ConfigError, match="MXGUARD_SMTP__LISTEN"):
        load_settings(data_dir, environ={"MXGUARD_SMTP__LISTEN": '["127.0.0.1:25"'})


@pytest.mark.parametrize("value, expected", [("[::1]:2536", ["[::1]:2536"]),
                                             ("[::1]:2536,127.0.0.1:2537", ["[::1]:2536", "127.0.0.1:2537"]),
                                             ("[2001:db8::1]:25 , [::1]:26", ["[2001:db8::1]:25", "[::1]:26"])])
def test_a_bracketed_ipv6_listener_first_is_an_item_not_json(data_dir, value, expected):
    """``[::1]:2536`` starts like a JSON array; an IPv6-only listener given in the environment
    (systemd ``Environment=``) was refused as malformed JSON."""
    assert load_settings(data_dir, environ={"MXGUARD_SMTP__LISTEN": value}).smtp.listen == expected


def test_the_file_init_writes_holds_every_setting_with_its_default():
    """README: ``init`` writes every key with its default and meaning. A setting added to the
    model but not to the file would be one an administrator cannot find."""
    import tomllib

    from pydantic import BaseModel

    from mxguard.config import Settings, render_settings_file

    defaults = Settings(hostname="mx1.example.com")
    written = tomllib.loads(render_settings_file(defaults))
    missing = []
    for name, field in Settings.model_fields.items():
        if field.exclude:
            continue
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            section = written.get(name, {})
            missing += [f"{name}.{key}" for key in type(value).model_fields if key not in section]
            for key in type(value).model_fields:
                if key in section:
                    assert section[key] == getattr(value, key), f"{name}.{key}"
        elif name not in written:
            missing.append(name)
    assert not missing, f"settings init does not write: {missing}"
