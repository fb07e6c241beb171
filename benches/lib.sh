# Shared by compare.sh, scale.sh and upgrade.sh: build the binaries, run one server at a
# time, clean up on exit. Source it with $prog set to the script's name and
# $build to 1 (build) or 0 (--no-build).

# Builds turnd and the loadgen bench target (release) unless TURND_BIN and
# LOADGEN_BIN are given.
build_bins() {
  if [ -z "${TURND_BIN:-}" ] || [ -z "${LOADGEN_BIN:-}" ]; then
    [ "$build" = 1 ] || { echo "$prog: --no-build needs TURND_BIN and LOADGEN_BIN" >&2; exit 2; }
    echo "$prog: building turnd and loadgen (release)" >&2
    cargo build --release --bin turnd >&2
    LOADGEN_BIN=${LOADGEN_BIN:-$(cargo build --release --bench loadgen --message-format=json-render-diagnostics |
      python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="loadgen" and m.get("executable"): print(m["executable"])' | tail -1)}
    TURND_BIN=${TURND_BIN:-target/release/turnd}
  fi
  [ -x "$TURND_BIN" ] && [ -x "$LOADGEN_BIN" ] || { echo "$prog: missing binaries: $TURND_BIN $LOADGEN_BIN" >&2; exit 1; }
}

# turnctl (release) unless TURNCTL_BIN is given: upgrade.sh drives the upgrade with it.
build_turnctl() {
  if [ -z "${TURNCTL_BIN:-}" ]; then
    [ "$build" = 1 ] || { echo "$prog: --no-build needs TURNCTL_BIN too" >&2; exit 2; }
    cargo build --release --bin turnctl >&2
    TURNCTL_BIN=target/release/turnctl
  fi
  [ -x "$TURNCTL_BIN" ] || { echo "$prog: missing binary: $TURNCTL_BIN" >&2; exit 1; }
}

# Prints, one word a line, the command prefix that runs a program at nice
# value $1 (nothing when $1 is empty). The value is absolute (renice), so a
# server the generator restarts gets it too, not the generator's plus it.
# With autogroup scheduling (kernel.sched_autogroup_enabled = 1) a nice
# value only ranks a process among those of its own session: a program of
# another session (someone else's build) still gets an equal share of the
# core. So there the program gets a session of its own, whose group is
# given the nice value too. setsid and sh exec, so the pid stays the
# program's (when the caller is not a process group leader, as a script's
# background job is not).
niced() {
  [ -n "${1:-}" ] || return 0
  if [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ]; then
    # shellcheck disable=SC2016
    printf '%s\n' setsid sh -c 'renice -n "$0" -p $$ >/dev/null && echo "$0" >/proc/self/autogroup && exec "$@"' "$1"
  else
    # shellcheck disable=SC2016
    printf '%s\n' sh -c 'renice -n "$0" -p $$ >/dev/null && exec "$@"' "$1"
  fi
}

# The server under test; stop_server ends it (TERM, then KILL after 5 s).
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}

# Whether process $1 runs (exists and is not a zombie: a process that is
# not our child, e.g. the turnd an upgrade started, is reaped by others).
alive_pid() {
  local st
  st=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

# Ends process $1, which need not be our child (TERM, then KILL after 5 s).
kill_pid() {
  [ -n "${1:-}" ] || return 0
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 50); do alive_pid "$1" || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}

# Processes started for a run that are not the script's children (a server
# an upgrade or a restart started): add them with `stray_pids+=(PID)`;
# stop_strays (and the exit cleanup) ends them.
stray_pids=()
stop_strays() {
  local p
  for p in "${stray_pids[@]}"; do kill_pid "$p"; done
  stray_pids=()
}

# A scratch directory removed on exit, with the server stopped first.
make_work() {
  WORK=$(mktemp -d "/tmp/turnd-$1.XXXXXX")
  cleanup() { stop_server; stop_strays; rm -rf "$WORK"; }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

# Sets $out (the markdown table, default target/bench/NAME-DATE.md unless
# --out gave one) and $results (raw JSON lines beside it, emptied).
set_outputs() {
  mkdir -p target/bench
  out=${out:-target/bench/$1-$(date +%Y%m%d-%H%M%S).md}
  results=${out%.md}.jsonl
  : >"$results"
}

# Prints N distinct ports free for both UDP and TCP on address IP, from
# LO-HI (default 10000-19999: below the relay ranges and the kernel's
# ephemeral range, so neither relay sockets nor clients' own ports collide).
free_ports() {
  python3 - "$1" "$2" "${3:-10000}" "${4:-19999}" <<'EOF'
import random, socket, sys
ip, want, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
held, ports = [], []
for p in random.sample(range(lo, hi + 1), min(hi - lo + 1, 2000)):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t = socket.socket()
    try:
        u.bind((ip, p)); t.bind((ip, p))
    except OSError:
        u.close(); t.close(); continue
    held += [u, t]; ports.append(p)
    if len(ports) == want:
        break
print(" ".join(map(str, ports)))
EOF
}

# Waits (5 s at most) until process $1 owns a socket on port $3 (protocol
# $2: -u or -t, as ss takes it): another program on the port would otherwise
# be measured instead.
wait_port_owner() {
  for _ in $(seq 50); do
    if ss -H -lnp "$2" "sport = :$3" 2>/dev/null | grep -q "pid=$1,"; then return 0; fi
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# The processes holding a listening socket on port $2 (protocol $1: -u or -t).
port_owners() {
  ss -H -lnp "$1" "sport = :$2" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
}
