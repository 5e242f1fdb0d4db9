"""
Store benchmarks: start-up with 100,000 entries, insert and eviction
throughput, and the server's peak RSS while a 1 GB object streams through
a cache miss to a client.

    python bench/store.py [--entries 100000] [--big-mb 1024] [--json bench/store.json]

Prints a table and writes the figures as JSON.  All traffic stays on
127.0.0.1; the scratch directory is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processes import buildcache_command, free_port, status_kb, wait_for_port  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from buildcache.store import Store, object_name  # noqa: E402

KB = 1024
MB = 1024 * KB


def median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def build_cache(directory: str, entries: int, size: int) -> None:
    """
    A cache directory with ``entries`` objects, written directly (the
    store's own write path fsyncs each object and would take minutes).
    """
    Store.open(directory, 1 << 50, Clock()).close()
    body = b"x" * size
    rows = []
    for i in range(entries):
        key = f"bench.example/objects/{i:07d}.bin"
        name = object_name(key)
        fanout = os.path.join(directory, "objects", name[:2])
        os.makedirs(fanout, exist_ok=True)
        with open(os.path.join(fanout, name), "wb") as f:
            f.write(body)
        rows.append((key, name, size, "{}", hashlib.sha256(body).hexdigest(), i, i, i))
    db = sqlite3.connect(os.path.join(directory, "index.sqlite"))
    with db:
        db.executemany(
            "INSERT INTO entries (key, file, size, headers, sha256, fetched_at,"
            " validated_at, last_access) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.close()


def bench_startup(scratch: str, entries: int) -> dict[str, float]:
    directory = os.path.join(scratch, "startup")
    build_cache(directory, entries, 512)

    def once() -> float:
        started = time.perf_counter()
        store = Store.open(directory, 1 << 50, Clock())
        elapsed = time.perf_counter() - started
        assert store.entry_count == entries, store.entry_count
        store.close()
        return elapsed

    seconds = median_of(3, once)
    shutil.rmtree(directory)
    return {"entries": entries, "startup_s": seconds}


def bench_inserts(scratch: str, count: int, size: int, limit: int) -> dict[str, float]:
    directory = os.path.join(scratch, f"inserts-{limit}")
    clock = Clock()
    store = Store.open(directory, limit, clock)
    body = os.urandom(size)
    started = time.perf_counter()
    for i in range(count):
        clock.advance(1)
        writer = store.writer(f"bench.example/{i}")
        writer.write(body)
        writer.commit({"content-type": "application/octet-stream"})
    elapsed = time.perf_counter() - started
    evictions = store.counters.evictions
    store.close()
    shutil.rmtree(directory)
    return {
        "objects": count,
        "object_kb": size // KB,
        "seconds": elapsed,
        "objects_per_s": count / elapsed,
        "mb_per_s": count * size / MB / elapsed,
        "evictions": evictions,
        "evictions_per_s": evictions / elapsed,
    }


class _SparseFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def peak_rss_mb(pid: int) -> tuple[float, float]:
    return status_kb(pid, "VmHWM") / KB, status_kb(pid, "VmRSS") / KB


def bench_big_miss(scratch: str, size_mb: int) -> dict[str, float]:
    origin_dir = os.path.join(scratch, "origin")
    os.makedirs(origin_dir)
    with open(os.path.join(origin_dir, "big.bin"), "wb") as f:
        f.truncate(size_mb * MB)
    origin = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        lambda *a: _SparseFileHandler(*a, directory=origin_dir),
    )
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    proxy_port, index_port = free_port(), free_port()
    server = subprocess.Popen(
        buildcache_command(
            os.path.join(scratch, "server.log"), proxy_port, index_port,
            os.path.join(scratch, "cache"),
            "--max-size", f"{2 * size_mb}M",
            "--mirror", f"origin=http://127.0.0.1:{origin.server_address[1]}",
        ),
        cwd=scratch,
    )
    try:
        url = f"http://127.0.0.1:{proxy_port}/origin/big.bin"
        wait_for_port(proxy_port, server, Path(scratch) / "server.log", timeout=30)
        idle_mb = peak_rss_mb(server.pid)[1]
        started = time.perf_counter()
        curl = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download} %{http_code}", url],
            check=True, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - started
        downloaded, status = curl.stdout.split()
        assert status == "200" and int(downloaded) == size_mb * MB, curl.stdout
        peak, now = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
        origin.shutdown()
    return {
        "object_mb": size_mb,
        "seconds": elapsed,
        "mb_per_s": size_mb / elapsed,
        "idle_rss_mb": idle_mb,
        "peak_rss_mb": peak,
        "rss_after_mb": now,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "store.json"))
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="buildcache-bench-")
    try:
        results = {
            "startup": bench_startup(scratch, args.entries),
            "insert": bench_inserts(scratch, 2000, 64 * KB, 1 << 40),
            "insert_with_eviction": bench_inserts(scratch, 2000, 64 * KB, 50 * 64 * KB),
            "big_miss": bench_big_miss(scratch, args.big_mb),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    s, i, e, b = (results[k] for k in ("startup", "insert", "insert_with_eviction", "big_miss"))
    rows = [
        ("start-up, %d entries (median of 3)" % s["entries"], "%.3f s" % s["startup_s"], ""),
        ("insert 64 KB objects (fsync each)", "%.0f objects/s" % i["objects_per_s"], "%.1f MB/s" % i["mb_per_s"]),
        ("insert with eviction (50-object limit)", "%.0f objects/s" % e["objects_per_s"], "%.0f evictions/s" % e["evictions_per_s"]),
        ("%d MB cache miss through the server" % b["object_mb"], "%.2f s" % b["seconds"], "%.0f MB/s" % b["mb_per_s"]),
        ("server RSS idle / peak during miss", "%.1f MB" % b["idle_rss_mb"], "%.1f MB peak (target < 100)" % b["peak_rss_mb"]),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'result':>18}  detail")
    for name, value, detail in rows:
        print(f"{name.ljust(width)}  {value:>18}  {detail}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
