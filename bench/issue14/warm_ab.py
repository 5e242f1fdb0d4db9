"""
The warm pull, paired: one set of warm servers (the origin, the
distribution registry in proxy mode, buildcache; each filled by one cold
pull, then ``sync``), pulled in turns for ``--rounds`` rounds, forwards then
backwards, with the same skopeo as bench/registry.py.  Prints each row's
median and the paired difference buildcache - distribution.

    .venv/bin/python bench/issue14/warm_ab.py [--size-mb 200] [--rounds 15]

A check of bench/registry.py's warm row, whose 3x3 pulls per row cannot
tell two servers apart that differ by less than the client's own spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import registry as bench  # noqa: E402

from tests.registry_parts import Skopeo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-warm-ab-"))
    try:
        image = bench.bench_image(scratch / "layout", args.size_mb)
        with bench.running(bench.start_distribution(scratch / "origin", None)) as origin, \
                bench.running((throttle := bench.start_throttle(
                    scratch / "throttle", origin, scratch / "origin" / "storage")).server):
            client = bench.Client(Skopeo(scratch / "client"))
            client.push(image, origin)
            servers = {"direct": origin}
            try:
                servers["distribution proxy"] = bench.start_distribution(scratch / "proxy", throttle.url)
                servers["buildcache"] = bench.start_buildcache(scratch / "buildcache", throttle)
                for server in servers.values():
                    client.pull(server.port, image, [scratch / "pull"])
                bench.settle()
                times: dict[str, list[float]] = {name: [] for name in servers}
                names = list(servers)
                for turn in range(args.rounds):
                    for name in names[::-1] if turn % 2 else names:
                        times[name].append(client.pull(servers[name].port, image, [scratch / "pull"]))
            finally:
                for name, server in servers.items():
                    if name != "direct":
                        bench.stop(server.process)
        for name, values in times.items():
            print(f"{name:20} median {statistics.median(values):.3f} s   "
                  + " ".join(f"{v:.2f}" for v in values))
        differences = [ours - theirs for theirs, ours in zip(times["distribution proxy"], times["buildcache"])]
        print(f"buildcache - distribution, paired: median {statistics.median(differences):+.3f} s; "
              f"buildcache faster in {sum(d < 0 for d in differences)} of {len(differences)} rounds")
        print(f"load average: {open('/proc/loadavg').read().strip()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
