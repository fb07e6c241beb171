#!/bin/sh
# A rough comparison of turnd's XDP fast path against its socket path on veth
# (feature `xdp`): one namespace holds the generator's clients and its echo
# peer, joined to the host by two veth pairs (client side, peer side); turnd
# runs on the host pinned to CPU 0, the generator in the namespace on CPU 1.
# UDP ChannelData at saturation, one run of DURATION seconds per mode.
#
# On veth the kernel's receive work (and with it the XDP program) runs on the
# sending CPU, the generator's, so the figures that compare are the forwarded
# packets/s and the CPU of both cores per forwarded packet, not turnd's CPU
# alone. Needs root, a release build with --features xdp, clang's object in
# the build directory, ethtool and taskset. Removes what it made on exit.
#
#   cargo build --release --features xdp --bin turnd --bench loadgen
#   benches/xdp.sh [DURATION]            # saturation
#   RATE=50000 benches/xdp.sh [DURATION] # a fixed load: compare the CPU it costs
set -eu
cd "$(dirname "$0")/.."
DUR=${1:-5}
RATE=${RATE:-0}   # messages/s offered in total (each forwarded twice); 0 = saturation
TURND=target/release/turnd
LOADGEN=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
OBJ=$(ls -t target/release/build/turnd-*/out/relay.bpf.o | head -1)
NS=turnd-xdpbench-$$
A=txa$$ B=txb$$
DIR=$(mktemp -d)
SECRET=xdp-bench-secret
cleanup() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true
    ip link del "$A" 2>/dev/null || true
    ip link del "$B" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
STATS=$(sysctl -n kernel.bpf_stats_enabled)
trap 'cleanup; sysctl -qw kernel.bpf_stats_enabled=$STATS' EXIT INT TERM
sysctl -qw kernel.bpf_stats_enabled=1

ip netns add "$NS"
ip -n "$NS" link set lo up
ip link add "$A" type veth peer name a0 netns "$NS"
ip link add "$B" type veth peer name b0 netns "$NS"
ip addr add 198.19.250.1/30 dev "$A"
ip addr add 198.19.250.5/30 dev "$B"
ip -n "$NS" addr add 198.19.250.2/30 dev a0
ip -n "$NS" addr add 198.19.250.6/30 dev b0
for i in "$A" "$B"; do ip link set "$i" up; sysctl -qw "net.ipv4.conf.$i.forwarding=1" "net.ipv6.conf.$i.forwarding=1"; done
for i in a0 b0; do
    ip -n "$NS" link set "$i" up
    ip -n "$NS" link set dev "$i" xdpdrv obj "$OBJ" program xdp_pass
    ip netns exec "$NS" ethtool -K "$i" tx off >/dev/null
done
sleep 1

# Busy and total jiffies of CPU 0 and CPU 1.
busy() { awk '/^cpu[01] /{printf "%d %d ", $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

run() {
    mode=$1
    xdp="" prog=""
    [ "$mode" = xdp ] && xdp="[xdp]
interfaces = [\"$A\", \"$B\"]
mode = \"native\""
    cat >"$DIR/turnd.toml" <<EOF
threads = 1
[auth]
secrets = ["$SECRET"]
[[listen]]
transport = "udp"
address = "198.19.250.1:3478"
[relay]
ip = "198.19.250.5"
ports = "40000-49999"
[peers]
allow = ["198.19.250.6/32"]
[limits]
allocation_bandwidth = 0
total_bandwidth = 0
[metrics]
listen = ""
[log]
level = "warn"
$xdp
EOF
    taskset -c 0 "$TURND" --config "$DIR/turnd.toml" 2>"$DIR/turnd-$mode.log" &
    PID=$!
    sleep 1
    set -- $(busy)
    a0=$1 s0=$2 a1=$3 s1=$4
    ip netns exec "$NS" taskset -c 1 "$LOADGEN" --server 198.19.250.1:3478 --secret "$SECRET" --clients 50 --rate "$RATE" \
        --window 16 --size 1200 --warmup 1 --duration "$DUR" --peer-ip 198.19.250.6 --server-pid "$PID" >"$DIR/gen-$mode.txt"
    if [ "$mode" = xdp ]; then
        # The program's own time per run (kernel.bpf_stats_enabled), the
        # redirect's transmit not included: the one of this turnd (its
        # maps are the newest) is the one that ran most.
        prog=$(bpftool prog show name xdp_relay 2>/dev/null | awk '/run_time_ns/{for(i=1;i<=NF;i++){if($i=="run_time_ns")t=$(i+1);if($i=="run_cnt")c=$(i+1)}; if(c>bc){bc=c;bt=t}} END{if(bc>0)printf "xdp_relay: %d runs, %.0f ns per run\n", bc, bt/bc}')
    fi
    set -- $(busy)
    c0=$(( ($1 - a0) * 100 / ($2 - s0) )) c1=$(( ($3 - a1) * 100 / ($4 - s1) ))
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    echo "== $mode"
    cat "$DIR/gen-$mode.txt"
    grep -i xdp "$DIR/turnd-$mode.log" || true
    [ "$mode" = xdp ] && echo "$prog"
    echo "busy over the run (incl. setup and warm-up): CPU 0 (turnd) $c0%, CPU 1 (generator; veth receive and XDP run here) $c1%"
    ethtool -S "$A" 2>/dev/null | grep -E 'xdp_redirect:' | head -2 || true
}

run socket
run xdp
