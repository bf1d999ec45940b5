#!/usr/bin/env bash
# Installs the real protocol peers the tests start (Debian packages), once: a fast dpkg
# check skips apt entirely when everything is there. Called by `npm test` (scripts/test.mjs)
# and by .ci/run, so the README's test command does its own set-up on a fresh machine.
# Needs root or password-less sudo to install; says what to run otherwise.
set -euo pipefail

# The peers: Postfix (drives serveMilter), Dovecot LMTP (a real mailstore) with Pigeonhole Sieve
# (dovecot-sieve: examples/mail-server.ts files spam into Junk with it), miltertest and
# python3-milter (libmilter), opendkim and rspamd (real milters for connectMilter), openssl (test
# certificates), swaks and unbound (handy for manual checks; see shared/PEERS.md); redis-server
# (shared counters: rateLimit, greylist, redisAnvil) and haproxy (PROXY protocol v1/v2 in front
# of several gateways) for the scale-out tests.
APT_PACKAGES="openssl swaks postfix dovecot-core dovecot-lmtpd dovecot-sieve miltertest python3-milter opendkim opendkim-tools rspamd unbound redis-server haproxy"

missing=()
for pkg in ${APT_PACKAGES}; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "[peers] all installed: ${APT_PACKAGES}"
  exit 0
fi
echo "[peers] missing: ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "[peers] ERROR: installing them needs root. Run: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix asks a debconf question on install; answer it up front.
echo "postfix postfix/main_mailer_type select No configuration" | "${SUDO[@]}" debconf-set-selections
echo "+ apt-get update"
"${SUDO[@]}" apt-get update
echo "+ apt-get install -y --no-install-recommends ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
