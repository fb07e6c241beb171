#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it
# is missing (Debian's coturn for turnutils_uclient, iptables for the
# network-namespace test, chromium for the browser test), then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "test.sh: need root to run: $*" >&2; exit 1; fi
}

missing=()
if ! command -v openssl >/dev/null 2>&1; then
  missing+=(openssl)     # test certificates and an independent HMAC
fi
if ! command -v turnutils_uclient >/dev/null 2>&1; then
  missing+=(coturn)      # turnutils_uclient
fi
if ! command -v iptables >/dev/null 2>&1 && ! command -v nft >/dev/null 2>&1; then
  missing+=(iptables)    # firewall inside the namespace of tests/netns_udp_blocked.rs
fi
if ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)    # headless browser of tests/browser_chromium.rs and tests/netns_udp_blocked.rs
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Two cores: keep test parallelism modest.
cargo test --locked -- --test-threads=2
