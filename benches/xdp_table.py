#!/usr/bin/env python3
"""The markdown tables of benches/xdp.sh: RESULTS.jsonl META CPUS -> stdout.

One JSON object per run: {label, relay, size, run, xdp_redirects,
veth_drops, bpf_runs, bpf_run_ns, relay_log, gen: loadgen --json with
--cpu-stat CPUS}, or {label, relay, size, run, error}. Medians over the
runs with the spread (min-max) beside them; ratios are taken run by run
(run K of one relay against run K of the other, same size) and then their
median and spread.
"""
import statistics
import sys

from tables import n0, read_jsonl, spread

RELAYS = [("xdp", "turnd, XDP fast path"), ("socket", "turnd, socket path"), ("coturn", "coturn"),
          ("direct", "no relay (the generator alone)")]
RATIOS = [("xdp", "socket"), ("xdp", "coturn"), ("socket", "coturn")]
# A run whose "other" time (busy, but in neither the relay's nor the
# generator's CPU time) exceeds this share of a CPU is flagged.
BUSY_OTHER_PCT = 20
# Busy = everything but idle, iowait and steal (/proc/stat).
BUSY = ("user", "nice", "system", "irq", "softirq")




def figures(r, cpus):
    """One run's figures, or None when it failed."""
    g = r.get("gen")
    if "error" in r or not g or not g.get("cpu_stat"):
        return None
    secs = g["duration_s"]
    fwd = g["forwarded_pps"]
    cs = g["cpu_stat"]
    busy = {c: sum(cs[f"cpu{c}"][k] for k in BUSY) for c in cpus}
    soft = {c: cs[f"cpu{c}"]["softirq"] + cs[f"cpu{c}"]["irq"] for c in cpus}
    steal = sum(cs[f"cpu{c}"]["steal"] for c in cpus)
    total_busy = sum(busy.values())
    pkts = fwd * secs
    server_s = (g.get("server_cpu_pct") or 0) * secs / 100
    gen_s = (g.get("loadgen_cpu_pct") or 0) * secs / 100
    totals = g.get("to_peer_total", 0) + g.get("to_client_total", 0)
    return {
        "fwd": fwd,
        "offered": g["offered_mps"],
        "loss": g["loss_pct"],
        "us_pkt": total_busy * 1e6 / pkts if pkts else None,
        # The relay's and the generator's own utime+stime only (with tick
        # accounting that includes softirq work done in their context, not
        # softirq run while a CPU idled or in ksoftirqd): a lower bound of
        # what the relaying cost, untouched by other programs.
        "us_pkt_procs": (server_s + gen_s) * 1e6 / pkts if pkts else None,
        # Forwarded packets per second of busy CPU, both cores together.
        "per_core": pkts / total_busy if total_busy else None,
        "busy": {c: 100 * busy[c] / secs for c in cpus},
        "soft": {c: 100 * soft[c] / secs for c in cpus},
        "server_pct": g.get("server_cpu_pct"),
        "gen_pct": g.get("loadgen_cpu_pct"),
        # Busy time not in the relay's or the generator's utime+stime:
        # interrupt work that ran while neither did, and other programs.
        "other_pct": 100 * (total_busy - server_s - gen_s) / secs,
        "steal_pct": 100 * steal / secs,
        "xdp_share": 100 * r.get("xdp_redirects", 0) / totals if totals else None,
        "drops": r.get("veth_drops"),
        "bpf_ns": r["bpf_run_ns"] / r["bpf_runs"] if r.get("bpf_runs") else None,
        "p50": (g.get("rtt_us") or {}).get("p50"),
        "wait": (g.get("server_wait_pct"), g.get("loadgen_wait_pct")),
        "log": r.get("relay_log", ""),
    }




def d2(v):
    return f"{v:.2f}"


def pct(v):
    return f"{v:.0f}"


def x2(v):
    return f"{v:.2f}×"


def main():
    rows = read_jsonl(sys.argv[1])
    meta = sys.argv[2] if len(sys.argv) > 2 else ""
    cpus = [int(c) for c in (sys.argv[3] if len(sys.argv) > 3 else "0,1").split(",")]
    c0, c1 = cpus[0], cpus[1]
    sizes = sorted({r["size"] for r in rows})
    by = {}  # (size, relay) -> {run: figures}
    failed = {}
    for r in rows:
        f = figures(r, cpus)
        key = (r["size"], r["relay"])
        if f is None:
            failed.setdefault(key, []).append(r)
        else:
            by.setdefault(key, {})[r["run"]] = f

    print("## XDP fast path, socket path and coturn on veth, at saturation\n")
    print(meta + "\n")
    print(f"50 UDP clients, 16 ChannelData messages in flight each, echoed by the peer; relay pinned to CPU {c0}, "
          f"generator (clients and echo peer) to CPU {c1}. Medians, spread (min–max) in brackets for the first three figures (every run's figures below). "
          f"**CPU µs / fwd pkt** is the busy time of both CPUs (user, nice, system, irq, softirq in /proc/stat) over "
          f"the window divided by the packets forwarded (both directions), whoever spent it: on veth the receiving "
          f"side's kernel work, and the XDP program, run on the sending CPU. **other %**: busy time in neither the "
          f"relay's nor the generator's utime+stime (interrupt work while neither ran, and other programs).\n")
    print(f"| payload B | relay | runs | fwd pkts/s | CPU µs / fwd pkt (both CPUs) | fwd pkts per busy CPU-second "
          f"| CPU µs / fwd pkt, relay + generator processes only "
          f"| CPU {c0} busy % (softirq) | CPU {c1} busy % (softirq) | relay process CPU % | generator process CPU % "
          f"| other % | loss % | relayed by XDP % | relay's own µs / fwd pkt (processes only, less direct's) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for key, name in RELAYS:
            figs = list(by.get((size, key), {}).values())
            nf = len(failed.get((size, key), []))
            if not figs and not nf:
                continue
            runs = f"{len(figs)}" + (f" ({nf} failed)" if nf else "")
            if not figs:
                print(f"| {size} | {name} | {runs} |" + " |" * 12)
                continue
            g = lambda k: [f[k] for f in figs]  # noqa: E731
            rd, mine = by.get((size, "direct"), {}), by.get((size, key), {})
            own = [mine[k]["us_pkt_procs"] - rd[k]["us_pkt_procs"] for k in mine if k in rd and mine[k]["us_pkt_procs"] and rd[k]["us_pkt_procs"]]
            m = lambda vals, fmt: "–" if not [v for v in vals if v is not None] else fmt(statistics.median([v for v in vals if v is not None]))  # noqa: E731
            busy = lambda c: f"{m([f['busy'][c] for f in figs], pct)} ({m([f['soft'][c] for f in figs], pct)})"  # noqa: E731
            print(f"| {size} | {name} | {runs} | {spread(g('fwd'), n0)} | {spread(g('us_pkt'), d2)} | "
                  f"{spread(g('per_core'), n0)} | {spread(g('us_pkt_procs'), d2)} | {busy(c0)} | {busy(c1)} | {m(g('server_pct'), pct)} | "
                  f"{m(g('gen_pct'), pct)} | {m(g('other_pct'), pct)} | {m(g('loss'), d2)} | "
                  f"{m(g('xdp_share'), pct)} | {spread(own, d2) if key != 'direct' else '–'} |")

    busy = [f"{r['label']} ({figures(r, cpus)['other_pct']:.0f}%)" for r in rows
            if figures(r, cpus) and figures(r, cpus)["other_pct"] > BUSY_OTHER_PCT]
    if busy:
        print(f"\n**Busy machine**: in " + ", ".join(busy) + " more than "
              f"{BUSY_OTHER_PCT}% of a CPU went to neither the relay nor the generator (other programs, mostly): the "
              "both-CPU figures of those runs count it, the processes-only ones do not.")

    print("\nRatios, run by run (run K of one relay against run K of the other), median and spread. "
          "Throughput: forwarded packets/s. Per core: forwarded packets per busy CPU-second of both CPUs "
          "(the inverse of CPU µs / fwd pkt; above 1× the first relay is cheaper); processes only: the same from the relay's and "
          "the generator's own CPU time. Relay's own part: CPU µs / fwd pkt of the "
          "processes less the generator's alone (no relay, same run and size), then the same ratio; an estimate, since the "
          "generator's part is not quite the same with a relay between (veth instead of loopback, software checksums):\n")
    print("| payload B | ratio | throughput | per core | per core, processes only | per core, relay's own part (estimate) |")
    print("|---:|---|---:|---:|---:|---:|")
    for size in sizes:
        for a, b in RATIOS:
            ra, rb = by.get((size, a), {}), by.get((size, b), {})
            both = sorted(set(ra) & set(rb))
            if not both:
                continue
            thr = [ra[k]["fwd"] / rb[k]["fwd"] for k in both if rb[k]["fwd"]]
            pc = [ra[k]["per_core"] / rb[k]["per_core"] for k in both if ra[k]["per_core"] and rb[k]["per_core"]]
            # The relays' own part: CPU per packet less the generator's
            # alone (direct) in the same run and size. An estimate: see
            # benches/README.md.
            rd = by.get((size, "direct"), {})
            own = [(ra[k]["us_pkt_procs"] - rd[k]["us_pkt_procs"], rb[k]["us_pkt_procs"] - rd[k]["us_pkt_procs"]) for k in both
                   if k in rd and ra[k]["us_pkt_procs"] and rb[k]["us_pkt_procs"] and rd[k]["us_pkt_procs"]]
            po = [y / x for x, y in own if x > 0 and y > 0]
            pp = [rb[k]["us_pkt_procs"] / ra[k]["us_pkt_procs"] for k in both if ra[k]["us_pkt_procs"] and rb[k]["us_pkt_procs"]]
            print(f"| {size} | {a} / {b} | {spread(thr, x2)} | {spread(pc, x2)} | {spread(pp, x2)} | {spread(po, x2)} |")

    print("\nEvery run:\n")
    print(f"| run | fwd pkts/s | offered msgs/s | CPU µs / fwd pkt | CPU {c0} / {c1} busy % | softirq+irq % {c0} / {c1} "
          f"| relay / generator process % | waiting for a CPU %, relay / generator | steal % | loss % | relayed by XDP % "
          f"| veth drops | XDP program ns / run | RTT p50 µs | relay's log |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        f = figures(r, cpus)
        if f is None:
            print(f"| {r.get('label')} | failed: {str(r.get('error', 'no cpu_stat'))[:150]} |" + " |" * 13)
            continue
        opt = lambda v, fmt: "–" if v is None else fmt(v)  # noqa: E731
        w = f"{opt(f['wait'][0], pct)} / {opt(f['wait'][1], pct)}"
        print(f"| {r['label']} | {n0(f['fwd'])} | {n0(f['offered'])} | {opt(f['us_pkt'], d2)} | "
              f"{pct(f['busy'][c0])} / {pct(f['busy'][c1])} | {pct(f['soft'][c0])} / {pct(f['soft'][c1])} | "
              f"{opt(f['server_pct'], pct)} / {opt(f['gen_pct'], pct)} | {w} | {pct(f['steal_pct'])} | {d2(f['loss'])} | "
              f"{opt(f['xdp_share'], pct)} | {opt(f['drops'], n0)} | {opt(f['bpf_ns'], n0)} | {opt(f['p50'], n0)} | "
              f"{(f['log'] or '').replace('|', '/')[:160]} |")


if __name__ == "__main__":
    main()
