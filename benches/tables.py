"""What the benchmark table scripts share: reading a JSON-lines results
file and writing a median with its spread."""
import json
import statistics


def read_jsonl(path):
    """Every JSON object of `path`, one per line; blank or broken lines are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def spread(vals, fmt):
    """The median of `vals` (None left out) with the range beside it when
    it shows: "7.5 (7.1–8.0)"; "–" when there is none."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    med = statistics.median(vals)
    if len(vals) == 1 or fmt(min(vals)) == fmt(max(vals)):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def n0(v):
    """A count with thousands separators."""
    return f"{v:,.0f}"
