"""``mxguard init`` and the first commands a new user runs, as the installed command in a subprocess:
a restore without the sealing key, the default host name, a failed init, a damaged database, a
piped password, and the README's first steps in order."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.config import load_settings
from mxguard.errors import ConfigError
from mxguard.services import setup
from mxguard.services.users import authenticate
from mxguard.spool import queue
from mxguard.storage.sealing import KeyRing
from tests.support.gateway import in_store
from tests.support.smtp import message

MXGUARD = [str(Path(sys.executable).with_name("mxguard"))]


def mx(*args: str, data_dir: Path, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(MXGUARD + ["--data-dir", str(data_dir), *args], capture_output=True, text=True,
                          timeout=120, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.args, proc.stdout, proc.stderr)
    return proc


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, (proc.args, proc.stdout)
    assert "Traceback" not in proc.stderr and "sqlalchemy.exc" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors, proc.stderr
    return errors[-1]



def _hold_one(data_dir: Path) -> None:
    """A sealed spool entry, as a route that was down leaves behind."""
    async def enqueue(store, settings):
        entry = queue.NewSpoolEntry(txn_id="INIT1", domain="example.com", mail_from="a@sender.test",
                                    recipients=["bob@example.com"], message=message(subject="held"),
                                    subject="held", first_reply="451 4.4.1 connect failed")
        await queue.enqueue(store, [entry], KeyRing(settings.path(settings.sealing_key_file)).get(), settings.spool)
    in_store(data_dir, enqueue)


# -- 1. a restore without keys/sealing.keys -------------------------------------------------------

def test_init_refuses_a_new_sealing_key_for_a_database_that_was_initialised(tmp_path):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    _hold_one(d)
    key_file = d / "keys" / "sealing.keys"
    original = key_file.read_text()
    key_file.unlink()  # the restore left it out

    refused = mx("init", data_dir=d)
    line = _one_line_error(refused)
    assert str(key_file) in line and "restore" in line.lower() and "--new-sealing-key" in line
    assert "already initialised" not in refused.stdout
    assert not key_file.exists(), "init made a new key that cannot open the held mail"

    # serve's advice is to restore the file, not to run init (which would now refuse anyway).
    served = mx("serve", "--workers", "1", "--no-web", "--smtp", "127.0.0.1:0", data_dir=d)
    line = _one_line_error(served)
    assert "sealing_key_file" in line and "restore" in line and "does not exist; run 'mxguard init'" not in line

    key_file.write_text(original)
    key_file.chmod(0o600)
    _ok(mx("init", data_dir=d))
    assert key_file.read_text() == original

    # Lost for good: the explicit option starts a new key.
    key_file.unlink()
    out = _ok(mx("init", "--new-sealing-key", data_dir=d))
    assert key_file.exists() and key_file.read_text() != original
    assert "already initialised" in out.stdout


def test_init_makes_a_sealing_key_while_the_database_holds_nothing(tmp_path):
    """Settings kept, database and keys gone: nothing is sealed anywhere, so a new key is right."""
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    (d / "keys" / "sealing.keys").unlink()
    (d / "mxguard.db").unlink()
    _ok(mx("init", data_dir=d))
    assert (d / "keys" / "sealing.keys").exists()


# -- 2. the default host name ----------------------------------------------------------------------

def test_init_without_hostname_takes_this_machines_name_and_warns_when_it_is_no_fqdn(tmp_path):
    d = tmp_path / "d"
    proc = _ok(mx("init", data_dir=d))
    expected = setup.default_hostname()
    assert load_settings(d, environ={}).hostname == expected
    warned = "warning:" in proc.stderr and "--hostname" in proc.stderr
    assert warned == ("." not in expected or expected.startswith("localhost"))
    if socket.gethostname() not in ("localhost", ""):
        assert expected != "localhost", "the machine has a name of its own"
    # A real FQDN: no warning.
    quiet = _ok(mx("init", "--hostname", "mx1.example.com", data_dir=tmp_path / "e"))
    assert "warning:" not in quiet.stderr


@pytest.mark.parametrize("own,canonical,fqdn,expected", [
    ("vm", "vm", "localhost", "vm"),                    # /etc/hosts: 127.0.0.1 localhost ... vm
    ("mx1", "mx1.example.net", "localhost", "mx1.example.net"),
    ("mx1", "mx1", "mx1.example.org", "mx1.example.org"),
    ("bad_name", "bad_name", "localhost", "localhost"),  # no valid name at all
])
def test_default_hostname_is_what_hostname_f_finds(monkeypatch, own, canonical, fqdn, expected):
    monkeypatch.setattr(setup.socket, "gethostname", lambda: own)
    monkeypatch.setattr(setup.socket, "getfqdn", lambda name="": fqdn)
    monkeypatch.setattr(setup.socket, "getaddrinfo",
                        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, canonical, ("127.0.0.1", 0))])
    assert setup.default_hostname() == expected
    assert (setup.hostname_warning(expected) is None) == ("." in expected)


# -- 3. an invalid --hostname -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mx..example.com", "-x", "a_b.example.com", "a" * 70 + ".example.com"])
def test_init_refuses_an_invalid_hostname_and_leaves_nothing(tmp_path, name):
    d = tmp_path / "d"
    line = _one_line_error(mx("init", "--hostname", name, data_dir=d))
    assert "'hostname'" in line
    assert not d.exists()


# -- 6. a failed init -------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connecting is refused


@pytest.mark.parametrize("existing", [False, True])
def test_failed_init_leaves_nothing_behind_and_can_be_run_again(tmp_path, existing):
    d = tmp_path / "d"
    if existing:
        d.mkdir()
        (d / "notes.txt").write_text("the operator's own file\n")
    url = f"postgresql+asyncpg://u:p@127.0.0.1:{_closed_port()}/db"
    line = _one_line_error(mx("init", "--database-url", url, data_dir=d))
    assert "cannot reach the database" in line and ":p@" not in line
    if existing:
        assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    else:
        assert not d.exists()
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    assert load_settings(d, environ={}).database_url == ""


# -- 5. a damaged database --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("domain", "list"), ("log",), ("spool", "stats"), ("user", "list"), ("org", "list"), ("init",),
    ("serve", "--workers", "1", "--no-web", "--smtp", "127.0.0.1:0"),
    ("serve", "--workers", "2", "--no-web", "--smtp", "127.0.0.1:0"),
])
def test_a_damaged_database_is_a_one_line_error_for_every_command(tmp_path, args):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    (d / "mxguard.db").write_text("garbage\n")
    line = _one_line_error(mx(*args, data_dir=d))
    assert str(d / "mxguard.db") in line and "file is not a database" in line


# -- 7. a password piped on stdin -------------------------------------------------------------------

def test_user_add_reads_a_piped_password(tmp_path):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    out = _ok(mx("user", "add", "a3@example.org", "--role", "admin", data_dir=d, stdin="averylongpassword123\n"))
    assert "One-time password" not in out.stdout
    user = in_store(d, lambda store, s: authenticate(store, "a3@example.org", "averylongpassword123", "127.0.0.1"))
    assert user.email == "a3@example.org" and not user.must_change_password

    short = mx("user", "add", "a4@example.org", "--role", "admin", data_dir=d, stdin="short\n")
    assert "12 characters" in _one_line_error(short)

    _ok(mx("user", "passwd", "a3@example.org", data_dir=d, stdin="anotherlongpassword9\r\n"))
    in_store(d, lambda store, s: authenticate(store, "a3@example.org", "anotherlongpassword9", "127.0.0.1"))

    # Nothing piped (</dev/null): a generated one-time password, as before.
    gen = _ok(mx("user", "add", "a5@example.org", "--role", "admin", data_dir=d))
    assert "One-time password" in gen.stdout


# -- 9. the README's sequence, in order -------------------------------------------------------------

def test_readme_first_steps_work_in_order(tmp_path):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    _ok(mx("domain", "add", "example.com", "--server", "mail1.example.com", "--server", "mail2.example.com:2525",
           "--downstream-tls", "verify", "--inbound-tls", "optional", data_dir=d))
    _ok(mx("org", "add", "Example Corp", data_dir=d))
    _ok(mx("domain", "set", "example.com", "--org", "Example Corp", data_dir=d))
    _ok(mx("user", "add", "admin@example.com", "--role", "admin", data_dir=d, stdin="averylongpassword123\n"))
    _ok(mx("user", "add", "ops@example.com", "--role", "org-admin", "--org", "Example Corp", "--generate-password",
           data_dir=d))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    console_section = readme.split("### Administration Console and REST API")[1].split("```")[1]
    assert "domain add example.com" not in console_section  # step 2 added it already


def test_org_admin_in_a_domain_of_no_organization_is_told_so(tmp_path):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    _ok(mx("domain", "add", "example.com", "--server", "mail.example.com", data_dir=d))
    _ok(mx("org", "add", "Example Corp", data_dir=d))
    line = _one_line_error(mx("user", "add", "ops@example.com", "--role", "org-admin", "--org", "Example Corp",
                              "--generate-password", data_dir=d))
    assert "another organization" not in line and "no organization" in line and "--org" in line


def test_help_lists_every_downstream_tls_mode(tmp_path):
    for command in ("add", "set"):
        out = _ok(mx("domain", command, "--help", data_dir=tmp_path)).stdout
        text = " ".join(out.replace("│", " ").split())
        for mode in ("off", "opportunistic", "required", "verify", "dane", "dane-only", "mta-sts"):
            assert f" {mode} " in f" {text.replace('|', ' ')} ", (command, mode)


def test_remove_refusal_names_the_force_option(tmp_path):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    _ok(mx("domain", "add", "example.com", "--server", "mail.example.com", data_dir=d))
    _hold_one(d)
    line = _one_line_error(mx("domain", "remove", "example.com", data_dir=d))
    assert "--force" in line
    _ok(mx("domain", "remove", "example.com", "--force", data_dir=d))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_listening_log_line_brackets_ipv6(tmp_path, workers):
    d = tmp_path / "d"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(MXGUARD + ["--data-dir", str(d), "serve", "--workers", workers, "--no-web",
                                       "--smtp", f"[::1]:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "listening" in line and "smtp=" in line:
                break
        # Stop it only once it serves (a signal while workers start is another test's subject).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET6) as s:
                if s.connect_ex(("::1", port)) == 0:
                    break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    line = next(x for x in seen if "smtp=" in x)
    assert f"smtp=[::1]:{port}" in line and "smtp=::1:" not in line, line


def test_a_new_node_on_a_shared_database_with_sealed_data_needs_the_key_first(tmp_path):
    """A second node's new data dir on the first node's database: while nothing is sealed it may
    start with a key of its own (replaced by the first node's copy); once mail is held, init
    refuses until the first node's key file is there."""
    first, second, third = tmp_path / "n1", tmp_path / "n2", tmp_path / "n3"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=first))
    shared = f"sqlite+aiosqlite:///{first / 'mxguard.db'}"
    _ok(mx("init", "--hostname", "mx2.example.com", "--database-url", shared, data_dir=second))
    _hold_one(first)
    line = _one_line_error(mx("init", "--hostname", "mx3.example.com", "--database-url", shared, data_dir=third))
    assert "sealing.keys" in line and "spool" in line and "copy it from another node" in line
    assert not third.exists()
    (third / "keys").mkdir(parents=True)
    (third / "keys" / "sealing.keys").write_bytes((first / "keys" / "sealing.keys").read_bytes())
    (third / "keys" / "sealing.keys").chmod(0o600)
    _ok(mx("init", "--hostname", "mx3.example.com", "--database-url", shared, data_dir=third))


# -- init again on an existing data dir, and errors no command expected ---------------------------

def test_init_again_with_a_bad_host_name_names_the_setting_in_one_line(tmp_path):
    d = tmp_path / "data"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    line = _one_line_error(mx("init", "--hostname", "bad_host", data_dir=d))
    assert "hostname" in line and "bad_host" in line, line
    assert load_settings(d, environ={}).hostname == "mx1.example.com"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=80), st.from_regex(r"[A-Za-z0-9_.\- ]{0,70}", fullmatch=True)))
def test_init_on_an_existing_data_dir_gives_a_config_error_or_succeeds_for_any_host_name(tmp_path_factory, name):
    d = _existing_data_dir(tmp_path_factory)
    try:
        settings_, created = asyncio.run(setup.initialize(d, hostname=name))
    except ConfigError as exc:
        assert str(exc).startswith(("hostname:", f"{d / 'mxguard.toml'} exists with hostname")), exc
    else:
        assert not created and settings_.hostname == "mx1.example.com"
        assert name.lower().rstrip(".") == "mx1.example.com" or not name


_EXISTING: dict[str, Path] = {}


def _existing_data_dir(factory) -> Path:
    if "d" not in _EXISTING:
        d = factory.mktemp("existing") / "data"
        _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
        _EXISTING["d"] = d
    return _EXISTING["d"]


def test_an_unexpected_error_in_any_command_is_one_line_without_a_stack_trace(monkeypatch, capsys):
    import mxguard.cli as cli

    def broken() -> None:
        raise RuntimeError("the thing that broke")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: unexpected RuntimeError: the thing that broke"), err


def test_an_unreadable_rules_file_and_a_bad_server_name_the_option(tmp_path):
    d = tmp_path / "data"
    _ok(mx("init", "--hostname", "mx1.example.com", data_dir=d))
    missing = tmp_path / "no-such-rules.json"
    line = _one_line_error(mx("domain", "add", "example.com", "--server", "127.0.0.1:2525",
                              "--attachment-rules", f"@{missing}", data_dir=d))
    assert "attachment_rules" in line and str(missing) in line, line
    line = _one_line_error(mx("domain", "add", "example.com", "--server", "host_with_underscore:25", data_dir=d))
    assert "servers" in line and "host_with_underscore" in line, line
    assert "example.com" not in _ok(mx("domain", "list", data_dir=d)).stdout
