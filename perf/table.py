#!/usr/bin/env python3
"""Markdown tables from a perf/run.sh results directory.

  python3 perf/table.py DIR

DIR holds one `<scenario>-<sessions>-<server>-<rep>.json` per pushload run (server: plain,
tls or floor) and, from run.sh, a `.rc` file with its exit code and a `.log`. Prints one
table per scenario: the median over reps of each metric for pushbroker plain, pushbroker
TLS and the floor, and the ratio pushbroker plain / floor. A cell shows how many reps
made its median (n=...) and is marked (!) when a rep of that group was not ok; the failed
runs are listed under the table.
"""

import json
import math
import os
import re
import statistics
import sys

SERVERS = [("plain", "pushbroker plain"), ("tls", "pushbroker TLS"), ("floor", "floor")]

# scenario -> [(label, path in the result object)]
METRICS = {
    "connect": [
        ("server CPU per connect (µs)", ("server_cpu_us_per_connect",)),
        ("connects per s", ("connects_per_s",)),
        ("connect→CONNACK p99 (ms)", ("latency_ms", "p99")),
    ],
    "idle": [
        ("server RSS per session (KB)", ("server_rss_per_session_kb",)),
        ("server CPU per session-second (µs)", ("server_cpu_us_per_session_s",)),
    ],
    "broadcast": [
        ("server CPU per delivery (µs)", ("server_cpu_us_per_delivery",)),
        ("client CPU per delivery (µs)", ("client_cpu_us_per_delivery",)),
        ("latency p50 (ms)", ("latency_ms", "p50")),
        ("latency p99 (ms)", ("latency_ms", "p99")),
        ("round p50 (ms)", ("round_ms", "p50")),
    ],
    "unicast": [
        ("server CPU per delivery (µs)", ("server_cpu_us_per_delivery",)),
        ("client CPU per delivery (µs)", ("client_cpu_us_per_delivery",)),
        ("notifies per s", ("notifies_per_s",)),
        ("latency p50 (ms)", ("latency_ms", "p50")),
        ("latency p99 (ms)", ("latency_ms", "p99")),
    ],
    "churn": [
        ("server CPU per delivery (µs)", ("server_cpu_us_per_delivery",)),
        ("latency p99 (ms)", ("latency_ms", "p99")),
        ("reconnects", ("reconnects",)),
        ("missing", ("missing",)),
        ("duplicates", ("duplicates",)),
    ],
}
NOTES = {
    "churn": "The floor is not run for churn: it keeps nothing pending for a disconnected device.",
}
NAME = re.compile(r"^([a-z]+)-(\d+)-([a-z]+)-(\d+)\.(json|rc)$")


def load(directory):
    """{(scenario, sessions, server): [run]}, a run being a dict with rep, result, rc, failure."""
    runs = {}
    for fname in sorted(os.listdir(directory)):
        m = NAME.match(fname)
        if not m:
            continue
        scenario, sessions, server, rep, ext = m.groups()
        key = (scenario, int(sessions), server)
        run = runs.setdefault(key, {}).setdefault(int(rep), {"rep": int(rep), "result": None, "rc": None})
        path = os.path.join(directory, fname)
        try:
            with open(path) as f:
                if ext == "rc":
                    run["rc"] = int(f.read().strip())
                else:
                    run["result"] = json.load(f)
        except (OSError, ValueError) as e:
            run.setdefault("error", f"{fname}: {e}")
    groups = {}
    for key, reps in runs.items():
        for run in reps.values():
            run["failure"] = failure(run)
        groups[key] = [reps[r] for r in sorted(reps)]
    return groups


def failure(run):
    """Why a run is not ok, or None."""
    res, rc = run["result"], run["rc"]
    if run.get("error"):
        return run["error"]
    if not isinstance(res, dict):
        return f"exit {rc}, no result JSON" if rc is not None else "no result JSON"
    if rc in (0, None) and res.get("ok") is True:
        return None
    counts = ", ".join(f"{k}={res.get(k)}" for k in ("missing", "duplicates", "wrong", "errors"))
    head = f"exit {rc}, " if rc is not None else ""
    return f"{head}ok={json.dumps(res.get('ok'))}, {counts}"


def value(result, path):
    for k in path:
        if not isinstance(result, dict):
            return None
        result = result.get(k)
    return result if isinstance(result, (int, float)) and not isinstance(result, bool) else None


def fmt(x):
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    return f"{x:,.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 else f"{x:.3g}"


def cell(runs, path):
    """(median or None, markdown cell) over the runs of one group."""
    if not runs:
        return None, "—"
    vals = [v for v in (value(r["result"], path) for r in runs) if v is not None]
    med = statistics.median(vals) if vals else None
    if vals and all(isinstance(v, int) for v in vals) and med == int(med):
        med = int(med)
    text = f"{fmt(med)} (n={len(vals)})" if vals else "—"
    if any(r["failure"] for r in runs):
        text += " (!)"
    return med, text


def table(scenario, groups):
    sizes = sorted({size for (sc, size, _) in groups if sc == scenario})
    out = [f"## {scenario}", ""]
    out.append("| sessions | metric | " + " | ".join(label for _, label in SERVERS) + " | plain / floor |")
    out.append("|---:|---|" + "---:|" * (len(SERVERS) + 1))
    for size in sizes:
        for label, path in METRICS.get(scenario, []):
            cells, meds = [], {}
            for server, _ in SERVERS:
                meds[server], text = cell(groups.get((scenario, size, server), []), path)
                cells.append(text)
            plain, floor = meds["plain"], meds["floor"]
            ratio = f"{plain / floor:.2f}×" if plain is not None and floor else "—"
            out.append(f"| {size:,} | {label} | " + " | ".join(cells) + f" | {ratio} |")
    out.append("")
    if scenario in NOTES:
        out += [NOTES[scenario], ""]
    failures = [
        f"- {scenario} {size:,} {server} rep {r['rep']}: {r['failure']} "
        f"(`{scenario}-{size}-{server}-{r['rep']}.log`)"
        for (sc, size, server), runs in sorted(groups.items())
        if sc == scenario
        for r in runs
        if r["failure"]
    ]
    if failures:
        out += ["Not ok:", ""] + failures + [""]
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: table.py DIR")
    directory = sys.argv[1]
    if not os.path.isdir(directory):
        sys.exit(f"table.py: {directory} is not a directory")
    groups = load(directory)
    lines = [
        f"# pushload results: {os.path.basename(os.path.abspath(directory))}",
        "",
        "Medians over reps; n = reps with a value; (!) = at least one rep of that cell was not ok"
        " (listed under the table); — = no value. Machine and commands: MACHINE.md.",
        "",
    ]
    if not any(server == "floor" for (_, _, server) in groups):
        lines += ["No floor results here: the floor and ratio columns are empty.", ""]
    found = {sc for (sc, _, _) in groups}
    scenarios = [sc for sc in METRICS if sc in found] + sorted(found - set(METRICS))
    if not scenarios:
        lines.append("No results found.")
    for sc in scenarios:
        lines += table(sc, groups)
    print("\n".join(lines).rstrip())


if __name__ == "__main__":
    main()
