#!/usr/bin/env python3
"""The markdown table of benches/upgrade.sh: RESULTS.jsonl META -> stdout.

One JSON object per run (loadgen --flows --json, labelled SCENARIO:RUN).
The summary gives the median over runs with the spread (min-max) beside
it; the second table every run.
"""
import sys

from tables import n0, read_jsonl, spread

# A baseline run whose server waited for a CPU longer than this share of
# the window was measured on a busy machine.
BUSY_WAIT_PCT = 10

SCENARIOS = [
    ("turnd-steady", "turnd, no upgrade (baseline)"),
    ("turnd-upgrade", "turnd, `turnctl upgrade` mid-run"),
    ("coturn-restart", "coturn, restarted mid-run"),
]


def load(path):
    rows = {}
    for r in read_jsonl(path):
        scenario, _, run = r.get("label", "?:?").partition(":")
        r["_run"] = run
        rows.setdefault(scenario, []).append(r)
    return rows


def dig(r, *keys):
    for k in keys:
        if not isinstance(r, dict) or r.get(k) is None:
            return None
        r = r[k]
    return r


def figures(r):
    """The figures of one run, or None when it failed."""
    if "error" in r or not r.get("flows"):
        return None
    f, e = r["flows"], r.get("exec") or {}
    tp, tc = f["to_peer"], f["to_client"]
    n = f["flows"]
    stopped = tc["flows_stopped"]
    return {
        "relayed": r["forwarded_pps"],
        "sent": tp["expected"],
        "unsent": r.get("unsent", 0) + r.get("skipped", 0),
        "lost_peer": tp["lost"],
        "lost_client": tc["lost"],
        "dups": tp["duplicates"] + tc["duplicates"],
        "misrouted": tp["misrouted"] + tc["misrouted"],
        "gap_peer": tp["gap_ms"]["max"],
        "gap_client": tc["gap_ms"]["max"],
        "med_peer": tp["gap_ms"]["p50"],
        "med_client": tc["gap_ms"]["p50"],
        "gap_start": tc.get("median_gap_start_ms"),
        "flows": n,
        "stopped": stopped,
        "returned": e.get("returned_ms"),
        "exit": e.get("exit_code"),
        "new_alloc": dig(e, "probe", "first_new_answer_ms"),
        "last_old": dig(e, "probe", "last_old_answer_ms"),
        "kernel_drops": f.get("kernel_udp_rcvbuf_drops"),
        # The server's wait for a CPU only means something where one process served the whole window.
        "server_wait": r.get("server_wait_pct") if r.get("label", "").split(":")[0].endswith("steady") else None,
        "gen_wait": r.get("loadgen_wait_pct"),
        "old_after_new": dig(e, "probe", "old_after_new"),
        "output": e.get("output", ""),
        "rtt_max": dig(r, "rtt_us", "max"),
    }




def ms(v):
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def main():
    rows = load(sys.argv[1])
    meta = sys.argv[2] if len(sys.argv) > 2 else ""
    print("## Upgrade in place under load\n")
    print(meta + "\n")
    print("| scenario | runs | relayed pkts/s | datagrams lost, client → peer | lost, peer → client (echoes) "
          "| longest gap of any flow, ms (to peer / back) | median flow's longest gap, ms (to peer / back) "
          "| flows stopped | command returned, ms | new process answers an Allocate, ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, name in SCENARIOS:
        rs = rows.get(key, [])
        figs = [f for f in map(figures, rs) if f]
        failed = len(rs) - len(figs)
        if not rs:
            continue
        runs = f"{len(figs)}" + (f" ({failed} failed)" if failed else "")
        if not figs:
            print(f"| {name} | {runs} | | | | | | | | |")
            continue
        g = lambda k: [f[k] for f in figs]  # noqa: E731
        all_stopped = all(f["stopped"] == f["flows"] for f in figs)
        gaps = f"{spread(g('gap_peer'), ms)} / {spread(g('gap_client'), ms)}"
        meds = f"{spread(g('med_peer'), ms)} / {spread(g('med_client'), ms)}"
        if all_stopped:
            # Every flow stopped: the gap is the rest of the run, a lower bound.
            gaps = f"never resumed (≥ {ms(min(g('gap_client')))})"
            meds = "never resumed"
        stopped = spread(g("stopped"), n0) + f" of {figs[0]['flows']}"
        print(f"| {name} | {runs} | {spread(g('relayed'), n0)} | {spread(g('lost_peer'), n0)} | "
              f"{spread(g('lost_client'), n0)} | {gaps} | {meds} | {stopped} | "
              f"{spread(g('returned'), ms)} | {spread(g('new_alloc'), ms)} |")

    print("\nEvery run:\n")
    print("| run | sent by clients | not sent (socket full, pacer behind) | lost → peer | lost → client "
          "| duplicates | misrouted | longest gap ms (peer / back) | median flow's ms (peer / back) "
          "| median flow's gap starts, ms after the command | flows stopped | command returned ms (exit) "
          "| new Allocate answered ms (last answer of the old process) | RTT max ms | kernel UDP buffer drops "
          "| server / generator waiting for a CPU, % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, _ in SCENARIOS:
        for r in rows.get(key, []):
            f = figures(r)
            label = r.get("label", "?")
            if not f:
                print(f"| {label} | failed: {str(r.get('error', 'no flows'))[:120]} |" + " |" * 14)
                continue
            opt = lambda v, fmt: "-" if v is None else fmt(v)  # noqa: E731
            ret = opt(f["returned"], ms) + ("" if f["exit"] in (None, 0) else f" (exit {f['exit']})")
            new = opt(f["new_alloc"], ms) + ("" if f["last_old"] is None else f" ({ms(f['last_old'])})")
            wait = f"{opt(f['server_wait'], lambda v: f'{v:.1f}')} / {opt(f['gen_wait'], lambda v: f'{v:.1f}')}"
            print(f"| {label} | {n0(f['sent'])} | {n0(f['unsent'])} | {n0(f['lost_peer'])} | {n0(f['lost_client'])} | "
                  f"{n0(f['dups'])} | {n0(f['misrouted'])} | {ms(f['gap_peer'])} / {ms(f['gap_client'])} | "
                  f"{ms(f['med_peer'])} / {ms(f['med_client'])} | {opt(f['gap_start'], ms)} | {f['stopped']} | {ret} | "
                  f"{new} | {opt(f['rtt_max'], lambda v: ms(v / 1000))} | {opt(f['kernel_drops'], n0)} | {wait} |")
    # The baseline tells whether the machine could carry the load at all:
    # loss there, or a server kept waiting for its CPU, is the machine's.
    busy = [f"{r.get('label')} ({figures(r)['lost_peer'] + figures(r)['lost_client']:,} lost, server waited "
            f"{figures(r)['server_wait'] or 0:.0f}% of the window)"
            for r in rows.get("turnd-steady", []) if figures(r)
            and (figures(r)["lost_peer"] + figures(r)["lost_client"] > 0 or (figures(r)["server_wait"] or 0) > BUSY_WAIT_PCT)]
    if busy:
        print("\n**Busy machine**: without an upgrade, in " + ", ".join(busy) + ": other programs held the "
              "server's or the generator's core, so loss and gaps in the runs beside these are partly the machine's, "
              "not the upgrade's. Measure again on a quiet machine" + ("." if "nice" in meta else " (or with NICE=-10)."))
    outs = [(r.get("label"), figures(r)["output"]) for k, _ in SCENARIOS for r in rows.get(k, []) if figures(r) and figures(r)["output"]]
    if outs:
        print("\nWhat the commands printed:\n")
        for label, o in outs:
            print(f"- {label}: `{o.strip().replace('`', '')[:300]}`")


if __name__ == "__main__":
    main()
