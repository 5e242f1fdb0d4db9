"""
How long the reactor stops while a large stored ``APKINDEX.tar.gz`` is
parsed for the first time (an apk package checked against a new index
version): parsed on the reactor thread (``run_here``, how it was) and in
the store's threads (how the server does it).

    python bench/apkindex.py [--entries 25000] [--repeats 3] [--json bench/apkindex.json]

A synthetic index of ``--entries`` packages (Alpine's community index has
about 25,000) is stored in a scratch cache; a 1 ms ``LoopingCall`` records
the longest gap between its ticks while one package is looked up.  Prints
a table and writes the figures as JSON; the scratch directory is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from buildcache.apkcheck import ApkIndexes  # noqa: E402
from buildcache.store import Store, in_thread_pool, run_here  # noqa: E402
from buildcache.upstream import cache_key  # noqa: E402
from tests.apkrepo import gzip_tar  # noqa: E402

BASE = "http://mirror.test/alpine/v3.20/main/x86_64"
# Any well-formed control checksum: the lookup does not verify packages.
CONTROL_CHECKSUM = "Q1YLd2JxG9/LvuLOv+OLzFgc3lh3k="


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--entries", type=int, default=25_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "apkindex.json")
    )
    args = parser.parse_args()
    outcome: dict[str, Any] = {}

    async def run() -> None:
        outcome.update(await measure(args.entries, args.repeats))

    done = ensureDeferred(run())
    done.addErrback(lambda failure: outcome.update(error=failure.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    if "error" in outcome:
        raise SystemExit(outcome["error"])
    print(f"{outcome['entries']:,} entries, {outcome['index_bytes'] // 1024:,} KB compressed")
    print(f"{'parsed on':16} {'lookup s':>9} {'longest reactor gap ms':>23}")
    for name, row in outcome["results"].items():
        print(f"{name:16} {row['median_lookup_s']:9.3f} {row['median_longest_gap_ms']:23.1f}")
    with open(args.json, "w") as f:
        json.dump(outcome, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
