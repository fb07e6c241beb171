#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it
# is missing (Debian's coturn for turnutils_uclient, iptables for the
# network-namespace test, nftables for the lossy link of the call-health
# test, chromium and firefox-esr for the browser tests, pebble, curl and
# libnss3-tools for the ACME test, squid for the
# proxy-only network test, prosody and
# docker-compose for the deploy tests, prometheus for the promtool of the
# alerting-rules test, cargo-deb, dpkg-dev and binutils for the Debian package
# test, clang and libbpf-dev for the XDP fast path's build, ethtool for its tests, a Python virtualenv with slixmpp and PyYAML in .venv), then runs cargo
# test.
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
if ! command -v nft >/dev/null 2>&1; then
  missing+=(nftables)    # the lossy uplink (a netdev egress hook) of tests/call_health.rs
fi
if ! command -v faketime >/dev/null 2>&1; then
  missing+=(faketime)    # a skewed clock for tests/turnctl_check.rs
fi
if ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)    # headless browser of tests/browser_chromium.rs and tests/netns_udp_blocked.rs
fi
if ! command -v firefox-esr >/dev/null 2>&1; then
  missing+=(firefox-esr) # the second browser on the check page (tests/browser_check.rs)
fi
if [ ! -x /usr/sbin/squid ]; then
  missing+=(squid)       # the HTTP proxy of tests/proxy_only.rs and tests/browser_check.rs (run by the tests)
fi
if ! command -v prosody >/dev/null 2>&1; then
  missing+=(prosody)     # the real XMPP server of tests/prosody.rs (Debian: 0.12)
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  missing+=(docker-compose)  # `docker-compose config` on deploy/*/compose.yaml in tests/deploy.rs
fi
if ! command -v pebble >/dev/null 2>&1 || ! command -v pebble-challtestsrv >/dev/null 2>&1; then
  missing+=(pebble)      # the ACME test CA and its DNS of tests/acme.rs
fi
if ! command -v certutil >/dev/null 2>&1; then
  missing+=(libnss3-tools)  # certutil: browsers trusting test CAs (tests/acme.rs, tests/browser_check.rs)
fi
if ! command -v curl >/dev/null 2>&1; then
  missing+=(curl)        # Pebble's root and DNS management in tests/acme.rs
fi
if ! command -v promtool >/dev/null 2>&1; then
  missing+=(prometheus)  # promtool: check and unit-test deploy/prometheus/turnd-rules.yaml (tests/alert_rules.rs)
fi
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
  missing+=(dpkg-dev)    # cargo-deb's automatic Depends (tests/debian_package.rs)
fi
if ! command -v strip >/dev/null 2>&1; then
  missing+=(binutils)    # cargo-deb strips the packaged binaries
fi
if ! command -v setpriv >/dev/null 2>&1; then
  missing+=(util-linux)  # setpriv: run as uid 65532 / the turnd user (deploy and package tests)
fi
if ! command -v clang >/dev/null 2>&1; then
  missing+=(clang)       # compiles the XDP program (bpf/relay.bpf.c) of the `xdp` feature
fi
if [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
  missing+=(libbpf-dev)  # the XDP program's helper headers
fi
if ! command -v ethtool >/dev/null 2>&1; then
  missing+=(ethtool)     # checksum offload off on the veths of tests/xdp.rs
fi
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)  # python3 -m venv below
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # tests/proxy_only.rs runs its own squid in a namespace; the packaged service is not needed.
  if [[ " ${missing[*]} " == *" squid "* ]] && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet squid 2>/dev/null; then
    need_root systemctl disable --now squid >/dev/null 2>&1 || true
  fi
  # The tests start their own prosody on loopback; the packaged service is not needed.
  if [[ " ${missing[*]} " == *" prosody "* ]] && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet prosody 2>/dev/null; then
    need_root systemctl disable --now prosody >/dev/null 2>&1 || true
  fi
  # Only promtool is needed; the package also starts a Prometheus server, and
  # the node exporter it recommends starts too.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    for unit in prometheus prometheus-node-exporter; do
      if systemctl is-active --quiet "$unit" 2>/dev/null; then
        need_root systemctl disable --now "$unit" >/dev/null 2>&1 || true
      fi
    done
  fi
fi

# The XMPP client of tests/prosody.rs (slixmpp) and the YAML parser of
# tests/deploy.rs (PyYAML), from PyPI into .venv (gitignored).
if ! .venv/bin/python3 -c 'import slixmpp, yaml' >/dev/null 2>&1; then
  echo "test.sh: creating .venv with slixmpp and PyYAML"
  python3 -m venv .venv
  .venv/bin/pip install -q 'slixmpp==1.17.0' 'PyYAML==6.0.3'
fi

# cargo-deb builds the Debian package of tests/debian_package.rs
# (deploy/debian/build-deb.sh); about 80 s to compile once per machine.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-deb"
  cargo install -q cargo-deb --locked --version 3.8.0
fi

# Lints first: clippy with warnings denied, including the [lints] table's
# rule that every unsafe block says why it is sound.
cargo clippy --all-targets --locked -- -D warnings

# Two cores: keep test parallelism modest. The output is kept to sum up below.
# turnd runs one shard per CPU by default; the suite then runs again with
# one shard (TURND_TEST_THREADS=1 makes the harness pass --threads 1).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# A failing pass must not end the script here (errexit), or the closing
# count below would never be printed: its status is kept instead.
set +e
cargo test --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The second pass leaves out what does not depend on the shard count or
# repeats the first pass's proof at a browser's pace (browsers, packaging,
# deploy files, alerting rules, prosody); every other test file runs again.
if [ "$status" -eq 0 ]; then
  echo "test.sh: the suite again with one shard per turnd"
  targets=()
  for f in tests/*.rs; do
    name=$(basename "$f" .rs)
    case "$name" in
      browser_chromium|browser_call|browser_upgrade|browser_fleet|call_health|browser_check|netns_udp_blocked|proxy_only|debian_package|deploy|alert_rules|prosody) ;;
      *) targets+=(--test "$name") ;;
    esac
  done
  TURND_TEST_THREADS=1 cargo test --locked --no-fail-fast --lib "${targets[@]}" -- --test-threads=2 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
# The XDP fast path (the cargo feature `xdp`, off by default) builds and
# passes its lints with the feature on, then its namespace tests run with it:
# tests/xdp.rs (our clients and coturn's turnutils_uclient through the
# program) and tests/browser_xdp.rs (a Chromium call through it). Without the
# feature both files are empty, so the passes above run none of their tests
# (nor does the second pass need to leave the browser test out): they run
# here, once, one at a time (each builds two namespaces and a turnd, and
# reads the redirect counters of its own veths).
if [ "$status" -eq 0 ]; then
  echo "test.sh: the XDP fast path (--features xdp)"
  cargo clippy --locked --features xdp --lib --bins --test xdp --test browser_xdp -- -D warnings
  status=$?
fi
if [ "$status" -eq 0 ]; then
  cargo test --locked --no-fail-fast --features xdp --test xdp --test browser_xdp -- --test-threads=1 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
set -e
count() { awk -v w="$1" '/^test result:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ "^" w) n += $i } END { print n + 0 }' "$log"; }
passed=$(count passed)
failed=$(count failed)
if [ "$status" -ne 0 ]; then
  echo "cargo test: $passed passed, $failed failed"
  exit "$status"
fi

# Fuzzing: each cargo-fuzz target for a bounded time (FUZZ_SECONDS, default
# 25 s each); fails on a crash. fuzz/run.sh installs cargo-fuzz from crates.io
# when missing and runs it on the stable toolchain (RUSTC_BOOTSTRAP=1).
fuzz/run.sh "${FUZZ_SECONDS:-25}"

# One closing line for the whole suite.
echo "cargo test: $passed passed, $failed failed"
