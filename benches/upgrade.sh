#!/usr/bin/env bash
# An upgrade in place under load, against the same load without one, and
# against coturn restarted under it. See benches/README.md.
#
#   benches/upgrade.sh [--quick] [--runs K] [--duration S] [--warmup S]
#                      [--clients N] [--relayed PKTS] [--size B]
#                      [--only turnd-steady,turnd-upgrade,coturn-restart]
#                      [--out FILE.md] [--no-build]
#
# N UDP clients (default 200), each with an allocation and a channel to the
# generator's echo peer, send paced ChannelData so that the relay forwards
# --relayed packets a second in all (default 100,000: half client to peer,
# half the echoes peer to client). --duration S seconds (default 5) after a
# --warmup (1 s); S/2 into it the generator runs:
#   turnd-steady    nothing (the baseline: gaps from pacing and scheduling)
#   turnd-upgrade   turnctl upgrade --binary <a copy of the release turnd>
#   coturn-restart  a restart of coturn (stop, wait until it has gone, start)
# and counts every datagram each way per flow (loss, duplicates, each flow's
# longest gap), the time until the command returned and until an Allocate
# was first answered by the new process. K runs (default 3) of each, in
# turn; prints a markdown table (medians, min-max) and writes it to
# target/bench/upgrade-DATE.md, the raw results (JSON lines) beside it.
#
# Environment: TURND_BIN, TURNCTL_BIN, LOADGEN_BIN (skip building them),
# TURNSERVER (coturn's binary), COTURN_ARGS, LOADGEN_ARGS, SERVER_CPU
# (default 0), GEN_CPU (default 1), NICE (nice value for server and
# generator, each in a session of its own whose scheduling group gets it
# too: on a machine where others' builds run), GSO=0 (no UDP GSO in the
# generator).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 duration=5 warmup=1 clients=200 relayed=100000 size=1200 out="" build=1
only="turnd-steady,turnd-upgrade,coturn-restart"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=1; duration=3; warmup=0.5 ;;
    --runs) runs="$2"; shift ;;
    --duration) duration="$2"; shift ;;
    --warmup) warmup="$2"; shift ;;
    --clients) clients="$2"; shift ;;
    --relayed) relayed="$2"; shift ;;
    --size) size="$2"; shift ;;
    --only) only="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "upgrade.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
TURNSERVER=${TURNSERVER:-turnserver}
SECRET="bench-secret-$RANDOM$RANDOM"
REALM=bench
PEER_IP=127.0.0.2
# What the configuration of each turnd process answers with (SOFTWARE): the
# configuration is changed before the upgrade, and only the new process
# reads it, so the probe knows who answered.
SOFTWARE_OLD=turnd-bench-old
SOFTWARE_NEW=turnd-bench-new
# The generator offers messages; each is relayed twice (to the peer, and its echo back).
rate=$((relayed / 2))
exec_at=$(python3 -c "print($duration / 2)")

for tool in python3 taskset openssl ss; do
  command -v "$tool" >/dev/null || { echo "upgrade.sh: needs $tool" >&2; exit 1; }
done
if [[ ",$only," == *,coturn-restart,* ]] && ! command -v "$TURNSERVER" >/dev/null; then
  echo "upgrade.sh: coturn's turnserver not found (apt-get install coturn), or set TURNSERVER, or --only turnd-steady,turnd-upgrade" >&2
  exit 1
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "upgrade.sh: warning: one CPU only; server and generator share it" >&2
  SERVER_CPU=0 GEN_CPU=0
fi
prog=upgrade.sh
. benches/lib.sh
# NICE (e.g. -10, root) for the server and the generator: see niced in
# lib.sh. The process an upgrade starts inherits it, and coturn's restart
# starts the new coturn with it.
mapfile -t niced_prefix < <(niced "${NICE:-}")
on_server_cpu=("${niced_prefix[@]}" taskset -c "$SERVER_CPU")
on_gen_cpu=("${niced_prefix[@]}" taskset -c "$GEN_CPU")
build_bins
build_turnctl
make_work upgrade
set_outputs upgrade

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost 2>/dev/null
# The binary the upgrade starts: a copy, as a package upgrade puts a new file in
# place (turnd only starts one that no other user may write).
cp "$TURND_BIN" "$WORK/turnd-next"
chmod 0755 "$WORK/turnd-next"

# Starts turnd (UDP, TCP and TLS listeners, as deployed); sets server_pid,
# port, mport, dir.
start_turnd() {
  local tport
  read -r port tport mport <<<"$(free_ports 127.0.0.1 3)"
  dir="$WORK/turnd-$port"
  mkdir -p "$dir"
  cat >"$dir/turnd.toml" <<EOF
realm = "$REALM"
software = "$SOFTWARE_OLD"
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
# All clients come from 127.0.0.1: no per-source limits, no per-user quota,
# no bandwidth cap (coturn has none by default either).
unauth_rate = 0
user_quota = 0
max_connections_per_ip = 0
allocation_bandwidth = 0
[metrics]
listen = "127.0.0.1:$mport"
[admin]
token_file = "$dir/admin-token"
[log]
level = "info"
EOF
  "${on_server_cpu[@]}" "$TURND_BIN" --config "$dir/turnd.toml" >"$dir/log" 2>&1 &
  server_pid=$!
  wait_port_owner "$server_pid" -u "$port"
}

# Starts coturn as compare.sh does (UDP and TCP, no TLS); sets server_pid,
# port, dir, and writes $dir/restart.sh: what an operator's restart does.
start_coturn() {
  read -r port <<<"$(free_ports 127.0.0.1 1)"
  dir="$WORK/coturn-$port"
  mkdir -p "$dir"
  cat >"$dir/start.sh" <<EOF
#!/bin/sh
exec $(printf '%q ' "${on_server_cpu[@]}") "$TURNSERVER" -n --listening-ip=127.0.0.1 --listening-port=$port \\
  --no-tls --no-dtls --relay-ip=127.0.0.1 --min-port=30000 --max-port=32767 \\
  --use-auth-secret --static-auth-secret=$SECRET --realm=$REALM --allow-loopback-peers \\
  --no-cli --log-file=$dir/log --simple-log --pidfile=$dir/turnserver.pid ${COTURN_ARGS:-}
EOF
  cat >"$dir/restart.sh" <<'EOF'
#!/bin/sh
# Stop the running coturn, wait until it has gone (1 s at most, then KILL),
# start it again (in the background, its pid in new.pid).
dir=$(dirname "$0")
old=$(cat "$dir/pid")
gone() {
  st=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$old/status" 2>/dev/null)
  [ -z "$st" ] || [ "$st" = Z ]
}
kill "$old" 2>/dev/null
i=0
while ! gone && [ $i -lt 100 ]; do sleep 0.01; i=$((i + 1)); done
gone || kill -9 "$old" 2>/dev/null
"$dir/start.sh" >/dev/null 2>&1 </dev/null &
echo $! >"$dir/new.pid"
EOF
  chmod +x "$dir/start.sh" "$dir/restart.sh"
  "$dir/start.sh" >/dev/null 2>&1 </dev/null &
  server_pid=$!
  echo "$server_pid" >"$dir/pid"
  wait_port_owner "$server_pid" -u "$port"
}

# After a run: every server process of this run still on the port (the one
# an upgrade or a restart started is not our child; its command line names
# the run's directory) is ended by its pid.
reap_port() {
  local p
  for p in $(port_owners -u "$port"); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF "$dir/"; then stray_pids+=("$p"); fi
  done
  if [ -f "$dir/new.pid" ]; then stray_pids+=("$(cat "$dir/new.pid")"); fi
  stop_strays
  stop_server
  port=""
}

# Interrupted mid-run: the server of that run too, whoever started it.
cleanup() {
  if [ -n "${port:-}" ]; then reap_port; fi
  stop_server
  stop_strays
  rm -rf "$WORK"
}

gso=--gso
[ "${GSO:-1}" = 0 ] && gso=""
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "upgrade.sh: $runs run(s) of ${duration}s after ${warmup}s warm-up; $clients UDP clients, $relayed relayed pkts/s ($rate msgs/s each way), the command at ${exec_at}s; server on CPU $SERVER_CPU, loadgen on CPU $GEN_CPU" >&2
for run in $(seq "$runs"); do
  for scenario in turnd-steady turnd-upgrade coturn-restart; do
    [[ ",$only," == *",$scenario,"* ]] || continue
    label="$scenario:$run"
    echo "upgrade.sh: $label" >&2
    cmd=()
    case "$scenario" in
      turnd-*)
        if ! start_turnd; then
          echo "upgrade.sh: $label: turnd did not start (log: $(tail -3 "$dir/log"))" >&2
          echo "{\"label\":\"$label\",\"error\":\"server did not start\"}" >>"$results"
          reap_port
          continue
        fi
        if [ "$scenario" = turnd-upgrade ]; then
          # Only the process the upgrade starts reads this.
          sed -i "s/^software = .*/software = \"$SOFTWARE_NEW\"/" "$dir/turnd.toml"
          cmd=(--exec-at "$exec_at" --probe-software "$SOFTWARE_NEW" -- "$TURNCTL_BIN" upgrade
            --admin "127.0.0.1:$mport" --token-file "$dir/admin-token" --binary "$WORK/turnd-next")
        fi
        ;;
      coturn-*)
        if ! start_coturn; then
          echo "upgrade.sh: $label: coturn did not start" >&2
          echo "{\"label\":\"$label\",\"error\":\"server did not start\"}" >>"$results"
          reap_port
          continue
        fi
        cmd=(--exec-at "$exec_at" -- "$dir/restart.sh")
        ;;
    esac
    limit=$(python3 -c "print(int($warmup + $duration + 90))")
    # shellcheck disable=SC2086
    if line=$(timeout "$limit" "${on_gen_cpu[@]}" "$LOADGEN_BIN" --server "127.0.0.1:$port" \
        --secret "$SECRET" --peer-ip "$PEER_IP" --server-pid "$server_pid" --clients "$clients" \
        --rate "$rate" --size "$size" --duration "$duration" --warmup "$warmup" $gso --flows \
        --json --label "$label" ${LOADGEN_ARGS:-} "${cmd[@]}" 2>"$WORK/loadgen.err"); then
      echo "$line" >>"$results"
    else
      err=$(tr -d '"\\' <"$WORK/loadgen.err" | tr '\n' ' ' | cut -c1-300)
      echo "upgrade.sh: $label failed: $err" >&2
      echo "{\"label\":\"$label\",\"error\":\"$err\"}" >>"$results"
    fi
    if [ "$scenario" = turnd-upgrade ] && ! grep -q "took over from the previous process" "$dir/log"; then
      echo "upgrade.sh: $label: no new process took over (log: $(grep -i upgrade "$dir/log" | tail -3))" >&2
    fi
    reap_port
  done
done

meta="$(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x$(nproc), turnd $(git describe --always --dirty 2>/dev/null || echo '?'), coturn $("$TURNSERVER" --version 2>/dev/null | head -1 || echo '?'); $runs run(s) of ${duration}s after ${warmup}s warm-up, $clients UDP clients with a channel each, ${size}-byte payloads, $rate msgs/s offered = $relayed relayed pkts/s (client to peer plus the echoes back), the command ${exec_at}s into the window; server on CPU $SERVER_CPU, generator on CPU $GEN_CPU${NICE:+, both at nice $NICE (each in a session whose scheduling group has it too)}; load average $load_start at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end"
python3 benches/upgrade_table.py "$results" "$meta" | tee "$out"
echo "upgrade.sh: table in $out, raw results in $results" >&2
