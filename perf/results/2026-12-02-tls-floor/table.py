#!/usr/bin/env python3
"""Medians of the runs in this folder: server CPU per delivery (per connect), plain and
TLS, for the floor, glommio_floor and pushbroker; what TLS adds to each.
usage: perf/results/2026-12-02-tls-floor/table.py"""
import json, os, statistics, sys

here = os.path.dirname(os.path.abspath(__file__))
names = ["floor", "glommio_floor", "glommio_floor-tls", "pushbroker", "pushbroker-tls"]


def values(sc, size, name):
    out = []
    for rep in (1, 2, 3):
        path = os.path.join(here, f"{sc}-{size}-{name}-{rep}.json")
        try:
            d = json.load(open(path))
        except (OSError, ValueError):
            continue
        key = "server_cpu_us_per_connect" if sc == "connect" else "server_cpu_us_per_delivery"
        if d.get("ok") and d.get(key) is not None:
            out.append(d[key])
    return out


def med(v):
    return statistics.median(v) if v else None


def f(x):
    return "—" if x is None else f"{x:.1f}"


print("| sessions | scenario (µs per " + "delivery; connect: per connect) | "
      + " | ".join(names) + " | TLS adds: glommio_floor | TLS adds: pushbroker |")
print("|---:|---|" + "---:|" * (len(names) + 2))
for size in sys.argv[1:] or ["5000", "19000"]:
    for sc in ["connect", "broadcast", "unicast"]:
        m = {n: med(values(sc, size, n)) for n in names}
        runs = {n: ", ".join(f"{x:.1f}" for x in values(sc, size, n)) for n in names}
        add = lambda a, b: None if m[a] is None or m[b] is None else m[b] - m[a]
        print(f"| {int(size):,} | {sc} | " + " | ".join(f"{f(m[n])} ({runs[n]})" for n in names)
              + f" | {f(add('glommio_floor', 'glommio_floor-tls'))} | {f(add('pushbroker', 'pushbroker-tls'))} |")
