#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need when it
# is missing (Debian's coturn for turnutils_uclient), then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")"

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "test.sh: need root to run: $*" >&2; exit 1; fi
}

if ! command -v turnutils_uclient >/dev/null 2>&1; then
  echo "test.sh: installing coturn (for turnutils_uclient)"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq coturn >/dev/null
fi

# Two cores: keep test parallelism modest.
cargo test --locked -- --test-threads=2
