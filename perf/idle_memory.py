#!/usr/bin/env python3
"""Memory per idle device session of a running pushbroker.

Starts the release binary on a port-0 configuration, opens N device connections from
distinct loopback source addresses (127.0.x.y, so ephemeral ports never run out), and
reads the server's RSS (/proc/PID/status VmRSS) at three points:

  base       server started, no connection
  accepted   N TCP connections accepted, each waiting for its hello (baseline: what a
             bare accepted connection costs)
  sessions   the same N connections after version byte + CONNECT + CONNACK: registered,
             idle sessions with their ping timers

and prints one JSON summary. Usage:

  python3 perf/idle_memory.py [N] [SHARDS]     (default 10000 2; N at most ~19000)

Kernel socket memory is not in RSS (see DESIGN.md); this measures the server process.
"""

import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
SHARDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "pushbroker")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle(pid, seconds=1.0):
    time.sleep(seconds)
    return rss_kib(pid)


def frame(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">H", len(body)) + body


def read_frame(s):
    head = b""
    while len(head) < 2:
        chunk = s.recv(2 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    n = struct.unpack(">H", head)[0]
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return json.loads(body)


def main():
    import faulthandler; faulthandler.dump_traceback_later(30, exit=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as d:
        cfg = os.path.join(d, "config.json")
        with open(cfg, "w") as f:
            json.dump({"addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "shards": SHARDS,
                       "ping_interval": "10m", "exchange_timeout": "10m"}, f)
        env = dict(os.environ, RUST_LOG=os.environ.get("PB_LOG", "info"))
        server = subprocess.Popen([BINARY, cfg], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  env=env, text=True)
        addr = None
        while addr is None:
            line = server.stderr.readline()
            if not line:
                raise RuntimeError("server exited")
            if "listening for devices on " in line:
                host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
                addr = (host, int(port))
        import threading
        log = []
        threading.Thread(target=lambda: log.extend(server.stderr), daemon=True).start()
        try:
            base = settle(server.pid)
            socks = []
            t0 = time.time()
            for i in range(N):
                s = socket.socket()
                s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
                s.connect(addr)
                socks.append(s)
            accepted = settle(server.pid, 2.0)
            for i, s in enumerate(socks):
                s.sendall(b"\x00" + frame({"T": "connect", "DeviceId": f"idle-{i:06d}",
                                           "Levels": {"0": 0}, "Info": {"device": "m", "channel": "c"}}))
            for n, s in enumerate(socks):
                s.settimeout(20)
                try:
                    msg = read_frame(s)
                except socket.timeout:
                    sys.stderr.write("".join(log[-20:]))
                    raise RuntimeError(f"no CONNACK on connection {n} ({s.getsockname()})")
                assert msg["T"] == "connack", msg
            connected_s = time.time() - t0
            sessions = settle(server.pid, 2.0)
            alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({
        "connections": N,
        "shards": SHARDS,
        "rss_kib": {"base": base, "accepted": accepted, "sessions": sessions},
        "bytes_per_accepted_connection": round((accepted - base) * 1024 / N),
        "bytes_per_idle_session": round((sessions - base) * 1024 / N),
        "bytes_per_session_over_accepted": round((sessions - accepted) * 1024 / N),
        "connect_and_hello_seconds": round(connected_s, 2),
        "server_alive_at_end": alive,
    }, indent=2))


if __name__ == "__main__":
    main()
