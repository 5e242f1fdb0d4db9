"""
How long the reactor stops while a large stored ``APKINDEX.tar.gz`` is
parsed for the first time (an apk package checked against a new index
version): parsed on the reactor thread (``run_here``, how it was) and in
the store's threads (how the server does it); and how much memory a parsed
index costs.

    python bench/apkindex.py [--entries 25000] [--repeats 3] [--json bench/apkindex.json]

A synthetic index of ``--entries`` packages (Alpine's community index has
about 25,000) is stored in a scratch cache; a 1 ms ``LoopingCall`` records
the longest gap between its ticks while one package is looked up.

Memory: each case runs in a child process that builds its index bytes,
resets its peak RSS (``/proc/self/clear_refs``), parses, and reports its
RSS kept afterwards and its peak, both above what it had before the parse:
the full parse (``parse_apkindex``, every field: what was kept per index
before the compact form) against the compact form the server keeps
(``parse_compact_apkindex``), for 25,000 and 200,000 entries (the bound),
for the 1M-entry index of 49 MiB inflated an attacker can send (the
compact parse refuses it at the bound), and 16 directories of 25,000
looked up through ``ApkIndexes`` (the server's cache, bounded in bytes).

Prints tables and writes the figures as JSON; the scratch directory is
removed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from buildcache.ecosystems.apk.check import ApkIndexes  # noqa: E402
from buildcache.engine.keys import cache_key  # noqa: E402
from buildcache.store import Store, in_thread_pool, run_here  # noqa: E402
from tests.apkrepo import gzip_tar  # noqa: E402

BASE = "http://mirror.test/alpine/v3.20/main/x86_64"
# Any well-formed control checksum: the lookup does not verify packages.
CONTROL_CHECKSUM = "Q1YLd2JxG9/LvuLOv+OLzFgc3lh3k="


def minimal_index(entries: int) -> bytes:
    """
    The smallest well-formed blocks: 1M of them inflate to about 49 MiB.
    """
    blocks = "".join(
        f"C:{CONTROL_CHECKSUM}\nP:p{i}\nV:1-r0\nS:1\n\n" for i in range(entries)
    )
    return gzip_tar({"APKINDEX": blocks.encode()})


def synthetic_index(entries: int) -> bytes:
    blocks = "".join(
        f"C:{CONTROL_CHECKSUM}\nP:pkg{i}\nV:1.{i}-r0\nA:x86_64\nS:{1000 + i}\n"
        f"I:{4000 + i}\nT:package {i}\nU:http://127.0.0.1/\nL:MIT\no:pkg{i}\n"
        f"t:1700000000\nD:so:libc.musl-x86_64.so.1\n\n"
        for i in range(entries)
    )
    return gzip_tar({"DESCRIPTION": b"synthetic", "APKINDEX": blocks.encode()})


async def one_lookup(index: bytes, threaded: bool, scratch: str) -> dict[str, float]:
    pool = ThreadPool(1, 4, "bench-store")
    pool.start()
    store = Store.open(
        tempfile.mkdtemp(dir=scratch), 1 << 30, reactor,
        run_blocking=in_thread_pool(reactor, pool) if threaded else run_here,
    )
    try:
        writer = store.writer(cache_key(f"{BASE}/APKINDEX.tar.gz"))
        writer.write(index)
        writer.commit({})
        gaps: list[float] = []
        last = [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now

        ticker = task.LoopingCall(tick)
        ticker.start(0.001)
        await task.deferLater(reactor, 0.05, lambda: None)
        gaps.clear()
        last[0] = time.perf_counter()
        started = time.perf_counter()
        entry = await ApkIndexes(store).entry_for(f"{BASE}/pkg7-1.7-r0.apk", cache_key)
        lookup = time.perf_counter() - started
        await task.deferLater(reactor, 0.005, lambda: None)
        ticker.stop()
        if entry is None:
            raise RuntimeError("the package was not found in the synthetic index")
        return {"lookup_s": lookup, "longest_gap_ms": max(gaps) * 1000}
    finally:
        store.close()
        pool.stop()


async def measure(entries: int, repeats: int) -> dict[str, Any]:
    index = synthetic_index(entries)
    scratch = tempfile.mkdtemp(prefix="bench-apkindex-")
    try:
        rows: dict[str, list[dict[str, float]]] = {"reactor thread": [], "store threads": []}
        for _ in range(repeats):
            rows["reactor thread"].append(await one_lookup(index, False, scratch))
            rows["store threads"].append(await one_lookup(index, True, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "entries": entries,
        "index_bytes": len(index),
        "repeats": repeats,
        "results": {
            name: {
                "median_lookup_s": statistics.median(r["lookup_s"] for r in runs),
                "median_longest_gap_ms": statistics.median(r["longest_gap_ms"] for r in runs),
                "runs": runs,
            }
            for name, runs in rows.items()
        },
    }


def _directory(n: int) -> str:
    return BASE.replace("mirror.test", f"mirror{n}.test")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(case: str, form: str, entries: int) -> dict[str, Any]:
    """
    One memory case, in this (fresh) process.
    """
    from buildcache.ecosystems.apk.index import (
        ApkIndexError,
        parse_apkindex,
        parse_compact_apkindex,
    )

    make = minimal_index if case == "minimal" else synthetic_index
    index = make(entries)
    kept: list[Any] = []
    outcome: dict[str, Any] = {"case": case, "form": form, "entries": entries,
                               "index_bytes": len(index)}
    if form == "cache of 16 directories":
        scratch = tempfile.mkdtemp(prefix="bench-apkindex-")
        store = Store.open(scratch, 1 << 30, reactor)
        for n in range(16):
            writer = store.writer(cache_key(f"{_directory(n)}/APKINDEX.tar.gz"))
            writer.write(index)
            writer.commit({})
        indexes = ApkIndexes(store)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    try:
        if form == "full":
            kept.append(parse_apkindex(io.BytesIO(index)))
        elif form == "compact":
            kept.append(parse_compact_apkindex(io.BytesIO(index)))
        else:
            for n in range(16):
                done = ensureDeferred(
                    indexes.entry_for(f"{_directory(n)}/pkg7-1.7-r0.apk", cache_key)
                )
                kept.append(done)
            outcome["kept_indexes"] = indexes.kept()
            outcome["kept_index_bytes"] = indexes.kept_bytes
    except ApkIndexError as e:
        outcome["refused"] = str(e)
    outcome["parse_s"] = time.perf_counter() - started
    outcome["kept_rss_mb"] = (_status_kb("VmRSS") - before) / 1024
    outcome["peak_rss_above_start_mb"] = (_status_kb("VmHWM") - before) / 1024
    outcome["peak_rss_mb"] = _status_kb("VmHWM") / 1024
    if form == "cache of 16 directories":
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome


MEMORY_CASES = (
    ("synthetic", "full", 25_000),
    ("synthetic", "compact", 25_000),
    ("synthetic", "full", 200_000),
    ("synthetic", "compact", 200_000),
    ("minimal", "full", 1_000_000),
    ("minimal", "compact", 1_000_000),
    ("synthetic", "cache of 16 directories", 25_000),
)


def measure_memory() -> list[dict[str, Any]]:
    rows = []
    for case, form, entries in MEMORY_CASES:
        finished = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", case, form, str(entries)],
            check=True, capture_output=True, text=True,
        )
        rows.append(json.loads(finished.stdout))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--entries", type=int, default=25_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "apkindex.json")
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, form, entries = args.child
        print(json.dumps(_child(case, form, int(entries))))
        return
    outcome: dict[str, Any] = {}

    async def run() -> None:
        outcome.update(await measure(args.entries, args.repeats))

    done = ensureDeferred(run())
    done.addErrback(lambda failure: outcome.update(error=failure.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if "error" in outcome:
        raise SystemExit(outcome["error"])
    outcome["memory"] = measure_memory()
    print(f"{outcome['entries']:,} entries, {outcome['index_bytes'] // 1024:,} KB compressed")
    print(f"{'parsed on':16} {'lookup s':>9} {'longest reactor gap ms':>23}")
    for name, row in outcome["results"].items():
        print(f"{name:16} {row['median_lookup_s']:9.3f} {row['median_longest_gap_ms']:23.1f}")
    print()
    print(
        f"{'index':10} {'entries':>9} {'form':24} {'parse s':>8} {'kept RSS MB':>12}"
        f" {'peak RSS above start MB':>24}  refused"
    )
    for row in outcome["memory"]:
        print(
            f"{row['case']:10} {row['entries']:9,} {row['form']:24} {row['parse_s']:8.2f}"
            f" {row['kept_rss_mb']:12.1f} {row['peak_rss_above_start_mb']:24.1f}"
            f"  {row.get('refused', '')}"
        )
    with open(args.json, "w") as f:
        json.dump(outcome, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
