#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
#   - Debian peers (as root): scripts/install-peers.sh
#   - Python: a virtualenv in .venv with mxguard and its test extras
#   - the corpus of real messages: ../shared/corpus beside the checkout when it is there
#     (or TEST_CORPUS_DIR), else built from its public sources by scripts/build_corpus.py
#     into ${XDG_CACHE_HOME:-~/.cache}/mxguard/test-corpus
# Extra arguments go to pytest (e.g. scripts/test.sh -k smtp -x).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-peers.sh

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e '.[test]'

if [ -z "${TEST_CORPUS_DIR:-}" ] && [ ! -d ../shared/corpus ]; then
    TEST_CORPUS_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/mxguard/test-corpus"
    if [ ! -f "$TEST_CORPUS_DIR/SOURCES.md" ]; then
        .venv/bin/python scripts/build_corpus.py "$TEST_CORPUS_DIR" >/dev/null
    fi
    export TEST_CORPUS_DIR
fi

exec .venv/bin/python -m pytest "$@"
