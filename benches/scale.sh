#!/usr/bin/env bash
# The scale targets on loopback: N allocations held at once, the
# authenticated setup rate, and the server's RSS and descriptors per
# allocation; turnd, then coturn for comparison. See benches/README.md.
#
#   benches/scale.sh [N] [--servers turnd,coturn] [--out FILE.md] [--no-build]
#
# N defaults to 50000. Each server is started fresh, pinned to one core
# (taskset -c $SERVER_CPU, default 0), with its relay port range the full
# 1024-65535 on 127.0.0.1 and its listener below 1024 (root) so the two do
# not overlap; `loadgen --scale N` runs pinned to the other core ($GEN_CPU,
# default 1) with its client sockets on 127.0.0.10-127.0.0.50. Both get
# `ulimit -n` raised to the hard limit (one descriptor per relay socket and
# per client socket; the generator spreads its sockets over processes).
#
# Environment: TURND_BIN, LOADGEN_BIN (skip building), TURNSERVER (coturn's
# binary), PORTS (relay range, default 1024-65535), LOG_LEVEL (turnd's
# log.level, default warn; info logs every allocation), SCALE_ARGS (extra
# loadgen flags, e.g. "--scale-steps allocate" or "--scale-window 4096"),
# COTURN_ARGS (extra coturn flags), SERVER_CPU, GEN_CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

n=50000 servers="turnd,coturn" out="" build=1
while [ $# -gt 0 ]; do
  case "$1" in
    [0-9]*) n="$1" ;;
    --servers) servers="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "scale.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TURNSERVER=${TURNSERVER:-turnserver}
LOG_LEVEL=${LOG_LEVEL:-warn}
SECRET="scale-secret-$RANDOM$RANDOM"
REALM=bench
PEER_IP=127.0.0.2
quota=$((n + 1000))

for tool in python3 taskset ss timeout; do
  command -v "$tool" >/dev/null || { echo "scale.sh: needs $tool" >&2; exit 1; }
done
if [ "$(nproc)" -lt 2 ]; then
  echo "scale.sh: warning: one CPU only; server and generator share it" >&2
  SERVER_CPU=0 GEN_CPU=0
fi
if [[ ",$servers," == *,coturn,* ]] && ! command -v "$TURNSERVER" >/dev/null; then
  echo "scale.sh: coturn's turnserver not found; running turnd only" >&2
  servers=${servers//coturn/}
fi

# The listener must sit outside the relay range: below 1024 needs root.
if [ "$(id -u)" = 0 ]; then
  PORTS=${PORTS:-1024-65535} listen_lo=900 listen_hi=1023
else
  PORTS=${PORTS:-2000-65535} listen_lo=1100 listen_hi=1999
fi
min_port=${PORTS%-*} max_port=${PORTS#*-}

# One descriptor per relay socket: raise the limit as far as we may (root with
# CAP_SYS_RESOURCE may also raise the hard limit; otherwise this fails quietly).
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt $((n + 1024)) ]; then
  ulimit -Hn $((n + 1024)) 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)"
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt $((n + 100)) ]; then
  echo "scale.sh: warning: RLIMIT_NOFILE is $hard here (hard limit, not raisable without CAP_SYS_RESOURCE):" >&2
  echo "scale.sh:   one server process can hold at most about $((hard - 64)) relay sockets (turnd keeps 48 descriptors spare), so not all $n allocations" >&2
  echo "scale.sh:   (the generator spreads its own sockets over several processes and is not limited)" >&2
fi

# --- build ---
prog=scale.sh
. benches/lib.sh
build_bins
make_work scale

set_outputs scale

# Starts server $1; sets server_pid, port and dir.
start_server() {
  local which=$1 mport
  read -r port mport <<<"$(free_ports 127.0.0.1 2 "$listen_lo" "$listen_hi")"
  dir="$WORK/$which-$port"
  mkdir -p "$dir"
  case "$which" in
    turnd)
      cat >"$dir/turnd.toml" <<EOF
realm = "$REALM"
[auth]
secrets = ["$SECRET"]
[[listen]]
transport = "udp"
address = "127.0.0.1:$port"
[relay]
ip = "127.0.0.1"
ports = "$PORTS"
[peers]
allow = ["127.0.0.0/8"]
[limits]
total_quota = $quota
user_quota = 0
unauth_rate = 0
allocation_bandwidth = 0
[metrics]
listen = "127.0.0.1:$mport"
[admin]
token_file = "$dir/admin-token"
[log]
level = "$LOG_LEVEL"
EOF
      taskset -c "$SERVER_CPU" "$TURND_BIN" --config "$dir/turnd.toml" >"$dir/log" 2>&1 &
      server_pid=$!
      ;;
    coturn)
      # shellcheck disable=SC2086
      taskset -c "$SERVER_CPU" "$TURNSERVER" -n --listening-ip=127.0.0.1 --listening-port="$port" \
        --no-tls --no-dtls --no-tcp --relay-ip=127.0.0.1 --min-port="$min_port" --max-port="$max_port" \
        --use-auth-secret --static-auth-secret="$SECRET" --realm="$REALM" --allow-loopback-peers \
        --total-quota="$quota" --user-quota=0 --no-cli --log-file="$dir/log" --simple-log \
        --pidfile="$dir/turnserver.pid" ${COTURN_ARGS:-} >/dev/null 2>&1 &
      server_pid=$!
      ;;
  esac
  for _ in $(seq 50); do
    if ss -H -lnpu "sport = :$port" 2>/dev/null | grep -q "pid=$server_pid,"; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "scale.sh: $which did not start listening on UDP port $port (log: $(tail -3 "$dir/log" 2>/dev/null))" >&2
  stop_server
  return 1
}

echo "scale.sh: N=$n, relay ports $PORTS, RLIMIT_NOFILE $(ulimit -n)/$hard, server on CPU $SERVER_CPU, loadgen on CPU $GEN_CPU" >&2
for which in ${servers//,/ }; do
  [ -n "$which" ] || continue
  echo "scale.sh: $which" >&2
  if ! start_server "$which"; then
    echo "{\"label\":\"$which\",\"error\":\"server did not start\"}" >>"$results"
    continue
  fi
  # Bounded: each loadgen phase stops itself after --scale-timeout (120 s).
  # shellcheck disable=SC2086
  if timeout 900 taskset -c "$GEN_CPU" "$LOADGEN_BIN" --scale "$n" --server "127.0.0.1:$port" \
      --secret "$SECRET" --server-pid "$server_pid" --peer-ip "$PEER_IP" --scale-data \
      --label "$which" --scale-json "$WORK/$which.json" ${SCALE_ARGS:-}; then
    cat "$WORK/$which.json" >>"$results"
  else
    echo "scale.sh: $which: loadgen failed" >&2
    echo "{\"label\":\"$which\",\"error\":\"loadgen failed\"}" >>"$results"
  fi
  if [ "$which" = turnd ] && grep -q "cannot open a relay socket" "$dir/log"; then
    echo "scale.sh: turnd could not open some relay sockets: $(grep -c 'cannot open a relay socket' "$dir/log") times, e.g.: $(grep -m1 'cannot open a relay socket' "$dir/log" | cut -c1-200)" >&2
  fi
  stop_server
done

meta="$(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x$(nproc), turnd $(git describe --always --dirty 2>/dev/null || echo '?'), coturn $("$TURNSERVER" --version 2>/dev/null | head -1 || echo '-'), N=$n, relay ports $PORTS, RLIMIT_NOFILE $hard"
python3 - "$results" "$meta" <<'EOF' | tee "$out"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"Scale: {sys.argv[2]}\n")
def g(r, *path):
    for p in path:
        if r is None: return None
        r = r.get(p)
    return r
def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)
lines = [
    ("allocations asked", lambda r: f(r.get("asked"))),
    ("allocations held", lambda r: f(r.get("held_allocations"))),
    ("failures", lambda r: (f(g(r, "setup", "failures")) + (" (" + ", ".join(f"{k} x{v}" for k, v in g(r, "setup", "failed").items()) + ")" if g(r, "setup", "failed") else ""))),
    ("full setups/s", lambda r: f(g(r, "setup", "setups_per_s"))),
    ("allocations/s", lambda r: f(g(r, "setup", "allocations_per_s"))),
    ("setup time s", lambda r: f(g(r, "setup", "secs"), "{:.2f}")),
    ("setup latency p50 / p99 ms", lambda r: f(g(r, "setup", "latency_ms", "p50"), "{:.1f}") + " / " + f(g(r, "setup", "latency_ms", "p99"), "{:.1f}")),
    ("retransmits", lambda r: f(g(r, "setup", "retransmits"))),
    ("server CPU µs per setup", lambda r: f(g(r, "setup", "server_cpu_us_per_setup"), "{:.1f}")),
    ("server CPU % during setup", lambda r: f(g(r, "setup", "server_cpu_pct"))),
    ("loadgen CPU % during setup", lambda r: f(g(r, "setup", "loadgen_cpu_pct"))),
    ("server RSS before MB", lambda r: f(None if g(r, "server_before") is None else g(r, "server_before", "rss_kb") / 1024, "{:.1f}")),
    ("server RSS held MB", lambda r: f(r.get("rss_held_mb"), "{:.1f}")),
    ("RSS per allocation B", lambda r: f(r.get("rss_per_allocation_bytes"))),
    ("server VmHWM MB", lambda r: f(None if g(r, "server_held") is None else g(r, "server_held", "hwm_kb") / 1024, "{:.1f}")),
    ("server fds held", lambda r: f(r.get("fds_held"))),
    ("server threads", lambda r: f(g(r, "server_held", "threads"))),
    ("kernel slab delta MB (system)", lambda r: f(None if r.get("system_slab_delta_kb") is None else r["system_slab_delta_kb"] / 1024, "{:.1f}")),
    ("ChannelData relayed / sent", lambda r: f(g(r, "data", "relayed")) + " / " + f(g(r, "data", "sent"))),
    ("Refresh(0) per s", lambda r: f(g(r, "teardown", "per_s"))),
    ("server RSS after teardown MB", lambda r: f(None if g(r, "server_after_teardown") is None else g(r, "server_after_teardown", "rss_kb") / 1024, "{:.1f}")),
]
labels = [r.get("label", "?") for r in rows]
print("| | " + " | ".join(labels) + " |")
print("|---|" + "---:|" * len(rows))
for name, fn in lines:
    cells = []
    for r in rows:
        cells.append(r["error"] if "error" in r else fn(r))
    print(f"| {name} | " + " | ".join(cells) + " |")
EOF
echo "scale.sh: table in $out, raw results in $results" >&2
