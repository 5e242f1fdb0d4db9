"""
What one cold miss costs buildcache: the apk repository of
``bench/proxy.py`` step 1 (an APKINDEX and 60 packages, 10 KB to 40 MB),
fetched sequentially over one kept-alive connection through a fresh
``twistd buildcache`` mirror route, a fresh cache directory per repeat.

    python bench/misscost.py [--repeats 5] [--files 61] [--json bench/misscost.json]
                             [--nginx] [--timeline N] [--profile]

For every file it records the client's wall time (request sent, head
received, last byte) and the server's CPU over that request, from
``/proc/PID/task/*/schedstat`` (nanoseconds; the reactor thread and the
thread pool apart), and fits ``cpu = fixed + per_mb * MB`` over the files,
which splits the cost of a miss into what every miss pays and what its
bytes cost.  Wall times are noisy on a shared machine; the CPU figures are
what to compare before and after a change.

``--nginx`` also times nginx ``proxy_cache`` on the same origin (wall
only), ``--timeline N`` runs one more repeat under ``strace -f -ttt`` and
prints the server's system calls during the miss of file ``N`` (which
socket, file or SQLite call, and when, relative to the request), and
``--profile`` writes a cProfile of one repeat's server.

The origin is a local nginx (``bench/proxy.py``'s); everything listens on
127.0.0.1; every process started is stopped by its PID and the scratch
directory removed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from processes import (  # noqa: E402
    buildcache_command,
    expected_workers,
    free_port,
    machine_and_versions,
    stop,
    wait_for_port,
)
from proxy import (  # noqa: E402
    MB,
    Origin,
    Workload,
    build_workload,
    start_nginx_cache,
    start_origin,
)

READ_SIZE = 1024 * 1024


@attrs.frozen
class Miss:
    path: str
    size: int
    cache: str
    #: Seconds from sending the request to the response head, and to its
    #: last byte.
    head_s: float
    total_s: float
    #: Server CPU over the request, seconds: the reactor (main) thread,
    #: and every other thread (the store's pool).
    reactor_cpu_s: float
    pool_cpu_s: float
    sent_at: float


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid``'s main thread and of its other threads."""
    main = others = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(tid) == pid:
            main = ns
        else:
            others += ns
    return main / 1e9, others / 1e9


def start_buildcache(origin: Origin, run_dir: Path, profile: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    port, index_port = free_port(), free_port()
    log = run_dir / "server.log"
    command = [
        *buildcache_command(log, port, index_port, run_dir / "cache"),
        "--max-size", "2G",
        "--mirror", f"origin={origin.base}",
        "--registry", "docker.io=http://127.0.0.1:1",
    ]
    if profile is not None:
        # twistd's own options go before the plugin's name.
        at = command.index("buildcache")
        command[at:at] = ["--profile", str(profile), "--profiler", "cprofile", "--savestats"]
    process = subprocess.Popen(
        command, cwd=run_dir, stdout=subprocess.DEVNULL,
        stderr=open(run_dir / "stderr.log", "wb"),
    )
    wait_for_port(port, process, log, workers=expected_workers(command))
    return process, port


def fetch_all(port: int, paths: list[tuple[str, int]], prefix: str, pid: int | None) -> list[Miss]:
    """
    Fetch ``paths`` one after the other over one kept-alive connection,
    checking each length; one :class:`Miss` each.
    """
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    misses = []
    try:
        for path, size in paths:
            before = thread_cpu(pid) if pid else (0.0, 0.0)
            sent_at = time.time()
            started = time.perf_counter()
            conn.request("GET", prefix + path)
            response = conn.getresponse()
            head = time.perf_counter()
            received = 0
            while True:
                n = response.readinto(view)
                if not n:
                    break
                received += n
            end = time.perf_counter()
            after = thread_cpu(pid) if pid else (0.0, 0.0)
            if response.status != 200 or received != size:
                raise RuntimeError(f"{path}: HTTP {response.status}, {received} of {size} bytes")
            misses.append(Miss(
                path, size, response.getheader("x-cache", ""), head - started, end - started,
                after[0] - before[0], after[1] - before[1], sent_at,
            ))
    finally:
        conn.close()
    return misses


def fit(misses: list[Miss], cpu: str) -> tuple[float, float]:
    """Least squares ``cpu = fixed + per_mb * MB``: (fixed s, s per MB)."""
    xs = [m.size / MB for m in misses]
    ys = [getattr(m, cpu) for m in misses]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def summarize(misses: list[Miss], wall: float) -> dict[str, object]:
    fixed, per_mb = fit(misses, "reactor_cpu_s")
    small = [m for m in misses if m.size <= 256 * 1024]
    return {
        "wall_s": wall,
        "files": len(misses),
        "misses": sum(1 for m in misses if m.cache.upper().startswith("MISS")),
        "reactor_cpu_s": sum(m.reactor_cpu_s for m in misses),
        "pool_cpu_s": sum(m.pool_cpu_s for m in misses),
        "reactor_cpu_per_miss_ms": 1000 * sum(m.reactor_cpu_s for m in misses) / len(misses),
        "fit_fixed_ms": 1000 * fixed,
        "fit_per_mb_ms": 1000 * per_mb,
        "small_files": len(small),
        "small_median_cpu_ms": 1000 * statistics.median(m.reactor_cpu_s for m in small) if small else None,
        "small_median_total_ms": 1000 * statistics.median(m.total_s for m in small) if small else None,
        "small_median_head_ms": 1000 * statistics.median(m.head_s for m in small) if small else None,
    }


def run_buildcache(
    origin: Origin, workload: Workload, scratch: Path, label: str, files: int,
    profile: Path | None = None,
) -> tuple[dict[str, object], list[Miss]]:
    run_dir = scratch / label
    run_dir.mkdir()
    process, port = start_buildcache(origin, run_dir, profile)
    try:
        started = time.perf_counter()
        misses = fetch_all(port, workload.paths[:files], "/origin", process.pid)
        wall = time.perf_counter() - started
    finally:
        stop(process)
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return summarize(misses, wall), misses


def run_plain(port: int, prefix: str, workload: Workload, files: int) -> float:
    started = time.perf_counter()
    fetch_all(port, workload.paths[:files], prefix, None)
    return time.perf_counter() - started


def nginx_wall(origin: Origin, workload: Workload, scratch: Path, label: str, files: int) -> float:
    run_dir = scratch / label
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)
    running = start_nginx_cache(origin)(run_dir)
    try:
        return run_plain(running.port, "/origin", workload, files)
    finally:
        stop(running.process)


# ---------------------------------------------------------------- timeline

_STRACE_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)$")
_SHOWN = {
    "recvfrom", "read", "write", "writev", "sendto", "sendmsg", "sendfile",
    "pread64", "pwrite64", "fsync", "fdatasync", "rename", "renameat", "renameat2",
    "openat", "close", "epoll_wait", "futex", "unlink", "unlinkat", "fstat", "lseek",
    "newfstatat", "ftruncate",
}


def timeline(origin: Origin, workload: Workload, scratch: Path, files: int, which: int) -> list[str]:
    """
    One more repeat under strace; the server's system calls from the
    request for file ``which`` until 20 ms after its last byte, runs of
    the same call on the same descriptor folded into one line.
    """
    run_dir = scratch / "timeline"
    run_dir.mkdir()
    process, port = start_buildcache(origin, run_dir, None)
    trace = run_dir / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-ttt", "-qq", "-y", "-s", "0", "-o", str(trace), "-p", str(process.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attaches to every thread
        misses = fetch_all(port, workload.paths[:files], "/origin", None)
    finally:
        os.kill(tracer.pid, signal.SIGINT)
        tracer.wait(30)
        stop(process)
    miss = misses[which]
    start, end = miss.sent_at, miss.sent_at + miss.total_s
    lines = [
        f"file {which}: {miss.path} ({miss.size} bytes, {miss.cache}); client: head at"
        f" {1000 * miss.head_s:.2f} ms, last byte at {1000 * miss.total_s:.2f} ms (under strace)"
    ]
    folded: list[list[Any]] = []
    traced = trace.read_text(errors="replace").splitlines()
    connects = sum(1 for raw in traced if re.search(r" connect\(\d+<socket", raw))
    lines.append(f"  connections the server opened in the whole run: {connects}")
    for raw in traced:
        found = _STRACE_LINE.match(raw)
        if not found:
            continue
        tid, when, call, rest = found.groups()
        at = float(when)
        if at < start - 0.001 or at > end + 0.020 or call not in _SHOWN:
            continue
        target = re.match(r"(\d+<[^>]*>)", rest)
        what = target.group(1) if target else rest.split(",")[0][:40]
        what = re.sub(r"/tmp/[^>]*/cache/", "cache/", what)
        result = raw.rsplit("=", 1)[-1].strip() if "=" in raw else ""
        tag = "main" if int(tid) == process.pid else f"thread {tid}"
        if folded and folded[-1][1] == tag and folded[-1][2] == call and folded[-1][3] == what:
            folded[-1][4] = at
            folded[-1][5] = int(folded[-1][5]) + 1
            continue
        folded.append([at, tag, call, what, at, 1, result])
    for at, tag, call, what, last, count, result in folded:
        span = f"..{1000 * (float(last) - start):8.2f}" if count > 1 else " " * 10
        lines.append(
            f"  {1000 * (float(at) - start):8.2f}{span} ms  {tag:<13} {call:<10} x{count:<4} {what}"
            + (f" = {result}" if count == 1 else "")
        )
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return lines


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=61)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "misscost.json"))
    parser.add_argument(
        "--below", type=int, metavar="BYTES",
        help="only the index and the files smaller than this (the fixed cost alone)",
    )
    parser.add_argument("--nginx", action="store_true", help="time nginx proxy_cache too")
    parser.add_argument("--timeline", type=int, metavar="N", help="strace the miss of file N")
    parser.add_argument("--profile", action="store_true", help="cProfile one repeat's server")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-misscost-"))
    os.chmod(scratch, 0o755)
    origin: Origin | None = None
    report: dict[str, object] = {
        "environment": machine_and_versions({"nginx": ["nginx", "-v"]}),
    }
    try:
        workload = build_workload(scratch / "www")
        if args.below:
            workload = attrs.evolve(
                workload,
                packages=tuple((p, size) for p, size in workload.packages if size < args.below),
            )
        files = min(args.files, len(workload.paths))
        total = sum(size for _, size in workload.paths[:files])
        print(f"workload: {files} files, {total / MB:.1f} MB", flush=True)
        origin = start_origin(scratch, workload.www)
        direct = [run_plain(origin.running.port, "", workload, files) for _ in range(args.repeats)]
        report["direct_wall_s"] = direct
        if args.nginx:
            report["nginx_wall_s"] = [
                nginx_wall(origin, workload, scratch, f"nginx-{r}", files) for r in range(args.repeats)
            ]
        runs = []
        per_file: list[list[Miss]] = []
        for repeat in range(args.repeats):
            summary, misses = run_buildcache(origin, workload, scratch, f"bc-{repeat}", files)
            runs.append(summary)
            per_file.append(misses)
            print(
                f"repeat {repeat}: wall {summary['wall_s']:.3f} s, reactor CPU"
                f" {summary['reactor_cpu_s']:.3f} s ({summary['reactor_cpu_per_miss_ms']:.2f} ms/miss;"
                f" fit {summary['fit_fixed_ms']:.2f} ms + {summary['fit_per_mb_ms']:.2f} ms/MB),"
                f" pool CPU {summary['pool_cpu_s']:.3f} s, {summary['misses']} MISS",
                flush=True,
            )
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        medians = {k: statistics.median(float(r[k]) for r in runs if r[k] is not None) for k in keys}  # type: ignore[arg-type]
        report["buildcache_runs"] = runs
        report["buildcache_median"] = medians
        rows: list[dict[str, Any]] = [
            {
                "path": per_file[0][i].path, "size": per_file[0][i].size,
                "reactor_cpu_ms": 1000 * statistics.median(r[i].reactor_cpu_s for r in per_file),
                "pool_cpu_ms": 1000 * statistics.median(r[i].pool_cpu_s for r in per_file),
                "head_ms": 1000 * statistics.median(r[i].head_s for r in per_file),
                "total_ms": 1000 * statistics.median(r[i].total_s for r in per_file),
            }
            for i in range(files)
        ]
        report["per_file_median"] = rows
        print()
        print(f"direct wall (median of {args.repeats}): {statistics.median(direct):.3f} s")
        if args.nginx:
            print(f"nginx proxy_cache wall: {statistics.median(report['nginx_wall_s']):.3f} s")  # type: ignore[arg-type]
        print(f"buildcache wall: {medians['wall_s']:.3f} s")
        print(
            f"buildcache reactor CPU per miss: {medians['reactor_cpu_per_miss_ms']:.2f} ms"
            f" = {medians['fit_fixed_ms']:.2f} ms fixed + {medians['fit_per_mb_ms']:.2f} ms/MB;"
            f" pool threads {1000 * medians['pool_cpu_s'] / files:.2f} ms per miss"
        )
        if medians.get("small_median_cpu_ms") is not None:
            print(
                f"files <= 256 KB: median reactor CPU {medians['small_median_cpu_ms']:.2f} ms,"
                f" head at {medians['small_median_head_ms']:.2f} ms,"
                f" last byte at {medians['small_median_total_ms']:.2f} ms"
            )
        print("\nper file (median): size, reactor CPU ms, pool CPU ms, head ms, last byte ms")
        for row in rows:
            print(
                f"  {row['size']:>10}  {row['reactor_cpu_ms']:7.2f}  {row['pool_cpu_ms']:6.2f}"
                f"  {row['head_ms']:7.2f}  {row['total_ms']:8.2f}  {row['path'].rsplit('/', 1)[-1]}"
            )
        if args.profile:
            stats = scratch / "profile.stats"
            run_buildcache(origin, workload, scratch, "profiled", files, profile=stats)
            kept = Path(args.json).with_suffix(".prof")
            shutil.copy(stats, kept)
            print(f"\ncProfile of one repeat's server: {kept}")
        if args.timeline is not None:
            lines = timeline(origin, workload, scratch, files, args.timeline)
            report["timeline"] = lines
            print("\n" + "\n".join(lines))
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    finally:
        if origin is not None:
            stop(origin.running.process)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
