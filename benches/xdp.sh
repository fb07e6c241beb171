#!/usr/bin/env bash
# turnd's XDP fast path, turnd's socket path and coturn, side by side on
# veth, at saturation. See benches/README.md ("XDP fast path").
#
#   benches/xdp.sh [--runs K] [--duration S] [--warmup S] [--sizes 100,1200]
#                  [--relays xdp,socket,coturn,direct] [--out FILE.md] [--no-build] [--quick]
#
# One network namespace holds the generator (its clients and its echo
# peer), joined to the host by two veth pairs: the clients' (the relay's
# listen address on the host end) and the peer's (the relay address on the
# host end). The relay runs on the host pinned to CPU 0, the generator in
# the namespace pinned to CPU 1. Relays, each started fresh per run:
#   xdp     turnd with `[xdp] interfaces` = both host ends, native mode
#   socket  the same binary without [xdp]
#   coturn  turnserver with REST secret auth, as compare.sh runs it
#   direct  no relay: the clients send to the echo peer themselves (inside
#           the namespace, over its loopback): the generator's own CPU per
#           packet, which the table subtracts for an estimate of each
#           relay's own part
# For each run, each payload size and each relay in an order that rotates
# run by run (so drift over the session hits all three), 50 UDP clients keep
# 16 ChannelData messages in flight each (saturation).
#
# On veth the receiving end's work (the XDP program included) runs on the
# sending CPU, so the cost figure is the CPU of both cores (user, nice,
# system, irq and softirq from /proc/stat over the timed window) per
# forwarded packet, next to forwarded packets/s.
#
# Needs root, two CPUs, ip, ethtool, taskset, ss, python3, turnserver
# (Debian's coturn) and, to build, clang and libbpf-dev. It builds
#   cargo build --release --features xdp --bin turnd --bench loadgen
# unless --no-build (then TURND_BIN, LOADGEN_BIN and XDP_OBJ, the compiled
# bpf/relay.bpf.o, may be given; by default the newest in target/release).
# Environment: RUNS, DURATION, WARMUP (defaults for the options), SERVER_CPU
# (0), GEN_CPU (1), TURNSERVER, COTURN_ARGS, LOADGEN_ARGS (extra flags),
# NICE (nice value for relay and generator), BPF_STATS=1 (the program's own
# ns per run from kernel.bpf_stats_enabled; it adds two clock reads per
# packet, so the main figures are taken without it).
# Everything it makes (namespace, veths, processes, scratch directory) is
# removed on exit, Ctrl-C included.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-3} duration=${DURATION:-10} warmup=${WARMUP:-2} sizes=100,1200
relays=xdp,socket,coturn,direct out="" build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=1; duration=3; warmup=1 ;;
    --runs) runs="$2"; shift ;;
    --duration) duration="$2"; shift ;;
    --warmup) warmup="$2"; shift ;;
    --sizes) sizes="$2"; shift ;;
    --relays) relays="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "xdp.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TURNSERVER=${TURNSERVER:-turnserver}
SECRET="xdp-bench-$RANDOM$RANDOM"
REALM=bench
PORT=3478

[ "$(id -u)" = 0 ] || { echo "xdp.sh: needs root (namespaces, veths, XDP)" >&2; exit 1; }
for tool in ip ethtool taskset ss python3; do
  command -v "$tool" >/dev/null || { echo "xdp.sh: needs $tool" >&2; exit 1; }
done
if [[ ",$relays," == *,coturn,* ]] && ! command -v "$TURNSERVER" >/dev/null; then
  echo "xdp.sh: coturn's turnserver not found (apt-get install coturn), or set TURNSERVER" >&2
  exit 1
fi
[ "$(nproc)" -ge 2 ] || { echo "xdp.sh: needs two CPUs (relay and generator each pinned to one)" >&2; exit 1; }

# --- build ---
prog=xdp.sh
. benches/lib.sh
# NICE (e.g. -10) for the relay and the generator: see niced in lib.sh.
mapfile -t niced_prefix < <(niced "${NICE:-}")
on_server_cpu=("${niced_prefix[@]}" taskset -c "$SERVER_CPU")
on_gen_cpu=("${niced_prefix[@]}" taskset -c "$GEN_CPU")
if [ "$build" = 1 ]; then
  echo "xdp.sh: building turnd (feature xdp) and loadgen (release)" >&2
  LOADGEN_BIN=$(cargo build --release --features xdp --bin turnd --bench loadgen --message-format=json-render-diagnostics |
    python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="loadgen" and m.get("executable"): print(m["executable"])' | tail -1)
  TURND_BIN=target/release/turnd
fi
TURND_BIN=${TURND_BIN:-target/release/turnd}
LOADGEN_BIN=${LOADGEN_BIN:-$(ls -t target/release/deps/loadgen-* 2>/dev/null | grep -v '\.d$' | head -1)}
XDP_OBJ=${XDP_OBJ:-$(ls -t target/release/build/turnd-*/out/relay.bpf.o 2>/dev/null | head -1)}
[ -x "$TURND_BIN" ] && [ -x "$LOADGEN_BIN" ] && [ -f "$XDP_OBJ" ] ||
  { echo "xdp.sh: missing turnd ($TURND_BIN), loadgen ($LOADGEN_BIN) or the XDP object ($XDP_OBJ): build with --features xdp" >&2; exit 1; }

# --- the rig, removed on exit ---
NS=turnd-xdpb-$$
A=xba$$ B=xbb$$   # host ends: clients' side, peer's side
gen_pid=""
make_work xdp
cleanup() {
  if [ -n "$gen_pid" ]; then kill "$gen_pid" 2>/dev/null || true; wait "$gen_pid" 2>/dev/null || true; fi
  stop_server
  ip link del "$A" 2>/dev/null || true
  ip link del "$B" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  if [ -n "${bpf_stats0:-}" ]; then sysctl -qw "kernel.bpf_stats_enabled=$bpf_stats0" || true; fi
  rm -rf "$WORK"
}
set_outputs xdp

# A /29 of 198.19.128.0/17 (in 198.18.0.0/15, the benchmarking range) no
# interface of the host uses: host ends .1 and .5, namespace ends .2 and .6.
net=""
for _ in $(seq 50); do
  cand="198.19.$((128 + RANDOM % 127)).$((8 * (RANDOM % 32)))"
  if ! ip -4 -o addr show | grep -q " ${cand%.*}\."; then net=$cand; break; fi
done
[ -n "$net" ] || { echo "xdp.sh: no free /29 in 198.19.128.0/17" >&2; exit 1; }
pre=${net%.*} o=${net##*.}
H1=$pre.$((o + 1)) N1=$pre.$((o + 2)) H2=$pre.$((o + 5)) N2=$pre.$((o + 6))

ip netns add "$NS"
ip -n "$NS" link set lo up
ip link add "$A" type veth peer name a0 netns "$NS"
ip link add "$B" type veth peer name b0 netns "$NS"
ip addr add "$H1/30" dev "$A"
ip addr add "$H2/30" dev "$B"
ip -n "$NS" addr add "$N1/30" dev a0
ip -n "$NS" addr add "$N2/30" dev b0
for i in "$A" "$B"; do
  ip link set "$i" up
  # The program's route lookup answers only on a forwarding interface.
  sysctl -qw "net.ipv4.conf.$i.forwarding=1"
done
for i in a0 b0; do
  ip -n "$NS" link set "$i" up
  # Native XDP on veth delivers redirected frames only to an end that runs
  # a program; and a forwarded frame cannot carry a partial checksum, so
  # the generator's ends compute theirs. The same for all three relays.
  ip -n "$NS" link set dev "$i" xdpdrv obj "$XDP_OBJ" program xdp_pass
  ip netns exec "$NS" ethtool -K "$i" tx off >/dev/null
done
if [ "${BPF_STATS:-0}" = 1 ]; then
  bpf_stats0=$(sysctl -n kernel.bpf_stats_enabled)
  sysctl -qw kernel.bpf_stats_enabled=1
fi

# Sum of the ethtool counters matching $2 over the host ends (or, with $1 =
# ns, the namespace's ends).
veth_sum() {
  local where=$1 pat=$2 i
  {
    if [ "$where" = ns ]; then
      for i in a0 b0; do ip netns exec "$NS" ethtool -S "$i"; done
    else
      for i in "$A" "$B"; do ethtool -S "$i"; done
    fi
  } | awk -v p="$pat" '$1 ~ p {s += $2} END {printf "%d", s}'
}
# The XDP program on the clients' host end: "run_cnt run_time_ns" (BPF_STATS=1).
bpf_prog_stats() {
  local id
  id=$(ip -d link show dev "$A" | awk '/prog\/xdp id/ {for (i = 1; i < NF; i++) if ($i == "id") {print $(i + 1); exit}}')
  [ -n "$id" ] || { echo "0 0"; return; }
  bpftool prog show id "$id" 2>/dev/null | awk '{for (i = 1; i < NF; i++) {if ($i == "run_time_ns") t = $(i + 1); if ($i == "run_cnt") c = $(i + 1)}} END {printf "%d %d", c, t}'
}

# Starts relay $1 on the host; sets server_pid. Ready when it owns its UDP
# port (ss) and, in the generator, answers a STUN Binding (--ready-timeout).
start_relay() {
  local which=$1 dir="$WORK/$1-$2"
  mkdir -p "$dir"
  case "$which" in
    xdp|socket)
      cat >"$dir/turnd.toml" <<EOF
realm = "$REALM"
threads = 1
[auth]
secrets = ["$SECRET"]
[[listen]]
transport = "udp"
address = "$H1:$PORT"
[relay]
ip = "$H2"
ports = "40000-49999"
[peers]
allow = ["$N2/32"]
[limits]
# All clients come from one address; no bandwidth caps (with a cap,
# channels stay on the socket path), as coturn has none by default.
unauth_rate = 0
allocation_bandwidth = 0
total_bandwidth = 0
[metrics]
listen = ""
[log]
level = "warn"
EOF
      if [ "$which" = xdp ]; then
        printf '[xdp]\ninterfaces = ["%s", "%s"]\nmode = "native"\n' "$A" "$B" >>"$dir/turnd.toml"
      fi
      "${on_server_cpu[@]}" "$TURND_BIN" --config "$dir/turnd.toml" >"$dir/log" 2>&1 &
      server_pid=$!
      ;;
    coturn)
      # As compare.sh: REST secret auth, no TLS/DTLS, one core (its
      # threads share it), its log and pid file in the scratch directory.
      # shellcheck disable=SC2086
      "${on_server_cpu[@]}" "$TURNSERVER" -n --listening-ip="$H1" --listening-port="$PORT" \
        --no-tls --no-dtls --relay-ip="$H2" --min-port=40000 --max-port=49999 \
        --use-auth-secret --static-auth-secret="$SECRET" --realm="$REALM" \
        --no-cli --log-file="$dir/log" --simple-log --pidfile="$dir/turnserver.pid" ${COTURN_ARGS:-} \
        >/dev/null 2>&1 &
      server_pid=$!
      ;;
    direct)
      server_pid=""
      ;;
  esac
  if [ "$which" != direct ] && ! wait_port_owner "$server_pid" -u "$PORT"; then
    echo "xdp.sh: $which did not start listening on $H1:$PORT (log: $(tail -3 "$dir"/log* 2>/dev/null | tr '\n' ' '))" >&2
    stop_server
    return 1
  fi
  # XDP on both host ends for xdp, on neither for the others (a program
  # left behind would relay for them).
  local i
  for i in "$A" "$B"; do
    if [ "$which" = xdp ] && ! ip -d link show dev "$i" | grep -q 'prog/xdp'; then
      echo "xdp.sh: turnd did not attach XDP to $i (log: $(tail -3 "$dir/log" | tr '\n' ' '))" >&2
      stop_server
      return 1
    elif [ "$which" != xdp ] && ip -d link show dev "$i" | grep -q 'prog/xdp'; then
      echo "xdp.sh: an XDP program is still attached to $i" >&2
      stop_server
      return 1
    fi
  done
}

# Busy share of CPUs $SERVER_CPU and $GEN_CPU over 2 s with nothing of ours
# running: what other programs take of them.
background() {
  local a b
  a=$(awk -v c0="cpu$SERVER_CPU" -v c1="cpu$GEN_CPU" '$1 == c0 || $1 == c1 {printf "%d %d ", $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  sleep 2
  b=$(awk -v c0="cpu$SERVER_CPU" -v c1="cpu$GEN_CPU" '$1 == c0 || $1 == c1 {printf "%d %d ", $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
  # shellcheck disable=SC2086
  set -- $a $b
  echo "CPU $SERVER_CPU $(( ($5 - $1) * 100 / ($6 - $2 + 1) ))%, CPU $GEN_CPU $(( ($7 - $3) * 100 / ($8 - $4 + 1) ))%"
}

IFS=, read -r -a relay_list <<<"$relays"
IFS=, read -r -a size_list <<<"$sizes"
nrel=${#relay_list[@]}
bg_start=$(background)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "xdp.sh: $runs run(s) of ${duration}s after ${warmup}s warm-up per relay and size; relay on CPU $SERVER_CPU, generator on CPU $GEN_CPU; veths $A ($H1) and $B ($H2), namespace $NS; other programs' share of the two CPUs: $bg_start" >&2
for run in $(seq "$runs"); do
  for size in "${size_list[@]}"; do
    for k in $(seq 0 $((nrel - 1))); do
      # Rotate the order run by run: run 1 xdp socket coturn, run 2 socket coturn xdp, ...
      which=${relay_list[$(( (k + run - 1) % nrel ))]}
      label="$size:$which:$run"
      echo "xdp.sh: $label" >&2
      if ! start_relay "$which" "$label" && ! start_relay "$which" "$label-retry"; then
        printf '{"label":"%s","relay":"%s","size":%d,"run":%d,"error":"relay did not start"}\n' "$label" "$which" "$size" "$run" >>"$results"
        continue
      fi
      red0=$(veth_sum host 'xdp_redirect:') drops0=$(( $(veth_sum host '_drops:') + $(veth_sum ns '_drops:') ))
      read -r bc0 bt0 <<<"$( [ "${BPF_STATS:-0}" = 1 ] && bpf_prog_stats || echo "0 0")"
      target=(--server "$H1:$PORT" --secret "$SECRET" --peer-ip "$N2" --server-pid "$server_pid")
      [ "$which" = direct ] && target=(--direct --peer-ip "$N2")
      # shellcheck disable=SC2086
      timeout $((warmup + duration + 60)) ip netns exec "$NS" "${on_gen_cpu[@]}" "$LOADGEN_BIN" \
        "${target[@]}" --cpu-stat "$SERVER_CPU,$GEN_CPU" --clients 50 --rate 0 --window 16 --size "$size" \
        --warmup "$warmup" --duration "$duration" --ready-timeout 5 --json --label "$label" ${LOADGEN_ARGS:-} \
        >"$WORK/line" 2>"$WORK/loadgen.err" &
      gen_pid=$!
      rc=0; wait "$gen_pid" || rc=$?
      gen_pid=""
      red1=$(veth_sum host 'xdp_redirect:') drops1=$(( $(veth_sum host '_drops:') + $(veth_sum ns '_drops:') ))
      read -r bc1 bt1 <<<"$( [ "${BPF_STATS:-0}" = 1 ] && bpf_prog_stats || echo "0 0")"
      warn=$(grep -m3 -iE 'warn|error' "$WORK/$which-$label"/log* 2>/dev/null | tr '\n' ' ' | tr -cd '[:print:]' | tr -d '"\\' | cut -c1-300 || true)
      stop_server
      if [ "$rc" != 0 ]; then
        err=$(tr -d '"\\' <"$WORK/loadgen.err" | tr '\n' ' ' | cut -c1-300)
        echo "xdp.sh: $label failed: $err" >&2
        printf '{"label":"%s","relay":"%s","size":%d,"run":%d,"error":"%s"}\n' "$label" "$which" "$size" "$run" "$err" >>"$results"
        continue
      fi
      printf '{"label":"%s","relay":"%s","size":%d,"run":%d,"xdp_redirects":%d,"veth_drops":%d,"bpf_runs":%d,"bpf_run_ns":%d,"relay_log":"%s","gen":%s}\n' \
        "$label" "$which" "$size" "$run" $((red1 - red0)) $((drops1 - drops0)) $((bc1 - bc0)) $((bt1 - bt0)) "$warn" "$(cat "$WORK/line")" >>"$results"
    done
  done
done
bg_end=$(background)

meta="$(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x$(nproc), turnd $(git describe --always --dirty 2>/dev/null || echo '?'), coturn $("$TURNSERVER" --version 2>/dev/null | head -1 || echo '?'), veth, $runs run(s) of ${duration}s after ${warmup}s warm-up per relay and size, relay on CPU $SERVER_CPU and generator on CPU $GEN_CPU${NICE:+ at nice $NICE}${BPF_STATS:+, bpf_stats_enabled=$BPF_STATS}; load average $load_start at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end; other programs' share of the two CPUs over 2 s with nothing of ours running: $bg_start before, $bg_end after"
python3 benches/xdp_table.py "$results" "$meta" "$SERVER_CPU,$GEN_CPU" | tee "$out"
echo "xdp.sh: table in $out, raw results in $results" >&2
