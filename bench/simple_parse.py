"""
Parsing a large simple-index project page: buildcache's own parsers
(:mod:`buildcache.ecosystems.pypi.parse`) against ``pypi-simple``.

Issue 13 asks to adopt ``pypi-simple`` only if it parses a large page no
slower and with no more memory than ours.  This generates one project page
of ``--files`` distribution files (sha256, requires-python, core metadata,
some yanked; PEP 700 size and upload time in JSON), renders it as PEP 691
JSON and as PEP 503 HTML with buildcache's renderer, and parses each body
with both libraries: the median of ``--repeats`` timed runs, and the peak
of Python allocations during one run (``tracemalloc``, measured apart from
the timed runs since tracing slows them).  ``pypi-simple`` is timed on the
same bytes, JSON decoding included (its ``from_json_data`` takes decoded
data; ours takes bytes).

It needs ``pypi-simple`` in the virtualenv (``pip install pypi-simple``),
not as a buildcache dependency.  No network, no files but the JSON result.

    .venv/bin/python bench/simple_parse.py [--files 20000] [--repeats 5] [--json bench/simple_parse.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPE_HTML,
    MEDIA_TYPE_JSON,
    ProjectFile,
    ProjectPage,
)
from buildcache.ecosystems.pypi.parse import parse_page
from buildcache.ecosystems.pypi.render import render_page

BASE_URL = "http://127.0.0.1:9/simple/bigproject/"


def generate(files: int) -> ProjectPage:
    """
    A page of ``files`` files over ``files // 10`` versions: a wheel per
    platform tag and an sdist, the way large projects look.
    """
    listed = []
    versions = []
    tags = [
        "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp311-cp311-macosx_11_0_arm64", "cp311-cp311-win_amd64",
        "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp312-cp312-macosx_11_0_arm64", "cp312-cp312-win_amd64",
        "cp313-cp313-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "cp313-cp313-macosx_11_0_arm64", "cp313-cp313-win_amd64",
    ]
    for n in range(files):
        version = f"{n // 10 // 100}.{n // 10 % 100}.0"
        if n % 10 == 0:
            versions.append(version)
            filename = f"bigproject-{version}.tar.gz"
        else:
            filename = f"bigproject-{version}-{tags[n % 10 - 1]}.whl"
        digest = f"{n:064x}"
        listed.append(ProjectFile(
            filename=filename,
            url=f"https://files.example.invalid/packages/{digest[:2]}/{digest[2:4]}/{filename}",
            hashes={"sha256": digest},
            requires_python=">=3.9" if n % 3 else ">=3.8, <4",
            yanked="broken build" if n % 97 == 0 else False,
            core_metadata={"sha256": f"{n + 1:064x}"} if not filename.endswith(".tar.gz") else False,
            size=1_000_000 + n,
            upload_time="2024-01-01T00:00:00.000000Z",
        ))
    return ProjectPage(name="bigproject", files=listed, versions=versions, last_serial=42)


def ours(media_type: str) -> Callable[[bytes], int]:
    def parse(data: bytes) -> int:
        return len(parse_page(data, media_type, BASE_URL).files)
    return parse


def theirs(media_type: str) -> Callable[[bytes], int]:
    import pypi_simple

    if media_type == MEDIA_TYPE_JSON:
        def parse(data: bytes) -> int:
            page = pypi_simple.ProjectPage.from_json_data(json.loads(data), BASE_URL)
            return len(page.packages)
    else:
        def parse(data: bytes) -> int:
            page = pypi_simple.ProjectPage.from_html(
                "bigproject", data, BASE_URL, from_encoding="utf-8"
            )
            return len(page.packages)
    return parse


def measure(parse: Callable[[bytes], int], data: bytes, repeats: int) -> dict[str, Any]:
    parse(data)  # warm up: imports, caches
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        count = parse(data)
        times.append(time.perf_counter() - start)
    gc.collect()
    tracemalloc.start()
    parse(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "files": count,
        "median_seconds": statistics.median(times),
        "times": times,
        "peak_bytes": peak,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("simple_parse.json")
    )
    options = parser.parse_args(argv)
    try:
        import pypi_simple
    except ImportError:
        print("pypi-simple is not installed: pip install pypi-simple", file=sys.stderr)
        return 2
    page = generate(options.files)
    results: dict[str, Any] = {
        "files": options.files,
        "repeats": options.repeats,
        "python": sys.version.split()[0],
        "pypi_simple": pypi_simple.__version__,
        "pages": {},
    }
    rows = []
    for label, media_type in (("JSON", MEDIA_TYPE_JSON), ("HTML", MEDIA_TYPE_HTML)):
        data = render_page(page, media_type, lambda f: f.url)
        by_parser = {}
        for name, make in (("buildcache", ours), ("pypi-simple", theirs)):
            result = measure(make(media_type), data, options.repeats)
            if result["files"] != options.files:
                raise SystemExit(f"{name} found {result['files']} files in the {label} page")
            by_parser[name] = result
            rows.append((label, len(data), name, result))
        results["pages"][label] = {"bytes": len(data), "parsers": by_parser}
    print(f"{options.files} files, median of {options.repeats} runs; peak = tracemalloc peak")
    print(f"{'page':<5} {'bytes':>10}  {'parser':<12} {'median s':>9} {'peak MB':>8}")
    for label, size, name, result in rows:
        print(
            f"{label:<5} {size:>10}  {name:<12} {result['median_seconds']:>9.3f}"
            f" {result['peak_bytes'] / 1e6:>8.1f}"
        )
    for label, entry in results["pages"].items():
        ours_, theirs_ = entry["parsers"]["buildcache"], entry["parsers"]["pypi-simple"]
        entry["time_ratio_pypi_simple_over_ours"] = (
            theirs_["median_seconds"] / ours_["median_seconds"]
        )
        entry["memory_ratio_pypi_simple_over_ours"] = theirs_["peak_bytes"] / ours_["peak_bytes"]
        print(
            f"{label}: pypi-simple takes {entry['time_ratio_pypi_simple_over_ours']:.2f}x"
            f" the time and {entry['memory_ratio_pypi_simple_over_ours']:.2f}x the memory"
        )
    options.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
