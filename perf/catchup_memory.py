#!/usr/bin/env python3
"""Server memory when stalled devices catch up on a large broadcast backlog.

Starts a pushbroker binary on a port-0 configuration, posts B broadcasts of about 2 KB
each on the system channel (all live), then connects K devices at system level 0 that
send their hello and never read, so each one's catch-up stays in flight. Prints one JSON
line with the server's RSS before the devices and its peak RSS (VmHWM) after them.

  python3 perf/catchup_memory.py [--binary target/release/pushbroker] [-k 100] [-b 2000]
                                 [--config '{"broadcast_backlog": 2000}']

Devices connect from distinct loopback source addresses (127.3.x.y).
"""

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default="target/release/pushbroker")
    ap.add_argument("-k", type=int, default=100, help="stalled devices")
    ap.add_argument("-b", type=int, default=2000, help="broadcasts posted")
    ap.add_argument("--config", default="{}", help="extra server configuration keys (JSON)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="catchup-")
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0",
                   **json.loads(args.config)}, f)
    server = subprocess.Popen([args.binary, config], stderr=subprocess.PIPE, text=True)
    try:
        http = devices = None
        while http is None or devices is None:
            line = server.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before listening")
            m = re.search(r"listening for (http|devices) on (\S+)", line)
            if m and m.group(1) == "http":
                http = m.group(2)
            elif m:
                devices = m.group(2)
        pad = "x" * 1900
        for i in range(args.b):
            body = json.dumps({"channel": "system", "expire_on": "2099-01-01T00:00:00Z",
                               "data": {"daily/mako": i, "pad": pad}}).encode()
            req = urllib.request.Request(f"http://{http}/broadcast", data=body,
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req).read()
        time.sleep(0.5)
        before = status_kb(server.pid, "VmRSS")
        host, port = devices.rsplit(":", 1)
        socks = []
        for i in range(args.k):
            s = socket.socket()
            s.bind((f"127.3.{i // 250}.{i % 250 + 1}", 0))
            s.connect((host, int(port)))
            hello = json.dumps({"T": "connect", "DeviceId": f"stalled-{i}",
                                "Levels": {"0": 0},
                                "Info": {"device": "mako", "channel": "daily"}}).encode()
            s.sendall(b"\x00" + struct.pack(">H", len(hello)) + hello)
            socks.append(s)
        time.sleep(3)
        print(json.dumps({
            "devices": args.k, "broadcasts": args.b,
            "rss_before_mb": round(before / 1024, 1),
            "peak_rss_mb": round(status_kb(server.pid, "VmHWM") / 1024, 1),
            "rss_after_mb": round(status_kb(server.pid, "VmRSS") / 1024, 1),
        }))
        for s in socks:
            s.close()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
