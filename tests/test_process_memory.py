"""What a gateway process loads: libraries it does not use at run time stay out of its memory.

Issue 17's idle-session goal is a memory figure per process, most of which is
the libraries imported at start. Alembic is needed only when the schema must
change, httpx only for an MTA-STS fetch, a TLS-RPT report sent over HTTPS or an
ACME probe, and dnspython's DNS-over-HTTPS client (httpx2, h2) never: each is
kept out of a usual start. Checked on a real start (``Gateway.start`` with the
console) in a fresh interpreter, so nothing the test process imported counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from mxguard.storage.db import SCHEMA_HEAD, MIGRATIONS_DIR

from tests.support.gateway import init_data_dir

#: Top-level packages a started gateway must not have imported.
NOT_AT_START = ("alembic", "mako", "httpx", "httpx2", "h2", "httpcore2")

_START_AND_LIST_MODULES = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from mxguard.config import load_settings
    from mxguard.gateway import Gateway

    async def main(data_dir):
        settings = load_settings(data_dir, environ={"MXGUARD_FILTERS__SENDER_AUTH": "false"})
        gateway = Gateway(settings, smtp_listen=["127.0.0.1:0"], web_listen="127.0.0.1:0")
        await gateway.start()
        try:
            return sorted({name.split(".")[0] for name in sys.modules})
        finally:
            await gateway.stop()

    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
""")


def _modules_after_a_start(data_dir) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", _START_AND_LIST_MODULES, str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_schema_head_constant_is_alembics_head():
    """``SCHEMA_HEAD`` lets a start skip alembic; it must name the newest migration."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(cfg).get_heads() == [SCHEMA_HEAD]


def test_a_usual_start_imports_neither_alembic_nor_an_http_client(tmp_path):
    init_data_dir(tmp_path)  # migrates: the start below finds the schema at the head
    loaded = _modules_after_a_start(tmp_path)
    assert "mxguard" in loaded and "aiosmtpd" in loaded and "fastapi" in loaded  # it did start, console too
    assert loaded.isdisjoint(NOT_AT_START), sorted(loaded & set(NOT_AT_START))


def test_a_start_on_an_old_schema_still_migrates(tmp_path):
    """The short cut must not skip a needed upgrade: a database one revision behind is upgraded."""
    from alembic import command

    from mxguard.storage.db import _alembic_config
    from tests.support.gateway import in_store

    init_data_dir(tmp_path)

    async def downgrade(store, _settings):
        async with store.engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "-1"))
        return await store.schema_is_current()

    assert in_store(tmp_path, downgrade) is False
    loaded = _modules_after_a_start(tmp_path)
    assert "alembic" in loaded  # it had to migrate

    async def current(store, _settings):
        return await store.schema_is_current()

    assert in_store(tmp_path, current) is True
