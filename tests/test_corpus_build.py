"""The corpus builder reproduces the test corpus from its public sources.

A fresh clone has no corpus beside it; ``scripts/test.sh`` then runs
``scripts/build_corpus.py``. These tests build it for real (CPython's data,
Debian packages, the mail-parser sdist from PyPI) and compare every byte with
the corpus the rest of the suite reads.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_built_corpus_matches_the_corpus_byte_for_byte(tmp_path, corpus_dir):
    dest = tmp_path / "corpus"
    result = subprocess.run([sys.executable, str(SCRIPT), str(dest)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dest)
    built = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    expected = {p.relative_to(corpus_dir).as_posix() for p in corpus_dir.rglob("*") if p.is_file()}
    assert built == expected
    for relative in sorted(expected - {"SOURCES.md"}):
        assert (dest / relative).read_bytes() == (corpus_dir / relative).read_bytes(), relative
    assert "mail-parser" in (dest / "SOURCES.md").read_text()


def test_missing_source_is_one_clear_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    builder = load_builder()
    monkeypatch.setattr(builder, "CLAMAV_TESTFILES", tmp_path / "absent")
    dest = tmp_path / "corpus"
    assert builder.main(["build_corpus.py", str(dest)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == ["test corpus: cannot reach Debian package clamav-testfiles "
                     "(apt-get install clamav-testfiles)"]
    assert captured.out == ""
    assert not dest.exists()


def test_usage_error_without_destination(capsys):
    builder = load_builder()
    assert builder.main(["build_corpus.py"]) == 2
    assert "usage" in capsys.readouterr().err
