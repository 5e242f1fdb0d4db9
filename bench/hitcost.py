#!/usr/bin/env python3
"""
The CPU one cache hit costs the server (issue 16, "a cheaper hit").

Wall-clock requests per second mean nothing on a shared machine; the
server's own CPU time per request does.  This bench starts one buildcache
(``--workers`` left at its default unless given) in front of a local
static origin, caches a 20 KB and a 1 MB apk package, then for each case
(size x route: the forward proxy and the mirror route) runs
``wrk -t2 -c32`` for a few seconds and divides the server
process's utime+stime (``/proc/PID/stat``, its worker children's
added) by the requests served.  Each
case runs ``--repeats`` times; the median is printed and written as JSON.

    .venv/bin/python bench/hitcost.py [--seconds 4] [--json out.json]
        [--py-spy DIR]   # also records a py-spy flame graph per case

Only the server process is counted (not wrk, not the origin), so other
people's load changes the numbers little; run before/after in the same
conditions all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processes import (  # noqa: E402
    buildcache_command,
    children_of,
    free_port,
    stop,
    wait_for_port,
)

from tests.apkrepo import build_apk_of_size, write_repository  # noqa: E402

KB = 1024
MB = 1024 * KB
REPOSITORY = "alpine/v3.20/main"
ARCH = "x86_64"
SIZES = {"20KB": 20 * KB, "1MB": 1 * MB}
CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}

#: For the forward proxy: the absolute URI as the request target (wrk has
#: no proxy option).
WRK_SCRIPT = """\
{forward}
"""


def start_origin(www: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=www, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, www / "none.log")
    return process, f"http://127.0.0.1:{port}"


def curl_head(url: str, proxy: str | None) -> dict[str, str]:
    command = ["curl", "-s", "-o", "/dev/null", "-D", "-", url]
    if proxy:
        command[1:1] = ["-x", proxy]
    out = subprocess.run(command, capture_output=True, text=True, env=CLIENT_ENV, check=True)
    headers = {}
    for line in out.stdout.splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def run_wrk(
    scratch: Path, url: str, proxy: str | None, seconds: float, threads: int, connections: int,
) -> int:
    """
    Run wrk for ``seconds`` and return the requests it completed (wrk
    cannot stop at a count: the server's CPU is divided by this count).
    """
    forward = ""
    target = url
    if proxy:
        host = url.split("/")[2]
        forward = f'wrk.path = "{url}"\nwrk.headers["Host"] = "{host}"'
        target = proxy + "/"
    script = scratch / "count.lua"
    script.write_text(WRK_SCRIPT.format(forward=forward))
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(script), target],
        capture_output=True, text=True, env=CLIENT_ENV, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr[:500]}")
    total = re.search(r"(\d+) requests in", done.stdout)
    if total is None or "Non-2xx" in done.stdout:
        raise RuntimeError(f"wrk: {done.stdout}")
    return int(total.group(1))


def user_system(pid: int) -> tuple[float, float]:
    """
    The user and system CPU seconds of the server: the process and its
    children (hit workers, with ``--workers``), those that live.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for each in (pid, *children_of(pid)):
        try:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        user += int(fields[11]) / ticks
        system += int(fields[12]) / ticks
    return user, system


def settle(pid: int) -> tuple[float, float]:
    """
    The server's user and system CPU once it has stopped using any (the
    last connections close after wrk ends).
    """
    before = sum(user_system(pid))
    for _ in range(50):
        time.sleep(0.3)
        now = sum(user_system(pid))
        if now - before < 0.015:
            break
        before = now
    return user_system(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", default="bench/hitcost.json")
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument("--py-spy", dest="pyspy", default=None,
                        help="directory for one py-spy flame graph per case")
    parser.add_argument("server_options", nargs="*",
                        help="more buildcache options (after --)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hitcost-") as tmp:
        scratch = Path(tmp)
        www = scratch / "www"
        packages = [
            build_apk_of_size(f"hitcost{label.lower()}", size, ARCH, number)
            for number, (label, size) in enumerate(SIZES.items())
        ]
        write_repository(www / REPOSITORY, packages, ARCH, mtime=time.time() - 86400)
        origin, origin_base = start_origin(www)
        port, index_port = free_port(), free_port()
        log = scratch / "server.log"
        server = subprocess.Popen(
            [
                *buildcache_command(log, port, index_port, scratch / "cache"),
                "--max-size", "2G", "--mirror", f"origin={origin_base}",
                "--allow-upstream", "127.0.0.1", *args.server_options,
            ],
            cwd=scratch, stdout=subprocess.DEVNULL,
            stderr=open(scratch / "stderr.log", "wb"),
        )
        results: dict[str, dict[str, object]] = {}
        try:
            wait_for_port(port, server, log)
            proxy = f"http://127.0.0.1:{port}"
            cases = []
            for (label, size), apk in zip(SIZES.items(), packages):
                path = f"/{REPOSITORY}/{ARCH}/{apk.filename}"
                cases.append((f"{label} proxy", origin_base + path, proxy, size))
                cases.append((f"{label} mirror", f"{proxy}/origin{path}", None, size))
            for name, url, via, _ in cases:
                curl_head(url, via)
                for _ in range(20):
                    # The first answer's body is stored just after it went out.
                    cache = curl_head(url, via).get("x-cache", "")
                    if cache.startswith("HIT"):
                        break
                    time.sleep(0.1)
                else:
                    raise RuntimeError(f"{name}: not a hit after warming ({cache!r})")
            for name, url, via, size in cases:
                if args.only not in name:
                    continue
                count = args.seconds
                # One untimed run: the row cache, the reactor's buffers.
                run_wrk(scratch, url, via, 1, args.threads, args.connections)
                per_hit, user, system, served_counts = [], [], [], []
                for _ in range(args.repeats):
                    user0, system0 = settle(server.pid)
                    served = run_wrk(scratch, url, via, count, args.threads, args.connections)
                    user1, system1 = settle(server.pid)
                    user.append((user1 - user0) / served * 1e6)
                    system.append((system1 - system0) / served * 1e6)
                    per_hit.append(user[-1] + system[-1])
                    served_counts.append(served)
                if args.pyspy:
                    # An extra run, not counted: the sampler costs the server a little.
                    Path(args.pyspy).mkdir(parents=True, exist_ok=True)
                    spy = subprocess.Popen(
                        [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--nonblocking", "-r", "250", "-o",
                         str(Path(args.pyspy) / f"{name.replace(' ', '-')}.svg"),
                         "--pid", str(server.pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                    run_wrk(scratch, url, via, count, args.threads, args.connections)
                    spy.send_signal(2)
                    spy.wait(60)
                results[name] = {
                    "cpu_us_per_hit": round(statistics.median(per_hit), 1),
                    "runs_us": [round(v, 1) for v in per_hit],
                    "user_us_per_hit": round(statistics.median(user), 1),
                    "system_us_per_hit": round(statistics.median(system), 1),
                    "requests": served_counts,
                    "body_bytes": size,
                }
                print(f"{name:12} {statistics.median(per_hit):8.1f} us/hit"
                      f" (user {statistics.median(user):.1f}, system {statistics.median(system):.1f})"
                      f"   runs {', '.join(f'{v:.1f}' for v in per_hit)}", flush=True)
        finally:
            stop(server)
            stop(origin)
    Path(args.json).write_text(json.dumps({
        "what": "server CPU (utime+stime) per hit, wrk -t%d -c%d" % (args.threads, args.connections),
        "cases": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
