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
#   benches/xdp.sh [DURATION]
set -eu
cd "$(dirname "$0")/.."
DUR=${1:-5}
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

ip netns add "$NS"
ip -n "$NS" link set lo up
ip link add "$A" type veth peer name a0 netns "$NS"
ip link add "$B" type veth peer name b0 netns "$NS"
ip addr add 198.19.250.1/30 dev "$A"
ip addr add 198.19.250.5/30 dev "$B"
ip -n "$NS" addr add 198.19.250.2/30 dev a0
ip -n "$NS" addr add 198.19.250.6/30 dev b0
for i in "$A" "$B"; do ip link set "$i" up; sysctl -qw "net.ipv4.conf.$i.forwarding=1"; done
for i in a0 b0; do
    ip -n "$NS" link set "$i" up
    ip -n "$NS" link set dev "$i" xdpdrv obj "$OBJ" program xdp_pass
    ip netns exec "$NS" ethtool -K "$i" tx off >/dev/null
done
sleep 1

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

run() {
    mode=$1
    xdp=""
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
    b0=$1 t0=$2
    ip netns exec "$NS" taskset -c 1 "$LOADGEN" --server 198.19.250.1:3478 --secret "$SECRET" --clients 50 --rate 0 \
        --window 16 --size 1200 --warmup 1 --duration "$DUR" --peer-ip 198.19.250.6 --server-pid "$PID" >"$DIR/gen-$mode.txt"
    set -- $(busy)
    b1=$1 t1=$2
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    echo "== $mode"
    cat "$DIR/gen-$mode.txt"
    grep -i xdp "$DIR/turnd-$mode.log" || true
    echo "both cores busy over the run (incl. setup): $(( (b1 - b0) * 100 / (t1 - t0) ))% of 2 cores"
    ethtool -S "$A" 2>/dev/null | grep -E 'xdp_redirect:' | head -2 || true
}

run socket
run xdp
