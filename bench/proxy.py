"""
Package-proxy benchmark: buildcache against squid (forward proxy) and nginx
proxy_cache (mirror route), with a direct fetch from the origin as the
baseline, on an apk-shaped workload.

    /work/venv/bin/python bench/proxy.py [--json bench/proxy.json]

Needs root (it installs squid, nginx, curl and wrk with apt-get when they
are missing, and squid drops to the user ``proxy``).  Builds a repository of
real apk packages (an APKINDEX.tar.gz and 60 packages, 10 KB to 40 MB, about
120 MB in all) with tests/apkrepo.py, serves it from a local nginx origin
and measures, for every contender:

  1. a sequential cold then warm fetch of the whole repository (median of 3,
     a fresh cache directory and a fresh server per repeat);
  2. 16 clients at once on one uncached 40 MB package that the origin sends
     at 50 MB/s per connection: upstream requests (from the origin's access
     log) and the wall time of all 16 against one direct fetch;
  3. hot throughput on the cached 40 MB package (median of 9 rounds of 10
     sequential fetches);
  4. requests per second on a cached 20 KB package, wrk -t2 -c32 -d5s;
  5. peak RSS (VmHWM) of each server.

Prints a table, checks buildcache (``--workers 2`` unless ``--workers`` says
otherwise; ``--one-worker-too`` adds the forward proxy with one process)
against the targets of issues 3 and 16, and writes everything as JSON.  All traffic stays on 127.0.0.1; every process the bench
starts is stopped by its PID and the scratch directory is removed, also on
error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processes import (  # noqa: E402
    buildcache_command,
    children_of,
    free_port,
    status_kb,
    stop,
    wait_for_port,
)

from tests.apkrepo import build_apk_of_size, write_repository  # noqa: E402

KB = 1024
MB = 1024 * KB

REPOSITORY = "alpine/v3.20/main"
ARCH = "x86_64"
PACKAGE_COUNT = 60
WORKLOAD_BYTES = 120 * MB
BIG_BYTES = 40 * MB
SMALL_BYTES = 20 * KB
SMALLEST_BYTES = 10 * KB
SLOW_RATE = "50m"
REPEATS = 3
CLIENTS = 16
HOT_FETCHES = 10
#: A round of hot fetches takes a fifth of a second: three of them swung
#: by a quarter between two nginx servers sending the same file from the
#: page cache (the origin and the proxy_cache, run 7), so nine.
HOT_ROUNDS = 9
WRK_SECONDS = 5
WRK_CONNECTIONS = 32
CURL_MAX_TIME = 120
TOOL_PACKAGES = {"squid": ["squid"], "nginx": ["nginx-light", "nginx"], "curl": ["curl"], "wrk": ["wrk"]}
# Clients must reach the servers directly, whatever the shell exports.
CLIENT_ENV = {
    name: value
    for name, value in os.environ.items()
    if not name.lower().endswith("_proxy")
}


# ---------------------------------------------------------------- tools


def ensure_tools() -> None:
    """Install the servers and clients the bench drives, if missing."""
    missing = [tool for tool in TOOL_PACKAGES if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}; run as root so the bench can apt-get them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    for tool in missing:
        for package in TOOL_PACKAGES[tool]:
            installed = subprocess.run(
                ["apt-get", "install", "-y", "-qq", package], env=env, timeout=600
            )
            if installed.returncode == 0 and shutil.which(tool):
                break
        else:
            raise SystemExit(f"could not install {tool}")


def tool_versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    import twisted

    return {
        "squid": first_line(["squid", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "cpus": str(os.cpu_count()),
    }


# ---------------------------------------------------------------- processes


@attrs.define
class Running:
    """A server the bench started: its process, log, and where it listens."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    # nginx's RSS is its master's plus its workers'.
    count_children: bool = False
    # Only buildcache's log is searched for errors to report; squid's and
    # nginx's mention harmless start-up warnings.
    scan_log: bool = False

    def peak_rss_mb(self) -> float:
        return sum(self.peak_rss_per_process_mb())

    def peak_rss_per_process_mb(self) -> list[float]:
        pids = [self.process.pid]
        if self.count_children:
            pids += children_of(self.process.pid)
        return [status_kb(pid, "VmHWM") / KB for pid in pids]

    def log_problems(self, limit: int = 12) -> list[str]:
        if not self.scan_log or not self.log.exists():
            return []
        pattern = re.compile(r"error|traceback|unhandled|exception|failed|critical", re.I)
        lines = self.log.read_text(errors="replace").splitlines()
        return [line[:300] for line in lines if pattern.search(line)][:limit]


@contextmanager
def started(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        stop(process)


# ---------------------------------------------------------------- workload


def package_sizes() -> list[int]:
    """
    60 sizes: one 40 MB, one 20 KB, and 58 spread geometrically from 10 KB
    up to whatever makes the total about 120 MB.
    """
    others = PACKAGE_COUNT - 2
    remaining = WORKLOAD_BYTES - BIG_BYTES - SMALL_BYTES

    def spread(top: float) -> list[int]:
        ratio = (top / SMALLEST_BYTES) ** (1 / (others - 1))
        return [int(SMALLEST_BYTES * ratio**i) for i in range(others)]

    low, high = float(SMALLEST_BYTES), float(BIG_BYTES)
    for _ in range(60):
        middle = (low + high) / 2
        if sum(spread(middle)) > remaining:
            high = middle
        else:
            low = middle
    return [BIG_BYTES, SMALL_BYTES, *spread(low)]


@attrs.frozen
class Workload:
    www: Path
    index: str
    packages: tuple[tuple[str, int], ...]
    big: str
    big_filename: str
    big_size: int
    small: str
    small_size: int
    index_bytes: bytes = attrs.field(repr=False)

    @property
    def paths(self) -> list[tuple[str, int]]:
        return [(self.index, len(self.index_bytes)), *self.packages]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.paths)

    def slow_repository(self, label: str) -> str:
        """
        A fresh repository under /slow/ (rate-limited by the origin) holding
        the index and the 40 MB package, so every concurrency trial is a
        true miss.  Returns the URL path of its arch directory.
        """
        directory = self.www / "slow" / label / ARCH
        directory.mkdir(parents=True)
        (directory / "APKINDEX.tar.gz").write_bytes(self.index_bytes)
        os.link(self.www / self.big.lstrip("/"), directory / self.big_filename)
        return f"/slow/{label}/{ARCH}"


def build_workload(www: Path) -> Workload:
    packages = [
        build_apk_of_size(f"bench{number:02d}", size, ARCH, number)
        for number, size in enumerate(package_sizes())
    ]
    arch_dir = write_repository(www / REPOSITORY, packages, ARCH, mtime=time.time() - 86400)
    base = f"/{REPOSITORY}/{ARCH}"
    big, small = packages[0], packages[1]
    return Workload(
        www=www,
        index=f"{base}/APKINDEX.tar.gz",
        packages=tuple((f"{base}/{apk.filename}", apk.size) for apk in packages),
        big=f"{base}/{big.filename}",
        big_filename=big.filename,
        big_size=big.size,
        small=f"{base}/{small.filename}",
        small_size=small.size,
        index_bytes=(arch_dir / "APKINDEX.tar.gz").read_bytes(),
    )


# ---------------------------------------------------------------- servers


NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes auto;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""

NGINX_HTTP_COMMON = """\
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
"""


def nginx_process(prefix: Path, config: str) -> subprocess.Popen[bytes]:
    conf = prefix / "nginx.conf"
    conf.write_text(config)
    return subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=open(prefix / "stderr.log", "wb"),
    )


@attrs.define
class Origin:
    """The nginx static origin and its access log (one line per request)."""

    running: Running
    access_log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.running.port}"

    def mark(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests_since(self, mark: int, path: str | None = None, settle: float = 0.3) -> int:
        """
        Requests logged after ``mark`` (for ``path`` only, if given).  nginx
        logs a request when it ends, so wait until the count holds still.
        """
        def count() -> int:
            with open(self.access_log, "rb") as f:
                f.seek(mark)
                lines = f.read().decode(errors="replace").splitlines()
            return sum(1 for line in lines if path is None or line.split(" ", 1)[0] == path)

        previous = count()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(settle)
            now = count()
            if now == previous:
                return now
            previous = now
        return previous

    def longest_request_s(self, mark: int, path: str) -> float:
        """The longest ``$request_time`` logged for ``path`` after ``mark``."""
        with open(self.access_log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        times = [float(line.split()[3]) for line in lines if line.split(" ", 1)[0] == path]
        return max(times, default=0.0)


def start_origin(scratch: Path, www: Path) -> Origin:
    prefix = scratch / "origin"
    prefix.mkdir()
    port = free_port()
    access_log = prefix / "access.log"
    config = NGINX_COMMON.format(prefix=prefix) + textwrap.dedent(
        f"""\
        http {{
        {NGINX_HTTP_COMMON.format(prefix=prefix)}
            log_format bench '$uri $status $body_bytes_sent $request_time';
            access_log {access_log} bench;
            server {{
                listen 127.0.0.1:{port};
                root {www};
                location / {{ }}
                location /slow/ {{ limit_rate {SLOW_RATE}; }}
            }}
        }}
        """
    )
    process = nginx_process(prefix, config)
    running = Running(process, prefix / "error.log", port, count_children=True)
    wait_for_port(port, process, prefix / "error.log")
    return Origin(running, access_log)


@attrs.frozen
class Route:
    """How a client asks a contender for an origin path."""

    base: str
    proxy: str | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def curl_options(self) -> list[str]:
        return ["-x", self.proxy] if self.proxy else []


@attrs.frozen
class Contender:
    """A column of the table: how to start a fresh server and reach it."""

    name: str
    kind: str
    # Starts a server with a fresh cache under the given directory; None for
    # the direct (uncached) baseline.
    start: Callable[[Path], Running] | None
    route: Callable[[Running | None], Route]


def start_buildcache(origin: Origin, forward_proxy: bool, workers: int) -> Callable[[Path], Running]:

    def start(run_dir: Path) -> Running:
        port, index_port = free_port(), free_port()
        log = run_dir / "server.log"
        command = [
            *buildcache_command(log, port, index_port, run_dir / "cache"),
            "--max-size", "2G",
            "--mirror", f"origin={origin.base}",
            "--workers", str(workers),
        ]
        if forward_proxy:
            command += ["--allow-upstream", "127.0.0.1"]
        process = subprocess.Popen(
            command, cwd=run_dir, stdout=subprocess.DEVNULL,
            stderr=open(run_dir / "stderr.log", "wb"),
        )
        wait_for_port(port, process, log, workers=workers)
        # With --workers N the hit workers are the server's children.
        return Running(process, log, port, count_children=True, scan_log=True)

    return start


def start_squid(origin: Origin) -> Callable[[Path], Running]:
    proxy_user = pwd.getpwnam("proxy")

    def start(run_dir: Path) -> Running:
        port = free_port()
        conf = run_dir / "squid.conf"
        conf.write_text(
            textwrap.dedent(
                f"""\
                http_port 127.0.0.1:{port}
                visible_hostname bench
                cache_effective_user proxy
                pid_filename {run_dir}/squid.pid
                cache_log {run_dir}/cache.log
                access_log none
                cache_store_log none
                coredump_dir {run_dir}
                netdb_filename none
                icp_port 0
                pinger_enable off
                shutdown_lifetime 0 seconds
                cache_dir ufs {run_dir}/cache 4096 16 256
                maximum_object_size 100 MB
                collapsed_forwarding on
                refresh_pattern APKINDEX\\.tar\\.gz$ 5 20% 5 override-lastmod
                refresh_pattern \\.apk$ 129600 100% 129600 override-expire override-lastmod ignore-reload
                refresh_pattern . 0 20% 4320
                http_access allow localhost
                http_access deny all
                """
            )
        )
        for path in [run_dir, *run_dir.rglob("*")]:
            os.chown(path, proxy_user.pw_uid, proxy_user.pw_gid)
        subprocess.run(
            ["squid", "-N", "-z", "-f", str(conf)],
            check=True, timeout=60, capture_output=True,
        )
        process = subprocess.Popen(
            ["squid", "-N", "-f", str(conf)],
            stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.log", "wb"),
        )
        wait_for_port(port, process, run_dir / "cache.log")
        return Running(process, run_dir / "cache.log", port)

    return start


def start_nginx_cache(origin: Origin) -> Callable[[Path], Running]:
    def start(run_dir: Path) -> Running:
        port = free_port()
        config = NGINX_COMMON.format(prefix=run_dir) + textwrap.dedent(
            f"""\
            http {{
            {NGINX_HTTP_COMMON.format(prefix=run_dir)}
                access_log off;
                proxy_cache_path {run_dir}/cache levels=1:2 keys_zone=bench:16m
                                 max_size=8g inactive=7d use_temp_path=off;
                server {{
                    listen 127.0.0.1:{port};
                    location /origin/ {{
                        proxy_pass {origin.base}/;
                        proxy_cache bench;
                        proxy_cache_valid 200 7d;
                        proxy_cache_revalidate on;
                        proxy_cache_lock on;
                        proxy_cache_lock_timeout 300s;
                        proxy_cache_lock_age 300s;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        add_header X-Cache $upstream_cache_status always;
                    }}
                }}
            }}
            """
        )
        process = nginx_process(run_dir, config)
        wait_for_port(port, process, run_dir / "error.log")
        return Running(process, run_dir / "error.log", port, count_children=True)

    return start


def contenders(origin: Origin, workers: int, one_worker_too: bool) -> list[Contender]:
    def mirror(running: Running | None) -> Route:
        assert running is not None
        return Route(f"http://127.0.0.1:{running.port}/origin")

    def forward(running: Running | None) -> Route:
        assert running is not None
        return Route(origin.base, proxy=f"http://127.0.0.1:{running.port}")

    single = (
        [
            Contender("bc proxy 1 worker", "forward proxy, --workers 1", start_buildcache(origin, True, 1), forward),
        ]
        if one_worker_too and workers != 1 else []
    )
    return [
        Contender("direct", "origin, no cache", None, lambda _: Route(origin.base)),
        Contender("buildcache mirror", f"mirror route, --workers {workers}", start_buildcache(origin, False, workers), mirror),
        Contender("buildcache proxy", f"forward proxy, --workers {workers}", start_buildcache(origin, True, workers), forward),
        *single,
        Contender("squid", "forward proxy", start_squid(origin), forward),
        Contender("nginx", "proxy_cache mirror", start_nginx_cache(origin), mirror),
    ]


# ---------------------------------------------------------------- clients


@attrs.frozen
class Transfer:
    status: int
    size: int
    seconds: float
    cache: str


def curl(route: Route, paths: Sequence[str], *, parallel: bool = False) -> tuple[float, list[Transfer]]:
    """
    Fetch ``paths`` with one curl process (sequentially over kept-alive
    connections, or all at once), discarding bodies.  Returns the wall time
    and one record per transfer.
    """
    command = [
        "curl", "-sS", "--max-time", str(CURL_MAX_TIME), *route.curl_options(),
        "-w", "%{http_code} %{size_download} %{time_total} %header{x-cache}\\n",
    ]
    if parallel:
        command += ["--parallel", "--parallel-immediate", "--parallel-max", str(len(paths))]
    for path in paths:
        command += ["-o", "/dev/null", route.url(path)]
    started_at = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=CLIENT_ENV, timeout=CURL_MAX_TIME + 30
    )
    elapsed = time.perf_counter() - started_at
    transfers = []
    for line in done.stdout.splitlines():
        status, size, seconds, *cache = line.split(" ", 3)
        transfers.append(Transfer(int(status), int(size), float(seconds), " ".join(cache).strip()))
    if done.returncode != 0 or len(transfers) != len(paths):
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return elapsed, transfers


def check_complete(transfers: Sequence[Transfer], sizes: Sequence[int], what: str) -> None:
    wrong = [
        (t.status, t.size, size) for t, size in zip(transfers, sizes)
        if t.status != 200 or t.size != size
    ]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} bad responses (status, got, expected): {wrong[:5]}")


def is_hit(cache: str) -> bool:
    return cache.upper().startswith("HIT") or cache.upper().startswith("TCP_HIT")


def fetch_workload(route: Route, workload: Workload) -> tuple[float, int]:
    """Sequential fetch of index + 60 packages: seconds and cache hits."""
    paths, sizes = zip(*workload.paths)
    elapsed, transfers = curl(route, paths)
    check_complete(transfers, sizes, "sequential fetch")
    return elapsed, sum(1 for t in transfers if is_hit(t.cache))


def concurrent_miss(route: Route, origin: Origin, workload: Workload, label: str) -> dict[str, float]:
    repository = workload.slow_repository(label)
    # apk always reads the index first; with it in the store, a cache that
    # checks packages against it does so during this trial too.
    _, index = curl(route, [f"{repository}/APKINDEX.tar.gz"])
    check_complete(index, [len(workload.index_bytes)], "slow repository index")
    big = f"{repository}/{workload.big_filename}"
    mark = origin.mark()
    elapsed, transfers = curl(route, [big] * CLIENTS, parallel=True)
    check_complete(transfers, [workload.big_size] * CLIENTS, f"{CLIENTS} concurrent misses")
    return {
        "seconds": elapsed,
        "upstream_requests": origin.requests_since(mark, big),
        # How long the origin took to send the file: when it is longer than
        # one direct fetch, the cache read upstream slower than the origin's
        # rate (flow control from its clients, or a busy CPU).
        "upstream_request_s": origin.longest_request_s(mark, big),
        "slowest_client_s": max(t.seconds for t in transfers),
        "fastest_client_s": min(t.seconds for t in transfers),
    }


def single_miss(route: Route, origin: Origin, workload: Workload, label: str) -> float:
    """One client, one uncached 40 MB package at the origin's slow rate."""
    repository = workload.slow_repository(label)
    curl(route, [f"{repository}/APKINDEX.tar.gz"])
    elapsed, transfers = curl(route, [f"{repository}/{workload.big_filename}"])
    check_complete(transfers, [workload.big_size], "single miss")
    return elapsed


def hot_throughput(route: Route, workload: Workload) -> float:
    rates = []
    for _ in range(HOT_ROUNDS):
        elapsed, transfers = curl(route, [workload.big] * HOT_FETCHES)
        check_complete(transfers, [workload.big_size] * HOT_FETCHES, "hot fetch")
        rates.append(HOT_FETCHES * workload.big_size / MB / elapsed)
    return statistics.median(rates)


def requests_per_second(route: Route, origin: Origin, workload: Workload, scratch: Path) -> dict[str, object]:
    command = ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{WRK_SECONDS}s"]
    if route.proxy:
        # wrk has no proxy option: send the absolute URI as the request
        # target to the proxy's address.
        script = scratch / "forward.lua"
        target = route.url(workload.small)
        host = target.split("/")[2]
        script.write_text(f'wrk.path = "{target}"\nwrk.headers["Host"] = "{host}"\n')
        command += ["-s", str(script), route.proxy + "/"]
    else:
        command.append(route.url(workload.small))
    mark = origin.mark()
    done = subprocess.run(
        command, capture_output=True, text=True, env=CLIENT_ENV, timeout=WRK_SECONDS + 30
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()[:500]}")
    rate = re.search(r"Requests/sec:\s*([\d.]+)", done.stdout)
    total = re.search(r"(\d+) requests in [^,]+, ([\d.]+)([KMGT]?B) read", done.stdout)
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", done.stdout)
    errors = re.search(r"Socket errors: (.*)", done.stdout)
    if rate is None or total is None:
        raise RuntimeError(f"wrk output not understood:\n{done.stdout}")
    return {
        "requests_per_s": float(rate.group(1)),
        "requests": int(total.group(1)),
        # A check that the answers carried the whole 20 KB body.
        "kb_per_response": float(total.group(2))
        * {"B": 1, "KB": KB, "MB": MB, "GB": MB * KB, "TB": MB * MB}[total.group(3)]
        / max(int(total.group(1)), 1)
        / KB,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
        "upstream_requests": origin.requests_since(mark),
    }


# ---------------------------------------------------------------- runs


def measure(contender: Contender, origin: Origin, workload: Workload, scratch: Path) -> dict[str, object]:
    """All measurements of one contender, with a fresh server per repeat."""
    cold, warm, warm_hits, warm_upstream, peak_rss = [], [], [], [], []
    peak_rss_process: list[float] = []
    problems: list[str] = []
    result: dict[str, object] = {"kind": contender.kind}
    for repeat in range(REPEATS):
        run_dir = scratch / f"{contender.name.replace(' ', '-')}-{repeat}"
        run_dir.mkdir()
        os.chmod(run_dir, 0o755)
        running = contender.start(run_dir) if contender.start else None
        try:
            route = contender.route(running)
            seconds, _ = fetch_workload(route, workload)
            cold.append(seconds)
            mark = origin.mark()
            seconds, hits = fetch_workload(route, workload)
            warm.append(seconds)
            warm_hits.append(hits)
            warm_upstream.append(origin.requests_since(mark))
            if repeat == REPEATS - 1:
                label = contender.name.replace(" ", "-")
                result["single_miss_s"] = statistics.median(
                    single_miss(route, origin, workload, f"{label}-single-{trial}")
                    for trial in range(REPEATS)
                )
                trials = [
                    concurrent_miss(route, origin, workload, f"{label}-{trial}")
                    for trial in range(REPEATS)
                ]
                result["concurrent_miss"] = {
                    "seconds": statistics.median(t["seconds"] for t in trials),
                    "upstream_requests_max": max(t["upstream_requests"] for t in trials),
                    "trials": trials,
                }
                result["hot_mb_per_s"] = hot_throughput(route, workload)
                result["small_hits"] = requests_per_second(route, origin, workload, run_dir)
        finally:
            if running is not None:
                per_process = running.peak_rss_per_process_mb()
                peak_rss.append(sum(per_process))
                peak_rss_process.append(max(per_process))
                result["processes"] = len(per_process)
                stop(running.process)
                problems += running.log_problems()
            shutil.rmtree(run_dir, ignore_errors=True)
    result.update(
        sequential_cold_s=statistics.median(cold),
        sequential_warm_s=statistics.median(warm),
        sequential_cold_all=cold,
        sequential_warm_all=warm,
        warm_hits=min(warm_hits),
        warm_upstream_requests=max(warm_upstream),
        peak_rss_mb=max(peak_rss) if peak_rss else None,
        peak_rss_per_process_mb=max(peak_rss_process) if peak_rss_process else None,
        log_problems=problems[:20],
    )
    return result


def direct_single_fetch(origin: Origin, workload: Workload) -> float:
    """Median time of one fetch of the 40 MB package at the origin's slow rate."""
    route = Route(origin.base)
    times = []
    for trial in range(REPEATS):
        repository = workload.slow_repository(f"single-{trial}")
        elapsed, transfers = curl(route, [f"{repository}/{workload.big_filename}"])
        check_complete(transfers, [workload.big_size], "direct single fetch")
        times.append(elapsed)
    return statistics.median(times)


def targets(results: dict[str, dict[str, object]], baseline: float) -> dict[str, dict[str, object]]:
    def measured(name: str, *keys: str) -> float | None:
        value: object = results.get(name, {})
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value if isinstance(value, (int, float)) else None

    def at_most(value: object, limit: float | None) -> bool | None:
        return None if limit is None else float(value) <= limit  # type: ignore[arg-type]

    def at_least(value: object, limit: float | None) -> bool | None:
        return None if limit is None else float(value) >= limit  # type: ignore[arg-type]

    squid_warm = measured("squid", "sequential_warm_s")
    nginx_hot = measured("nginx", "hot_mb_per_s")
    squid_small = measured("squid", "small_hits", "requests_per_s")
    nginx_small = measured("nginx", "small_hits", "requests_per_s")
    nginx_cold = measured("nginx", "sequential_cold_s")
    checks: dict[str, dict[str, object]] = {}
    for name in ("buildcache mirror", "buildcache proxy", "bc proxy 1 worker"):
        r = results.get(name)
        if not r or "concurrent_miss" not in r:
            continue
        miss = r["concurrent_miss"]
        assert isinstance(miss, dict)
        small = r["small_hits"]
        assert isinstance(small, dict)
        checks[name] = {
            "warm sequential no slower than squid": at_most(r["sequential_warm_s"], squid_warm),
            "16 misses: exactly 1 upstream request": miss["upstream_requests_max"] == 1,
            "16 misses: within 1.2x one direct fetch": miss["seconds"] <= 1.2 * baseline,
            "hot 40 MB at least half of nginx": at_least(
                r["hot_mb_per_s"], None if nginx_hot is None else 0.5 * nginx_hot
            ),
            "20 KB hits at least a quarter of squid": at_least(
                small["requests_per_s"], None if squid_small is None else 0.25 * squid_small
            ),
            "peak RSS under 100 MB per process": at_most(r["peak_rss_per_process_mb"], 100),
            "peak RSS under 250 MB for all processes": at_most(r["peak_rss_mb"], 250),
            # Issue 16's targets.
            "20 KB hits at least squid's": at_least(small["requests_per_s"], squid_small),
            "61 sequential cold files at most 2x nginx's time": at_most(
                r["sequential_cold_s"], None if nginx_cold is None else 2 * nginx_cold
            ),
            "hot 40 MB at least 0.9x nginx": at_least(
                r["hot_mb_per_s"], None if nginx_hot is None else 0.9 * nginx_hot
            ),
        }
        if nginx_small:
            # The next mark: how far from half of nginx's rate.
            checks[name]["20 KB hits / half of nginx's (next mark, ratio)"] = round(
                small["requests_per_s"] / (0.5 * nginx_small), 2
            )
    return checks


def print_table(results: dict[str, dict[str, object]], baseline: float, checks: dict[str, dict[str, object]]) -> None:
    names = list(results)

    def cell(name: str, render: Callable[[dict[str, object]], str]) -> str:
        try:
            return render(results[name])
        except (KeyError, TypeError):
            return "-"

    rows: list[tuple[str, Callable[[dict[str, object]], str]]] = [
        ("sequential cold, 61 files (s, median of 3)", lambda r: f"{r['sequential_cold_s']:.2f}"),
        ("sequential warm (s, median of 3)", lambda r: f"{r['sequential_warm_s']:.3f}"),
        ("warm pass: hits / upstream requests", lambda r: f"{r['warm_hits']} / {r['warm_upstream_requests']}"),
        ("1 miss at 50 MB/s: s (x direct)", lambda r: "%.2f (%.2fx)" % (r["single_miss_s"], r["single_miss_s"] / baseline)),  # type: ignore[operator, str-format]
        ("16 concurrent misses: upstream requests", lambda r: f"{r['concurrent_miss']['upstream_requests_max']}"),  # type: ignore[index]
        ("16 concurrent misses: wall s (x direct)", lambda r: "%.2f (%.2fx)" % (r["concurrent_miss"]["seconds"], r["concurrent_miss"]["seconds"] / baseline)),  # type: ignore[index]
        ("16 misses: upstream transfer s (origin log)", lambda r: "%.2f" % max(t["upstream_request_s"] for t in r["concurrent_miss"]["trials"])),  # type: ignore[index]
        ("hot 40 MB (MB/s, median of 9x10)", lambda r: f"{r['hot_mb_per_s']:.0f}"),
        ("20 KB hits, 32 conns (req/s)", lambda r: f"{r['small_hits']['requests_per_s']:.0f}"),  # type: ignore[index]
        ("20 KB hits: KB per response", lambda r: f"{r['small_hits']['kb_per_response']:.1f}"),  # type: ignore[index]
        ("20 KB hits: non-2xx / upstream", lambda r: f"{r['small_hits']['non_2xx']} / {r['small_hits']['upstream_requests']}"),  # type: ignore[index]
        ("peak RSS (MB, VmHWM, all processes)", lambda r: f"{r['peak_rss_mb']:.1f}" if r["peak_rss_mb"] is not None else "-"),
        ("peak RSS of one process (MB) / processes", lambda r: f"{r['peak_rss_per_process_mb']:.1f} / {r['processes']}"),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(name), 14) for name in names]
    print(f"{'':{label_width}}  " + "  ".join(f"{name:>{w}}" for name, w in zip(names, widths)))
    for label, render in rows:
        print(f"{label:{label_width}}  " + "  ".join(f"{cell(n, render):>{w}}" for n, w in zip(names, widths)))
    print(f"one direct fetch of the 40 MB package at {SLOW_RATE}/s: {baseline:.2f} s")
    for name, outcome in checks.items():
        print(f"\n{name} against the targets of issues 3 and 16:")
        for target, passed in outcome.items():
            if not isinstance(passed, (bool, type(None))):
                print(f"  info  {target}: {passed}")
                continue
            verdict = "n/a " if passed is None else "PASS" if passed else "FAIL"
            print(f"  {verdict}  {target}")
    for name, r in results.items():
        if r.get("log_problems"):
            print(f"\n{name} log lines mentioning errors:")
            for line in r["log_problems"]:  # type: ignore[attr-defined]
                print("  " + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy.json"))
    parser.add_argument("--only", action="append", help="run only this contender (repeatable)")
    parser.add_argument("--workers", type=int, default=2, help="buildcache's --workers (default 2, as issue 16 measures)")
    parser.add_argument("--one-worker-too", action="store_true", help="also run the forward proxy with --workers 1")
    args = parser.parse_args()
    # "kill PID" should clean up like Ctrl-C does: unwind through finally.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    ensure_tools()
    started_at = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-proxy-bench-"))
    # squid runs as user proxy and must reach its directory inside.
    os.chmod(scratch, 0o755)
    origin: Origin | None = None
    try:
        workload = build_workload(scratch / "www")
        print(
            f"workload: index + {len(workload.packages)} packages, "
            f"{workload.total_bytes / MB:.1f} MB, largest {workload.big_size / MB:.1f} MB, "
            f"built in {time.monotonic() - started_at:.1f} s",
            flush=True,
        )
        origin = start_origin(scratch, workload.www)
        baseline = direct_single_fetch(origin, workload)
        results: dict[str, dict[str, object]] = {}
        for contender in contenders(origin, args.workers, args.one_worker_too):
            if args.only and contender.name not in args.only:
                continue
            began = time.monotonic()
            try:
                results[contender.name] = measure(contender, origin, workload, scratch)
            except Exception as error:  # one contender failing must not hide the others
                results[contender.name] = {"kind": contender.kind, "error": str(error)}
                print(f"{contender.name}: FAILED: {error}", flush=True)
            print(f"{contender.name}: done in {time.monotonic() - began:.0f} s", flush=True)
        checks = targets(results, baseline)
        print()
        print_table(results, baseline, checks)
        report = {
            "environment": tool_versions(),
            "workload": {
                "files": len(workload.paths),
                "total_mb": workload.total_bytes / MB,
                "big_mb": workload.big_size / MB,
                "small_kb": workload.small_size / KB,
                "slow_rate": SLOW_RATE,
            },
            "buildcache_workers": args.workers,
            "direct_single_fetch_s": baseline,
            "results": results,
            "targets": checks,
            "runtime_s": time.monotonic() - started_at,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json} after {report['runtime_s']:.0f} s")
    finally:
        if origin is not None:
            stop(origin.running.process)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
