#!/usr/bin/env bash
# Runs the whole test suite: unit, property, integration and doc tests, with
# every feature on. Installs the system packages the tests need when it can.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the integration tests start by themselves. redis-server:
# the Redis registry tests (tests/registry) start it on a free port.
# dnsmasq (Debian's dnsmasq-base: the binary only, no service): the DNS
# discovery tests (tests/dns) run it on a loopback port.
NEEDED_COMMANDS=(   # pairs of "command:debian-package"
  dnsmasq:dnsmasq-base
  redis-server:redis-server
)

missing=()
for pair in "${NEEDED_COMMANDS[@]+"${NEEDED_COMMANDS[@]}"}"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  # Daemons live in /usr/sbin, which a non-root PATH may lack.
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] \
    || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing system packages: ${missing[*]}; install them (e.g. apt-get install ${missing[*]}) and run again" >&2
    exit 1
  fi
fi

# Unit, property and integration tests, examples and benches built in test mode.
cargo test --all-features --all-targets
# Doctests (not part of --all-targets).
cargo test --all-features --doc
