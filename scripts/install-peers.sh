#!/usr/bin/env bash
# Installs the real peers the test suite runs against (Debian packages), when run as root.
# Postfix (and the Cyrus SASL plug-ins, to relay through the gateway with AUTH), swaks, clamd, Rspamd,
# SpamAssassin (spamd), PostgreSQL, testssl.sh, Chromium, NSD + unbound
# + ldns (DNSSEC on loopback), systemd-analyze, pebble (the ACME test CA); gcc and the
# OpenSSL headers for the benchmark's compiled load client and sink (tests/test_bench_smoke.py).
# Nothing is started here: each test starts its own private instance on loopback.
set -euo pipefail

PACKAGES=(postfix libsasl2-modules swaks clamav clamav-daemon rspamd spamassassin spamc spamd postgresql testssl.sh
          chromium chromium-driver fonts-dejavu-core openssl gcc libc6-dev libssl-dev
          clamav-testfiles systemd nsd unbound ldnsutils bind9-dnsutils pebble)
# The test corpus (scripts/build_corpus.py) reads CPython's test_email data: an interpreter
# without its 'test' package gets it from the distribution's testsuite package of the same
# version (Debian: libpython3.11-testsuite). Where the distribution has none for that version,
# build_corpus.py says so in one line.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import test.test_email' 2>/dev/null \
        && ! ls -d /usr/lib/python3*/test/test_email/data >/dev/null 2>&1; then
    PACKAGES+=("libpython$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-testsuite")
fi

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
available=()
for p in "${missing[@]}"; do
    if apt-cache show "$p" >/dev/null 2>&1; then available+=("$p"); else
        echo "install-peers: no Debian package $p here" >&2; fi
done
apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null
echo "install-peers: installed ${available[*]}"
