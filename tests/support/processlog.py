"""Reading a gateway's JSON process log from tests (one JSON object per line)."""

from __future__ import annotations

import json
import time
from pathlib import Path


def json_lines(log_file: Path) -> list[dict]:
    """Every line of ``log_file`` as a dict; a line that is not JSON as ``{"event": "(not JSON)", "text": ...}``."""
    out = []
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": "(not JSON)", "text": line})
    return out


def wait_for_line(log_file: Path, predicate, timeout: float) -> dict:
    """The first record for which ``predicate(record)`` is true, polling for ``timeout`` seconds.

    Raises:
        AssertionError: no such line in time (the message holds the log's end).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in json_lines(log_file):
            if predicate(record):
                return record
        time.sleep(0.05)
    raise AssertionError("no such log line; the log holds:\n" + log_file.read_text()[-3000:])
