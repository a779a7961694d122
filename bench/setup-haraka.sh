#!/usr/bin/env bash
# Installs Haraka from the npm registry into bench/.cache/haraka (gitignored) for bench/run.py.
# Idempotent: does nothing when that version is already there. Needs Node.js and npm.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${HARAKA_VERSION:-3.3.4}
dest=.cache/haraka
if [ -f "$dest/node_modules/Haraka/package.json" ] &&
   grep -q "\"version\": \"$VERSION\"" "$dest/node_modules/Haraka/package.json"; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "setup-haraka: npm not found; install Node.js (with npm) first" >&2
    exit 1
fi
mkdir -p "$dest"
npm install --no-audit --no-fund --loglevel=error --prefix "$dest" "Haraka@$VERSION" >&2
echo "setup-haraka: Haraka $VERSION installed in bench/$dest" >&2
