#!/usr/bin/env python3
"""Full load and soak run (issue 8): N concurrent sessions, some slow, for T seconds, against `mxguard serve`.

Prints messages accepted/delivered, duplicates, RSS and file descriptors before and after.
The CI variant is tests/test_load.py (fewer sessions, shorter).

    .venv/bin/python bench/load.py --sessions 500 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    env = {**os.environ, "LOADTEST_SESSIONS": str(args.sessions), "LOADTEST_SECONDS": str(args.seconds)}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_load.py")], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
