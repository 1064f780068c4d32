#!/usr/bin/env python3
"""Many nodes on one Redis: what a delivery costs across nodes, against one node alone.

Starts a redis-server on a free port, then for each rep (the modes alternating, so all
see the same machine) runs pushload attached to freshly started pushbroker nodes:

  standalone   one node without Redis (the baseline): devices and API on it
  same-node    3 nodes on Redis; devices on A, notifies through A
  cross-node   3 nodes on Redis; devices on B, notifies through A
  broadcast    3 nodes on Redis; devices spread over A, B, C; broadcasts through A
               (and the same on one standalone node for the baseline)
  connect      the sessions connect (to A, B, C) and go: what a session costs Redis,
               taken out of the unicast rows so those are per delivery

Server CPU is summed over every node's process; Redis's own CPU and its commands come
from INFO (used_cpu_*, total_commands_processed, commandstats) before and after each
run. Writes each run's JSON and log, MACHINE.md and TABLE.md (medians of the reps).

  python3 perf/cluster.py [--sessions 5000] [--notifies 20000] [--broadcast-sessions 6000]
                          [--broadcasts 20] [--reps 3] [--shards 1] [--out DIR]
"""

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_info(port):
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "all"],
        capture_output=True, text=True, check=True,
    ).stdout
    info = {}
    for line in out.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            info[k] = v.strip()
    stats = {
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "commands": int(info["total_commands_processed"]),
    }
    for k, v in info.items():
        if k.startswith("cmdstat_"):
            m = re.search(r"calls=(\d+)", v)
            if m:
                stats[k[len("cmdstat_"):]] = int(m.group(1))
    return stats


class Node:
    """A pushbroker process on free ports, its listening addresses read from its log."""

    def __init__(self, workdir, name, redis_port, shards):
        self.config = Path(workdir) / f"{name}.json"
        cfg = {"addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "shards": shards}
        if redis_port is not None:
            cfg["redis_url"] = f"redis://127.0.0.1:{redis_port}"
            cfg["node_id"] = f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        self.config.write_text(json.dumps(cfg))
        self.log = open(Path(workdir) / f"{name}.log", "w+")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        self.proc = subprocess.Popen(
            [str(BIN / "pushbroker"), str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env,
        )
        self.http = self.devices = None
        deadline = time.time() + 20
        while time.time() < deadline and (self.http is None or self.devices is None):
            self.log.seek(0)
            text = self.log.read()
            m = re.search(r"INFO listening for http on (\S+)", text)
            if m:
                self.http = m.group(1)
            m = re.search(r"INFO listening for devices on (\S+)", text)
            if m:
                self.devices = m.group(1)
            time.sleep(0.05)
        if self.http is None or self.devices is None:
            raise RuntimeError(f"node {name} did not start; see {self.log.name}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run(mode, rep, args, out, redis_port, workdir):
    """One run: fresh nodes, pushload attached, Redis's counters around it."""
    scenario = ("broadcast" if mode.startswith("broadcast")
                else "connect" if mode.startswith("connect") else "unicast")
    sessions = args.broadcast_sessions if scenario == "broadcast" else args.sessions
    nodes = []
    try:
        if mode in ("standalone", "broadcast-standalone", "connect-standalone"):
            nodes = [Node(workdir, f"{mode}-{rep}-a", None, args.shards)]
            devices, apis = [nodes[0].devices], [nodes[0].http]
        else:
            subprocess.run(["redis-cli", "-p", str(redis_port), "FLUSHALL"],
                           check=True, capture_output=True)
            nodes = [Node(workdir, f"{mode}-{rep}-{n}", redis_port, args.shards)
                     for n in "abc"]
            a, b, c = nodes
            if mode == "same-node":
                devices, apis = [a.devices], [a.http]
            elif mode == "cross-node":
                devices, apis = [b.devices], [a.http]
            else:
                devices, apis = [a.devices, b.devices, c.devices], [a.http]
        flags = {"broadcast": ["--broadcasts", str(args.broadcasts)],
                 "connect": [],
                 "unicast": ["--notifies", str(args.notifies), "--concurrency", "16"]}[scenario]
        name = f"{mode}-{sessions}-{rep}"
        cmd = [str(BIN / "pushload"),
               "--devices", ",".join(devices),
               "--api", ",".join(f"http://{h}" for h in apis),
               "--pid", ",".join(str(n.proc.pid) for n in nodes),
               "--scenario", scenario, "--sessions", str(sessions),
               "--workers", "2" if sessions > 10000 else "1",
               "--json", str(out / f"{name}.json")] + flags
        with open(out / "MACHINE.md", "a") as m:
            m.write(" ".join(cmd) + "\n")
        before = redis_info(redis_port)
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=900)
        # The sessions' disconnects (a route released each) reach Redis just after.
        time.sleep(1)
        after = redis_info(redis_port)
        result = json.loads((out / f"{name}.json").read_text())
        result["redis"] = {k: after[k] - before.get(k, 0) for k in after}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        for n in nodes:
            n.stop()


def median(rows, f):
    vals = [f(r) for r in rows if r.get("ok")]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--notifies", type=int, default=20000)
    p.add_argument("--broadcast-sessions", type=int, default=6000)
    p.add_argument("--broadcasts", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out = (args.out or ROOT / "perf" / "results" / f"{time.strftime('%F')}-cluster").resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"cluster.py: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "pushbroker",
                    "--bin", "pushload"], cwd=ROOT, check=True)
    version = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    with open(out / "MACHINE.md", "w") as m:
        m.write(f"# cluster run, {time.strftime('%F %T %Z')}\n\n")
        m.write(f"- commit: {commit}\n- nproc: {os.cpu_count()}; kernel: {platform.release()}\n")
        m.write(f"- {version}\n- {' '.join(sys.argv)}\n\n```sh\n")

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="pushbroker-cluster-")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        modes = ["standalone", "same-node", "cross-node", "broadcast-standalone",
                 "broadcast-3-nodes", "connect-standalone", "connect-3-nodes"]
        results = {m: [] for m in modes}
        for rep in range(1, args.reps + 1):
            for mode in modes:
                r = run(mode, rep, args, out, port, workdir)
                results[mode].append(r)
                print(f"{mode} rep {rep}: ok={r.get('ok')} "
                      f"cpu/delivery={r.get('server_cpu_us_per_delivery')}", flush=True)
    finally:
        redis.terminate()
        redis.wait()
    with open(out / "MACHINE.md", "a") as m:
        m.write("```\n")

    base = results["standalone"]
    lines = [
        f"Medians of {args.reps}; every node {args.shards} shard(s); server CPU summed over "
        "the nodes; Redis CPU and commands from its INFO, per delivery.",
        "",
        "| unicast | notifies/s | p99 (ms) | server CPU / delivery (µs) | Redis CPU / delivery (µs) | Redis requests / delivery | Redis commands / delivery, scripts' own included | notifies/s vs standalone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_rate = median(base, lambda r: r.get("notifies_per_s"))
    # Each session's connect and disconnect costs Redis one script each (claim, release):
    # taken out with the connect runs' Redis figures, so the unicast rows are per delivery.
    con = results["connect-3-nodes"]
    cpu_per_session = median(con, lambda r: r["redis"]["cpu_s"] / r["sessions"])
    cmds_per_session = median(con, lambda r: r["redis"]["commands"] / r["sessions"])

    def delivery_share(r, total, per_session):
        d = r.get("deliveries") or 0
        if not d or per_session is None:
            return None
        return (total - per_session * r["sessions"]) / d

    def requests(r):
        # Top-level requests: scripts (less a claim and a release per session) and
        # sharded publishes.
        red = r["redis"]
        d = r.get("deliveries") or 0
        return ((red.get("evalsha", 0) - 2 * r["sessions"]) + red.get("spublish", 0)) / d if d else None
    for mode in ("standalone", "same-node", "cross-node"):
        rows = results[mode]
        rate = median(rows, lambda r: r.get("notifies_per_s"))
        p99 = median(rows, lambda r: (r.get("latency_ms") or {}).get("p99"))
        cpu = median(rows, lambda r: r.get("server_cpu_us_per_delivery"))
        redis_row = mode != "standalone"
        rcpu = median(rows, lambda r: delivery_share(r, r["redis"]["cpu_s"], cpu_per_session))
        cmds = median(rows, lambda r: delivery_share(r, r["redis"]["commands"], cmds_per_session))
        reqs = median(rows, requests)
        ratio = rate / base_rate if rate and base_rate else None
        lines.append(f"| {mode} ({args.sessions} sessions) | {fmt(rate, ',.0f')} | {fmt(p99, '.2f')} | "
                     f"{fmt(cpu, '.1f')} | {fmt(rcpu * 1e6 if redis_row and rcpu is not None else None, '.1f')} | "
                     f"{fmt(reqs if redis_row else None, '.2f')} | {fmt(cmds if redis_row else None, '.1f')} | "
                     f"{fmt(ratio, '.2f')}× |")
    lines += [
        "",
        "| broadcast | time to last device p50 (ms) | p99 (ms) | server CPU / delivery (µs) | Redis commands / broadcast |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("broadcast-standalone", "broadcast-3-nodes"):
        rows = results[mode]
        t50 = median(rows, lambda r: (r.get("round_ms") or {}).get("p50"))
        t99 = median(rows, lambda r: (r.get("round_ms") or {}).get("p99"))
        cpu = median(rows, lambda r: r.get("server_cpu_us_per_delivery"))
        cmds = median(rows, lambda r: (r["redis"]["commands"]
                                       - (cmds_per_session or 0) * r["sessions"]) / args.broadcasts)
        lines.append(f"| {mode} ({args.broadcast_sessions} sessions) | {fmt(t50, '.1f')} | "
                     f"{fmt(t99, '.1f')} | {fmt(cpu, '.1f')} | "
                     f"{fmt(cmds if mode != 'broadcast-standalone' else None, '.1f')} |")
    lines += [
        "",
        "| connect (each session's connect and disconnect) | server CPU / connect (µs) | Redis CPU / session (µs) | Redis commands / session |",
        "|---|---:|---:|---:|",
    ]
    for mode in ("connect-standalone", "connect-3-nodes"):
        rows = results[mode]
        cpu = median(rows, lambda r: r.get("server_cpu_us_per_connect"))
        rc = median(rows, lambda r: r["redis"]["cpu_s"] / r["sessions"] * 1e6)
        cm = median(rows, lambda r: r["redis"]["commands"] / r["sessions"])
        three = mode != "connect-standalone"
        lines.append(f"| {mode} ({args.sessions} sessions) | {fmt(cpu, '.1f')} | "
                     f"{fmt(rc if three else None, '.1f')} | {fmt(cm if three else None, '.1f')} |")
    bad = [f"{m} rep {i + 1}" for m in modes for i, r in enumerate(results[m]) if not r.get("ok")]
    if bad:
        lines += ["", "Runs not ok (left out of the medians): " + ", ".join(bad)]
    (out / "TABLE.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
