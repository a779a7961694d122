#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
#   - Debian peers (as root): scripts/install-peers.sh
#   - Python: a virtualenv in .venv with mxguard and its test extras
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

exec .venv/bin/python -m pytest "$@"
