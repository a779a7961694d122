#!/usr/bin/env bash
# Installs the real peers the test suite runs against (Debian packages), when run as root.
# Postfix, swaks, clamd, Rspamd, SpamAssassin, PostgreSQL, testssl.sh, Chromium; gcc and the
# OpenSSL headers for the benchmark's compiled load client and sink (tests/test_bench_smoke.py).
# Nothing is started here: each test starts its own private instance on loopback.
set -euo pipefail

PACKAGES=(postfix swaks clamav clamav-daemon rspamd spamassassin spamc postgresql testssl.sh
          chromium chromium-driver fonts-dejavu-core openssl gcc libc6-dev libssl-dev)

if [ "$(id -u)" != 0 ]; then
    echo "install-peers: not root; skipping Debian packages (tests that need them will fail)" >&2
    exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Postfix asks how to configure the system MTA; the tests use private instances only.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections
# Do not start the packaged daemons: the tests run their own instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-peers: installed ${missing[*]}"
