#!/usr/bin/env bash
# turnd with one shard against turnd with two, side by side. See benches/README.md.
#
#   benches/shards.sh [--runs K] [--duration S] [--warmup S] [--no-build]
#
# Alternates, run by run, turnd pinned to CPU 0 (its default is then one
# shard) and turnd on CPUs 0-1 (two shards), with compare.sh's generator:
#   - udp-chan-125k: the same paced load (10 clients, 125k msgs/s) for both;
#     CPU per forwarded packet shows what sharding costs (the generator runs
#     on CPU 1, beside the second shard);
#   - udp-chan-sat: saturation with a GSO generator (cheap for it);
#     forwarded packets/s show what a second core adds.
# Prints a table of medians and the two-shard/one-shard ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 duration=5 warmup=1 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift ;;
    --duration) duration="$2"; shift ;;
    --warmup) warmup="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "shards.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$(nproc)" -ge 2 ] || { echo "shards.sh: needs two CPUs" >&2; exit 1; }

prog=shards.sh
. benches/lib.sh
build_bins
export TURND_BIN LOADGEN_BIN
mkdir -p target/bench
stamp=$(date +%Y%m%d-%H%M%S)
all=target/bench/shards-$stamp.jsonl
: >"$all"
for run in $(seq "$runs"); do
  for cpus in 0 0-1; do
    one=target/bench/shards-$stamp-$run-$cpus.md
    n=1
    [ "$cpus" = 0 ] || n=2
    TURND_THREADS=$n SERVER_CPU=$cpus GEN_CPU=1 benches/compare.sh --no-build --servers turnd --runs 1 \
      --duration "$duration" --warmup "$warmup" --only udp-chan-125k,udp-chan-sat --out "$one" >/dev/null
    sed "s/\"label\":\"\\([^:]*\\):turnd:[0-9]*\"/\"label\":\"\\1\",\"cpus\":\"$cpus\"/" "${one%.md}.jsonl" >>"$all"
    rm -f "$one" "${one%.md}.jsonl"
  done
done

python3 - "$all" <<'EOF'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        continue
    rows.setdefault((r["label"], r["cpus"]), []).append(r)
def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(v) if v else None
print("| scenario | shards | fwd pkts/s | server CPU % | server CPU µs / fwd pkt | loss | runs |")
print("|---|---:|---:|---:|---:|---:|---:|")
for sc in ("udp-chan-125k", "udp-chan-sat"):
    got = {}
    for cpus, n in (("0", 1), ("0-1", 2)):
        rs = rows.get((sc, cpus), [])
        if not rs:
            continue
        fwd, cpu, us, loss = (med(rs, k) for k in ("forwarded_pps", "server_cpu_pct", "server_cpu_us_per_pkt", "loss_pct"))
        got[n] = (fwd, us)
        print(f"| {sc} | {n} | {fwd:,.0f} | {cpu:.0f} | {us:.2f} | {loss:.2f}% | {len(rs)} |")
    if 1 in got and 2 in got:
        print(f"| {sc} | 2 / 1 | {got[2][0] / got[1][0]:.2f}× | | {got[2][1] / got[1][1]:.2f}× | | |")
EOF
echo "shards.sh: raw results in $all" >&2
