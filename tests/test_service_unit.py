"""The shipped systemd unit (deploy/mxguard.service), checked by systemd itself.

``systemd-analyze verify`` runs against a throw-away root holding the
distribution's units, the shipped unit and an executable where the unit
expects the program, so nothing on this machine is changed.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "mxguard.service"


def fake_root(tmp_path: Path, unit_text: str) -> Path:
    root = tmp_path / "root"
    units = root / "usr" / "lib" / "systemd" / "system"
    # The distribution's own units (targets the shipped unit refers to); /lib may be /usr/lib.
    sources = {p.resolve() for p in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")) if p.is_dir()}
    for source in sorted(sources):
        shutil.copytree(source, units, symlinks=True, dirs_exist_ok=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "etc" / "systemd" / "system" / "mxguard.service").write_text(unit_text)
    program = root / "opt" / "mxguard" / "bin" / "mxguard"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/mxguard.service"],
                          capture_output=True, text=True, timeout=60)


def test_systemd_accepts_the_unit(tmp_path):
    out = verify(fake_root(tmp_path, UNIT.read_text()))
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_a_broken_unit_is_caught(tmp_path):
    broken = UNIT.read_text().replace("ExecStart=/opt/mxguard/bin/mxguard serve", "ExecStart=/opt/nowhere/mxguard serve")
    out = verify(fake_root(tmp_path, broken))
    assert out.returncode != 0 and "/opt/nowhere/mxguard" in out.stderr


def test_the_unit_runs_unprivileged_and_sandboxed(tmp_path):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["User"] == "mxguard" and service["User"] != "root"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["StateDirectory"] == "mxguard"
    assert service["Environment"] == "MXGUARD_DATA_DIR=/var/lib/mxguard"
    assert service["Restart"] == "on-failure"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={fake_root(tmp_path, UNIT.read_text())}",
                          "mxguard.service"], capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for mxguard.service: ([\d.]+)", out.stdout)
    assert score, out.stdout[-2000:] + out.stderr
    print(f"systemd-analyze security exposure: {score.group(1)}")
    assert float(score.group(1)) <= 3.0  # systemd calls 0-3.9 "OK"; the stock unit of a daemon is 9.6
