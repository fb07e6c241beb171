#!/usr/bin/env bash
# turnd against coturn, side by side, on loopback. See benches/README.md.
#
#   benches/compare.sh [--quick] [--runs K] [--duration S] [--warmup S]
#                      [--only SCENARIO[,SCENARIO...]] [--servers turnd,coturn,floor,direct]
#                      [--out FILE.md] [--no-build]
#
# Starts each server fresh for every run, pinned to one core (taskset -c
# $SERVER_CPU, default 0), drives it with benches/loadgen/ pinned to the
# other (taskset -c $GEN_CPU, default 1), alternates turnd, coturn (and the
# protocol-free floor relay where it applies) run by run, and prints a
# markdown table of medians and the turnd/coturn ratios. Raw results (one JSON
# object per run) are kept next to the table.
#
# Environment: TURND_BIN, LOADGEN_BIN (skip building them), TURNSERVER
# (coturn's binary, default turnserver), COTURN_ARGS (extra coturn flags),
# LOADGEN_ARGS (extra loadgen flags for every run), TURND_THREADS (turnd's
# shards; default: one per CPU it is pinned to), GSO=0 (plain sendmmsg in
# the generator's UDP sends instead of UDP GSO), SERVER_CPU, GEN_CPU,
# SEARCH_SECS (time bound of each participants search, default 120), NICE
# (nice value for the server and the generator, e.g. -10), RTPRIO (SCHED_FIFO
# priority for both instead, e.g. 10: for a machine where other programs run).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=5 duration=10 warmup=2 only="" servers="turnd,coturn,floor,direct" out="" build=1 quick=0
# The participants searches: time bound per search and the steps' length.
search_secs=${SEARCH_SECS:-120} step_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; runs=1; duration=3; warmup=1; step_args="--step-warmup 0.5 --step-duration 2" ;;
    --runs) runs="$2"; shift ;;
    --duration) duration="$2"; shift ;;
    --warmup) warmup="$2"; shift ;;
    --only) only="$2"; shift ;;
    --servers) servers="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TURNSERVER=${TURNSERVER:-turnserver}
SECRET="bench-secret-$RANDOM$RANDOM"
REALM=bench
PEER_IP=127.0.0.2

for tool in python3 taskset openssl ss; do
  command -v "$tool" >/dev/null || { echo "compare.sh: needs $tool" >&2; exit 1; }
done
if [[ ",$servers," == *,coturn,* ]] && ! command -v "$TURNSERVER" >/dev/null; then
  echo "compare.sh: coturn's turnserver not found (apt-get install coturn), or set TURNSERVER" >&2
  exit 1
fi
ncpu=$(nproc)
if [ "$ncpu" -lt 2 ]; then
  echo "compare.sh: warning: one CPU only; server and generator share it" >&2
  SERVER_CPU=0 GEN_CPU=0
fi
# How the server and the generator are started: pinned, and with NICE set
# (e.g. NICE=-10, needs root) at a higher priority than other programs on
# a shared machine, so that they wait less for their cores.
on_server_cpu=(taskset -c "$SERVER_CPU")
on_gen_cpu=(taskset -c "$GEN_CPU")
if [ -n "${NICE:-}" ]; then
  on_server_cpu+=(nice -n "$NICE")
  on_gen_cpu+=(nice -n "$NICE")
fi
# RTPRIO=N (root): SCHED_FIFO priority N instead, so that a wake-up runs at
# once rather than after another program's time slice. Both only block in
# epoll, and the kernel keeps 5% of each core for others (sched_rt_runtime_us).
if [ -n "${RTPRIO:-}" ]; then
  on_server_cpu+=(chrt -f "$RTPRIO")
  on_gen_cpu+=(chrt -f "$RTPRIO")
fi

# --- build ---
prog=compare.sh
. benches/lib.sh
build_bins
make_work compare

set_outputs compare

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null

# Starts server $1 for transport $2 (udp, tcp, tls); sets server_pid and target.
start_server() {
  local which=$1 transport=$2 port tport mport dir
  read -r port tport mport <<<"$(free_ports 127.0.0.1 3)"
  dir="$WORK/$which-$port"
  mkdir -p "$dir"
  case "$which" in
    turnd)
      cat >"$dir/turnd.toml" <<EOF
realm = "$REALM"
# Shards: one per CPU turnd may run on, so pinned to one core (as coturn is)
# it runs one. TURND_THREADS sets the number (benches/shards.sh).
threads = "${TURND_THREADS:-auto}"
[auth]
secrets = ["$SECRET"]
[[listen]]
transport = "udp"
address = "127.0.0.1:$port"
[[listen]]
transport = "tcp"
address = "127.0.0.1:$port"
[[listen]]
transport = "tls"
address = "127.0.0.1:$tport"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[relay]
ip = "127.0.0.1"
ports = "20000-29999"
[peers]
allow = ["127.0.0.0/8"]
[limits]
# Every generated client comes from 127.0.0.1: no per-source limit on 401s.
unauth_rate = 0
# ... and all connections come from it: no per-IP connection limit (coturn
# has none by default).
max_connections_per_ip = 0
# A saturating client sends far more than a call: no bandwidth cap (coturn
# has none by default either).
allocation_bandwidth = 0
[metrics]
listen = "127.0.0.1:$mport"
[admin]
token_file = "$dir/admin-token"
[log]
level = "warn"
EOF
      "${on_server_cpu[@]}" "$TURND_BIN" --config "$dir/turnd.toml" >"$dir/log" 2>&1 &
      server_pid=$!
      ;;
    coturn)
      local tlsargs=(--no-tls)
      if [ "$transport" = tls ]; then
        tlsargs=(--tls-listening-port="$tport" --cert="$WORK/cert.pem" --pkey="$WORK/key.pem")
      fi
      # shellcheck disable=SC2086
      "${on_server_cpu[@]}" "$TURNSERVER" -n --listening-ip=127.0.0.1 --listening-port="$port" \
        "${tlsargs[@]}" --no-dtls --relay-ip=127.0.0.1 --min-port=30000 --max-port=32767 \
        --use-auth-secret --static-auth-secret="$SECRET" --realm="$REALM" --allow-loopback-peers \
        --no-cli --log-file="$dir/log" --simple-log --pidfile="$dir/turnserver.pid" ${COTURN_ARGS:-} \
        >/dev/null 2>&1 &
      server_pid=$!
      ;;
    direct)
      # No server: the generator's clients talk to its echo peer directly.
      server_pid=""
      return 0
      ;;
    floor)
      floor_peer_port=$(free_ports "$PEER_IP" 1)
      "${on_server_cpu[@]}" "$LOADGEN_BIN" --floor-relay "127.0.0.1:$port" \
        --floor-peer "$PEER_IP:$floor_peer_port" --floor-max-secs 600 >"$dir/log" 2>&1 &
      server_pid=$!
      ;;
  esac
  if [ "$transport" = tls ]; then target_port=$tport; else target_port=$port; fi
  # Make sure the port is ours (another program on it would be measured instead).
  local proto=-u
  [ "$transport" = udp ] || proto=-t
  for _ in $(seq 50); do
    if ss -H -lnp $proto "sport = :$target_port" 2>/dev/null | grep -q "pid=$server_pid,"; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "compare.sh: $which did not start listening on $transport port $target_port (log: $(tail -3 "$dir/log" 2>/dev/null))" >&2
  stop_server
  return 1
}

# scenario name | transport | loadgen arguments | servers it applies to
# UDP runs use GSO in the generator (cheaper for it; servers still receive
# one datagram per message), unless GSO=0.
gso=--gso
[ "${GSO:-1}" = 0 ] && gso=""
# RATE@half and RATE@80 stand for 50% and 80% of turnd's saturation rate in
# this run (the median offered msgs/s of udp-chan-sat for turnd, which runs
# first), or RATE when that is missing. "direct" is no server at all: the
# generator's own round trip, which the latency a relay adds is measured against.
SCENARIOS=(
  "udp-chan-sat|udp|--clients 50 --rate 0 $gso|turnd,coturn,floor"
  "udp-chan-125k|udp|--clients 10 --rate 125000 $gso|turnd,coturn,floor,direct"
  "udp-chan-half|udp|--clients 50 --rate 160000@half $gso|turnd,coturn,floor,direct"
  "udp-chan-80pct|udp|--clients 50 --rate 250000@80 $gso|turnd,coturn,floor,direct"
  "udp-ind-sat|udp|--clients 50 --rate 0 --indications --fingerprint $gso|turnd,coturn"
  "tcp-chan-10k|tcp|--clients 10 --rate 10000 --tcp|turnd,coturn"
  "tls-chan-10k|tls|--clients 10 --rate 10000 --tls|turnd,coturn"
  # Video participants (loadgen/participants.rs): the largest N one core
  # carries with at most 0.5% loss and a p99 round trip of 20 ms (a bounded
  # search of short steps), then CPU per relayed packet at N = 50 and 100.
  "tls-participants|tls|--tls --participants-search|turnd,coturn"
  "tcp-participants|tcp|--tcp --participants-search|turnd,coturn"
  "udp-participants|udp|--participants-search $gso|turnd,coturn"
  "tls-participants-50|tls|--tls --participants 50|turnd,coturn"
  "tls-participants-100|tls|--tls --participants 100|turnd,coturn"
  "tcp-participants-50|tcp|--tcp --participants 50|turnd,coturn"
  "tcp-participants-100|tcp|--tcp --participants 100|turnd,coturn"
  "udp-participants-50|udp|--participants 50 $gso|turnd,coturn"
  "udp-participants-100|udp|--participants 100 $gso|turnd,coturn"
)

# Replaces RATE@half / RATE@80 in loadgen arguments (see above).
resolve_rate() {
  python3 - "$results" "$1" <<'EOF2'
import json, re, statistics, sys
path, args = sys.argv[1], sys.argv[2]
m = re.search(r"--rate (\d+)@(half|80)", args)
if m:
    sat = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("label", "").startswith("udp-chan-sat:turnd:") and r.get("offered_mps"):
            sat.append(r["offered_mps"])
    rate = int(m.group(1))
    if sat:
        rate = int(statistics.median(sat) * (0.5 if m.group(2) == "half" else 0.8))
    args = args[:m.start()] + f"--rate {rate}" + args[m.end():]
print(args)
EOF2
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "compare.sh: $runs run(s) of ${duration}s after ${warmup}s warm-up per server and scenario; server on CPU $SERVER_CPU, loadgen on CPU $GEN_CPU" >&2
for sc in "${SCENARIOS[@]}"; do
  IFS='|' read -r name transport lgargs applies <<<"$sc"
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
  for run in $(seq "$runs"); do
    for which in ${applies//,/ }; do
      [[ ",$servers," == *",$which,"* ]] || continue
      label="$name:$which:$run"
      echo "compare.sh: $label" >&2
      if ! start_server "$which" "$transport" && ! start_server "$which" "$transport"; then
        echo "{\"label\":\"$label\",\"error\":\"server did not start\"}" >>"$results"
        continue
      fi
      extra=(--secret "$SECRET" --peer-ip "$PEER_IP" --server-pid "$server_pid")
      lg=$(resolve_rate "$lgargs")
      if [ "$which" = floor ]; then
        extra=(--raw --peer-ip "$PEER_IP" --peer-port "$floor_peer_port" --server-pid "$server_pid")
      elif [ "$which" = direct ]; then
        extra=(--direct --peer-ip "$PEER_IP")
      fi
      limit=$((warmup + duration + 60))
      if [[ "$lg" == *--participants-search* ]]; then
        # A search is bounded by its own --search-secs (and step count).
        limit=$((search_secs + 90))
        lg="$lg --search-secs $search_secs $step_args"
      fi
      # shellcheck disable=SC2086
      if line=$(timeout "$limit" "${on_gen_cpu[@]}" "$LOADGEN_BIN" \
          --server "127.0.0.1:${target_port:-9}" --duration "$duration" \
          --warmup "$warmup" --json --label "$label" "${extra[@]}" $lg ${LOADGEN_ARGS:-} 2>"$WORK/loadgen.err"); then
        echo "$line" >>"$results"
      else
        # (the participants search prints a line per step before its error)
        err=$(grep -v '^loadgen: participants [0-9]*: ' "$WORK/loadgen.err" | tr -d '"\\' | tr '\n' ' ' | cut -c1-300)
        echo "compare.sh: $label failed: $err" >&2
        echo "{\"label\":\"$label\",\"error\":\"$err\"}" >>"$results"
      fi
      stop_server
    done
  done
done

meta="$(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x$ncpu, turnd $(git describe --always --dirty 2>/dev/null || echo '?'), coturn $("$TURNSERVER" --version 2>/dev/null | head -1 || echo '?'), $runs run(s) of ${duration}s after ${warmup}s warm-up${NICE:+, server and generator at nice $NICE}${RTPRIO:+, server and generator at SCHED_FIFO priority $RTPRIO}, load average $load_start at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end"
python3 benches/compare_table.py "$results" "$meta" | tee "$out"
echo "compare.sh: table in $out, raw results in $results" >&2
