"""
The floor under buildcache's small hits: a bare twisted.web server that
answers every request with the same 20 KB body from memory (no routing,
no store, no access line), in 1 and in N processes sharing one port
(SO_REUSEPORT, as ``--workers`` does), measured with the same
``wrk -t2 -c32`` as ``bench/proxy.py``'s 20 KB hits.

    .venv/bin/python bench/floor.py [--processes 2] [--json bench/floor.json]

What it shows: how many requests per second twisted.web itself can answer
on this machine with the load generator beside it, and the CPU each one
costs: the most any design that keeps twisted.web's HTTP parsing and
``Request`` per hit can reach.  Run it in the same session as
``bench/proxy.py`` (idle machine) and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from processes import free_port, machine_and_versions, stop  # noqa: E402

BODY_BYTES = 20 * 1024
SECONDS = 5

SERVER = """
import socket, sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

BODY = b"x" * {size}

class Body(Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"x-cache", b"HIT")
        return BODY

site = Site(Body())
site.log = lambda request: None
listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
listening.bind(("127.0.0.1", int(sys.argv[1])))
listening.listen(50)
listening.setblocking(False)
reactor.adoptStreamPort(listening.fileno(), socket.AF_INET, site)
listening.close()
reactor.run()
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def measure(processes: int) -> dict[str, float]:
    port = free_port()
    servers = [
        subprocess.Popen([sys.executable, "-c", SERVER.format(size=BODY_BYTES), str(port)])
        for _ in range(processes)
    ]
    try:
        wait_listening(port)
        time.sleep(0.5)
        before = sum(cpu_seconds(p.pid) for p in servers)
        done = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{SECONDS}s", f"http://127.0.0.1:{port}/p.apk"],
            capture_output=True, text=True, timeout=SECONDS + 30, check=True,
        )
        spent = sum(cpu_seconds(p.pid) for p in servers) - before
    finally:
        for process in servers:
            stop(process)
    rate = float(re.search(r"Requests/sec:\s*([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", done.stdout).group(1))  # type: ignore[union-attr]
    return {
        "processes": processes,
        "requests_per_s": rate,
        "cpu_us_per_request": spent / count * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.json"))
    args = parser.parse_args()
    rows = [measure(1), measure(args.processes)]
    print(f"{'twisted.web, 20 KB from memory':34} {'req/s':>8} {'CPU us/req':>11}")
    for row in rows:
        print(f"{int(row['processes'])} process(es){'':20} {row['requests_per_s']:8.0f} {row['cpu_us_per_request']:11.1f}")
    report = {
        "environment": machine_and_versions({"wrk": ["wrk", "-v"]}),
        "loadavg_at_end": open("/proc/loadavg").read().strip(),
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
