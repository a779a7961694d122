"""Debian's Chromium driven by Playwright for Python (no browser download: ``executable_path``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


def chromium_path() -> str:
    """Debian's chromium (installed by scripts/install-peers.sh); ``$TEST_CHROMIUM`` overrides.

    Raises:
        RuntimeError: not installed — the test fails loudly rather than skipping.
    """
    path = os.environ.get("TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise RuntimeError("chromium is not installed; run scripts/install-peers.sh (as root)")
    return path
