#!/usr/bin/env python3
"""
The CPU one cache hit costs the server (issue 16, "a cheaper hit").

Wall-clock requests per second mean nothing on a shared machine; the
server's own CPU time per request does.  This bench starts one buildcache
(``--workers`` left at its default unless given) in front of a local
static origin, caches a 20 KB and a 1 MB apk package, then for each case
(size x route: the forward proxy and the mirror route; for the 20 KB
package also "new": every request's head different, so that none is
answered from the table of repeated hits) runs
``wrk -t2 -c32`` for a few seconds and divides the server
process's utime+stime (``/proc/PID/stat``, its worker children's
added) by the requests served.  Each
case runs ``--repeats`` times; the median is printed and written as JSON.

    .venv/bin/python bench/hitcost.py [--seconds 4] [--json out.json]
        [--baseline SOURCE]  # also an older tree, runs alternating
        [--py-spy DIR]       # also records a py-spy flame graph per case
        [-- --workers 2]     # options for the servers

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
    expected_workers,
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
{fresh}
"""
#: For the "new" cases: every request's head differs (a header with a
#: counter), so that none is answered from the table of repeated hits
#: (``buildcache.engine.hot``), which fills and starts again meanwhile:
#: the cost of a hit the server has not seen asked that way.
FRESH_HEADS = """\
local n = 0
local thread_id = tostring(math.random(1000000000))
request = function()
  n = n + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  headers["X-Request"] = thread_id .. "-" .. n
  return wrk.format(nil, nil, headers)
end
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
    fresh: bool = False,
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
    script.write_text(WRK_SCRIPT.format(forward=forward, fresh=FRESH_HEADS if fresh else ""))
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


def start_server(
    scratch: Path, name: str, origin_base: str, options: list[str], source: str | None,
) -> tuple[subprocess.Popen[bytes], int]:
    """
    A buildcache on a fresh cache; ``source``, if given, is a source tree
    put first on its ``PYTHONPATH`` (the code to compare against).
    """
    port, index_port = free_port(), free_port()
    log = scratch / f"{name}.log"
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.path.abspath(source)
    command = [
        *buildcache_command(log, port, index_port, scratch / f"cache-{name}"),
        "--max-size", "2G", "--mirror", f"origin={origin_base}",
        "--allow-upstream", "127.0.0.1", *options,
    ]
    server = subprocess.Popen(
        command,
        cwd=scratch, env=env, stdout=subprocess.DEVNULL,
        stderr=open(scratch / f"{name}.stderr", "wb"),
    )
    wait_for_port(port, server, log, workers=expected_workers(command))
    return server, port


def warm(name: str, url: str, via: str | None) -> None:
    curl_head(url, via)
    for _ in range(20):
        # The first answer's body is stored just after it went out.
        cache = curl_head(url, via).get("x-cache", "")
        if cache.startswith("HIT"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name}: not a hit after warming ({cache!r})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", default="bench/hitcost.json")
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument(
        "--baseline", default=None, metavar="SOURCE",
        help="also run a server on this source tree (say, `git archive` of an older"
        " commit), alternating runs with the current one",
    )
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
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        results: dict[str, dict[str, dict[str, object]]] = {}
        try:
            sources = {"current": None}
            if args.baseline:
                sources["baseline"] = args.baseline
            for name, source in sources.items():
                servers[name] = start_server(
                    scratch, name, origin_base, args.server_options, source
                )

            def cases(port: int) -> list[tuple[str, str, str | None, int, bool]]:
                proxy = f"http://127.0.0.1:{port}"
                found = []
                for (label, size), apk in zip(SIZES.items(), packages):
                    path = f"/{REPOSITORY}/{ARCH}/{apk.filename}"
                    found.append((f"{label} proxy", origin_base + path, proxy, size, False))
                    found.append(
                        (f"{label} mirror", f"{proxy}/origin{path}", None, size, False)
                    )
                    if size <= 64 * KB:
                        found.append(
                            (f"{label} proxy new", origin_base + path, proxy, size, True)
                        )
                        found.append(
                            (f"{label} mirror new", f"{proxy}/origin{path}", None, size, True)
                        )
                return [case for case in found if args.only in case[0]]

            for server, port in servers.values():
                for name, url, via, _, fresh in cases(port):
                    warm(name, url, via)
                    # One untimed run: the row cache, the reactor's buffers.
                    run_wrk(scratch, url, via, 1, args.threads, args.connections, fresh)
            names = list(servers)
            for index, (case, _, _, size, fresh) in enumerate(cases(0)):
                runs: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
                for repeat in range(args.repeats):
                    # Alternate which server goes first: the machine's load drifts.
                    for name in names if repeat % 2 == 0 else names[::-1]:
                        server, port = servers[name]
                        _, url, via, _, _ = cases(port)[index]
                        user0, system0 = settle(server.pid)
                        served = run_wrk(
                            scratch, url, via, args.seconds, args.threads, args.connections,
                            fresh,
                        )
                        user1, system1 = settle(server.pid)
                        runs[name].append((
                            (user1 - user0) / served * 1e6,
                            (system1 - system0) / served * 1e6,
                            served,
                        ))
                for name in names:
                    per_hit = [u + s for u, s, _ in runs[name]]
                    user = statistics.median(u for u, _, _ in runs[name])
                    system = statistics.median(s for _, s, _ in runs[name])
                    results.setdefault(name, {})[case] = {
                        "cpu_us_per_hit": round(statistics.median(per_hit), 1),
                        "runs_us": [round(v, 1) for v in per_hit],
                        "user_us_per_hit": round(user, 1),
                        "system_us_per_hit": round(system, 1),
                        "requests": [n for _, _, n in runs[name]],
                        "body_bytes": size,
                    }
                    print(f"{case:16} {name:8} {statistics.median(per_hit):8.1f} us/hit"
                          f" (user {user:.1f}, system {system:.1f})"
                          f"   runs {', '.join(f'{v:.1f}' for v in per_hit)}", flush=True)
                if args.pyspy:
                    # An extra run, not counted: the sampler costs the server a little.
                    server, port = servers["current"]
                    _, url, via, _, _ = cases(port)[index]
                    Path(args.pyspy).mkdir(parents=True, exist_ok=True)
                    spy = subprocess.Popen(
                        [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                         "--nonblocking", "-r", "250", "-o",
                         str(Path(args.pyspy) / f"{case.replace(' ', '-')}.svg"),
                         "--pid", str(server.pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1)
                    run_wrk(
                        scratch, url, via, args.seconds, args.threads, args.connections, fresh
                    )
                    spy.send_signal(2)
                    spy.wait(60)
        finally:
            for server, _ in servers.values():
                stop(server)
            stop(origin)
    Path(args.json).write_text(json.dumps({
        "what": "server CPU (utime+stime, workers included) per hit, wrk -t%d -c%d"
        % (args.threads, args.connections),
        "servers": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
