#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time; exits non-zero on
# a crash (libFuzzer writes the input to fuzz/artifacts/TARGET/, turn it into
# a regression test in tests/).
#
#   fuzz/run.sh SECONDS [TARGET...]     # default: every target
#
# cargo-fuzz needs nightly-only compiler flags (sanitizer coverage, ASan);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. cargo-fuzz itself is
# installed from crates.io when missing. The corpus grows in fuzz/corpus/TARGET
# (not committed); the committed seeds in fuzz/seeds/TARGET are read too.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
shift
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(codec server health)
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version '^0.13'
fi

for t in "${targets[@]}"; do
  cargo fuzz build "$t"
done

failed=0
passed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="$(mktemp)"
  echo "fuzz/run.sh: $t for ${secs}s"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or blow-up.
  if cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=70000 \
      -print_final_stats=1 >"$log" 2>&1; then
    passed=$((passed + 1))
    grep -E 'DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb' "$log" | sed "s/^/  $t: /"
  else
    failed=$((failed + 1))
    echo "fuzz/run.sh: $t FAILED; the crashing input is in fuzz/artifacts/$t/:" >&2
    grep -E 'panicked|ERROR|SUMMARY|Test unit written|Base64' "$log" | head -n 20 >&2 || true
    tail -n 40 "$log" >&2
  fi
  rm -f "$log"
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
