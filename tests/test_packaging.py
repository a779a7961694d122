"""The installed package (a wheel, as `pip install .` builds it) carries every file the code needs.

The tests otherwise run against an editable install, which reads files from the source tree and
so cannot notice a data file missing from the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _clean_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them (no build or egg-info left-overs)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_wheel_contains_every_package_file(tmp_path):
    source_tree = _clean_copy(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           "-w", str(tmp_path), str(source_tree)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("mxguard-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {str(p.relative_to(REPO)) for p in (REPO / "mxguard").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    missing = sorted(source - names)
    assert not missing, f"files of the package missing from the wheel: {missing}"
