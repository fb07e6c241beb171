#!/usr/bin/env python3
"""Turns benches/compare.sh's raw results (one loadgen --json object per run,
labelled SCENARIO:SERVER:RUN) into markdown: medians per scenario and server,
then the turnd/coturn ratios (and turnd against the floor relay), and the p99
round-trip latency each server adds to the direct path (no server)."""
import json
import re
import statistics
import sys
from collections import OrderedDict

SERVERS = ["turnd", "coturn", "floor", "direct"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{digits}f}×"


def participants_tables(groups):
    """The video-participants scenarios: the largest N per core (SCENARIO =
    TRANSPORT-participants) and the cost at a fixed N (TRANSPORT-participants-N)."""
    searches = [s for s in groups if re.fullmatch(r"\w+-participants", s)]
    fixed = [s for s in groups if re.fullmatch(r"\w+-participants-\d+", s)]
    if searches:
        print("\nVideo participants per server core (30 frames/s of 9 × 1200 B + 50 audio packets/s each, "
              "≈2.5 Mbit/s each way): the largest N with at most 0.5% loss and a p99 round trip through the relay "
              "of at most 20 ms; medians of the runs' searches. Limit: what the smallest failing step (just above N) ran into "
              "(generator = the load generator's own core was saturated, so N is a lower bound for the server):\n")
        print("| transport | turnd N | coturn N | turnd/coturn | turnd limit | coturn limit | turnd server CPU % at N "
              "| coturn server CPU % at N |")
        print("|---|---:|---:|---:|---|---|---:|---:|")
        for sc in searches:
            row = {}
            for server in ("turnd", "coturn"):
                rs = groups[sc].get(server, [])
                n = med([r.get("max_participants") for r in rs])
                limits = [str(r.get("limit") or "?").split(":")[0] for r in rs]
                lim = max(set(limits), key=limits.count) if limits else "–"
                if limits and len(set(limits)) > 1:
                    lim += f" ({limits.count(lim)}/{len(limits)})"
                row[server] = (n, lim, med([r.get("server_cpu_pct") for r in rs]))
            t, c = row["turnd"], row["coturn"]
            print(f"| {sc.split('-')[0].upper()} | {fmt(t[0])} | {fmt(c[0])} | {ratio(t[0], c[0])} | {t[1]} | {c[1]} "
                  f"| {fmt(t[2], 0)} | {fmt(c[2], 0)} |")
    if fixed:
        print("\nVideo participants at a fixed N: server CPU per relayed packet (client → peer plus peer → client), "
              "loss (to the peer / back to the clients) and the round trip through the relay; medians:\n")
        print("| scenario | server | relayed pkts/s | CPU µs / pkt | turnd/coturn | loss % (to peer / to client) "
              "| RTT p50 / p99 ms | one way p99 ms | server CPU % | loadgen CPU % |")
        print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for sc in fixed:
            us = {}
            for server in ("turnd", "coturn"):
                rs = groups[sc].get(server, [])
                us[server] = med([r.get("server_cpu_us_per_pkt") for r in rs])
            for server in ("turnd", "coturn"):
                rs = groups[sc].get(server, [])
                if not rs:
                    continue
                g = lambda k: med([r.get(k) for r in rs])
                ms = lambda v: None if v is None else v / 1000
                p50 = ms(med([r["rtt_us"].get("p50") for r in rs]))
                p99 = ms(med([r["rtt_us"].get("p99") for r in rs]))
                ow = ms(med([(r.get("oneway_to_peer_us") or {}).get("p99") for r in rs]))
                rat = ratio(us["turnd"], us["coturn"]) if server == "turnd" else ""
                print(f"| {sc} | {server} | {fmt(g('forwarded_pps'))} | {fmt(us[server], 2)} | {rat} "
                      f"| {fmt(g('loss_pct'), 3)} ({fmt(g('loss_to_peer_pct'), 3)} / {fmt(g('loss_to_client_pct'), 3)}) "
                      f"| {fmt(p50, 2)} / {fmt(p99, 2)} | {fmt(ow, 2)} | {fmt(g('server_cpu_pct'), 1)} "
                      f"| {fmt(g('loadgen_cpu_pct'), 1)} |")


def main():
    path, meta = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
    groups = OrderedDict()
    errors = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            scenario, server, _run = (r.get("label", "::").split(":") + ["", "", ""])[:3]
            if "error" in r:
                errors.append(f"{r['label']}: {r['error']}")
                groups.setdefault(scenario, OrderedDict()).setdefault(server, [])
                continue
            groups.setdefault(scenario, OrderedDict()).setdefault(server, []).append(r)

    print(f"Measured {meta}.\n")
    print("| scenario | server | runs | offered msgs/s | forwarded pkts/s | loss % | RTT p50 µs | RTT p99 µs "
          "| RTT p99.9 µs | server CPU % | CPU µs / fwd pkt | loadgen CPU % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for scenario, by_server in groups.items():
        for server in sorted(by_server, key=lambda s: SERVERS.index(s) if s in SERVERS else 9):
            rs = by_server[server]
            m = {
                "offered": med([r.get("offered_mps") for r in rs]),
                "fwd": med([r.get("forwarded_pps") for r in rs]),
                "loss": med([r.get("loss_pct") for r in rs]),
                "p50": med([r["rtt_us"].get("p50") for r in rs]),
                "p99": med([r["rtt_us"].get("p99") for r in rs]),
                "p999": med([r["rtt_us"].get("p999") for r in rs]),
                "cpu": med([r.get("server_cpu_pct") for r in rs]),
                "us": med([r.get("server_cpu_us_per_pkt") for r in rs]),
                "gen": med([r.get("loadgen_cpu_pct") for r in rs]),
            }
            summary[(scenario, server)] = m
            print(f"| {scenario} | {server} | {len(rs)} | {fmt(m['offered'])} | {fmt(m['fwd'])} | {fmt(m['loss'], 3)} "
                  f"| {fmt(m['p50'])} | {fmt(m['p99'])} | {fmt(m['p999'])} | {fmt(m['cpu'], 1)} | {fmt(m['us'], 2)} "
                  f"| {fmt(m['gen'], 1)} |")

    print("\nRatios of the medians (turnd / coturn: above 1× is better for forwarded pkts/s, below 1× is better "
          "for CPU and latency; the floor is the protocol-free recvmmsg/sendmmsg relay):\n")
    print("| scenario | fwd pkts/s turnd/coturn | CPU µs/pkt turnd/coturn | RTT p99 turnd/coturn "
          "| fwd pkts/s turnd/floor | CPU µs/pkt turnd/floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for scenario in groups:
        t = summary.get((scenario, "turnd"))
        c = summary.get((scenario, "coturn"))
        fl = summary.get((scenario, "floor"))
        g = lambda d, k: d.get(k) if d else None
        print(f"| {scenario} | {ratio(g(t, 'fwd'), g(c, 'fwd'))} | {ratio(g(t, 'us'), g(c, 'us'))} "
              f"| {ratio(g(t, 'p99'), g(c, 'p99'))} | {ratio(g(t, 'fwd'), g(fl, 'fwd'))} "
              f"| {ratio(g(t, 'us'), g(fl, 'us'))} |")
    added = [s for s in groups if (s, "direct") in summary]
    if added:
        print("\nRound-trip latency each server adds to the direct path (generator to its echo peer, no server), "
              "µs: its RTT percentile minus the direct one, at the same offered rate:\n")
        print("| scenario | direct p50 / p99 µs | turnd p50 / p99 added | coturn p50 / p99 added | floor p50 / p99 added |")
        print("|---|---:|---:|---:|---:|")
        for scenario in added:
            d = summary[(scenario, "direct")]
            def add(server):
                x = summary.get((scenario, server))
                if not x or x["p50"] is None or d["p50"] is None:
                    return "–"
                return f"{x['p50'] - d['p50']:,.0f} / {x['p99'] - d['p99']:,.0f}"
            print(f"| {scenario} | {fmt(d['p50'])} / {fmt(d['p99'])} | {add('turnd')} | {add('coturn')} | {add('floor')} |")
    participants_tables(groups)
    if errors:
        print("\nFailed runs:\n")
        for e in errors:
            print(f"- {e}")


if __name__ == "__main__":
    main()
