"""
Registry benchmark: pulling a container image with skopeo straight from the
origin, through the distribution registry in proxy mode, and through
buildcache's registry port, all in the same run.

    .venv/bin/python bench/registry.py [--size-mb 200] [--repeats 3] [--json bench/issue14/registry.json]

Builds a 5-layer OCI image of about ``--size-mb`` MB by hand (gzip layers
that do not compress; tests.registry_parts, as the end-to-end tests do),
pushes it with skopeo into an origin (Debian's ``docker-registry``, its own
config on a free 127.0.0.1 port), and
puts nginx in front of that origin, standing for the office line: it sends
the blobs from the origin's storage at 50 MB/s per connection (a static
``limit_rate 50m``, exact to the second, where a proxied one overshoots) and
proxies the rest (``/v2/``, manifests) to the origin.  Every cache
under test has that throttled origin as its upstream.  Per contender and
repeat (a fresh server and cache directory each time), it measures:

  1. cold: one ``skopeo copy docker://... dir:DEST`` of the uncached image;
  2. warm: the same pull again from the same server, 3 times (their
     median is the repeat's figure), after a ``sync`` (the fills' writes
     are on disk), the rows taking turns pull by pull, forwards then
     backwards, so a busy moment of the machine falls on all of them.  The direct row's warm
     pulls go to the origin without the throttle (a registry on the LAN);
     the caches answer from their store (their upstream stays throttled,
     which only a manifest revalidation would touch);
  3. 8 concurrent cold pulls on another fresh server: wall time, and the
     GETs per blob that reached the origin (from the throttle's access log);
  4. peak RSS (VmHWM from /proc/PID/status) and CPU time of the server.

Medians of the repeats, ratios against the direct row, the targets of
issue 14 checked, JSON written.  All traffic stays on 127.0.0.1: the
registries.conf the clients use names no registry, every image name is a
loopback one, and anything else would go to a dead loopback proxy.  Every
process the bench starts is stopped by its PID and the scratch directory is
removed, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from processes import (  # noqa: E402
    buildcache_command,
    cpu_seconds,
    free_port,
    machine_and_versions,
    status_kb,
    stop,
    wait_for_port,
)

from tests.registry_parts import (  # noqa: E402
    Blob,
    OciImage,
    Skopeo,
    build_image,
    registry_argv,
    write_registry_config,
)

KB = 1024
MB = 1024 * KB
HERE = Path(__file__).resolve().parent
# Shares of the image's size, largest first: base layers are big, the
# application's are small.
LAYER_SHARES = (0.35, 0.25, 0.2, 0.12, 0.08)
REPOSITORY = "bench/app"
TAG = "v1"
SLOW_RATE = "50m"
CLIENTS = 8
# Warm pulls per repeat: the client's own work (hashing and writing the
# image) dominates them and swings by 10-20% here; their median steadies it.
# Three were too few: over runs 1-5 the warm medians of servers whose every
# request differs by milliseconds moved either way by up to 0.09 s.
WARM_PULLS = 9
PULL_TIMEOUT = 600
# Clients must reach the servers directly, whatever the shell exports.
CLIENT_ENV = {
    name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")
}


# ---------------------------------------------------------------- the image


@attrs.frozen
class Image:
    """The bench's image: what skopeo pulls and what the bench checks it got."""

    oci: OciImage

    @property
    def layers(self) -> tuple[Blob, ...]:
        return self.oci.manifests[0].layers

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The config and the layers: the blobs a pull GETs."""
        return tuple(self.oci.blobs().values())

    @property
    def total_bytes(self) -> int:
        return self.oci.size + self.oci.top.size


def bench_image(layout: Path, size_mb: int) -> Image:
    """The 5-layer image of about ``size_mb`` MB (gzip of bytes deflate cannot shrink)."""
    sizes = [int(size_mb * MB * share) for share in LAYER_SHARES]
    return Image(build_image(layout, TAG, sizes, seed=b"bench/registry"))


# ---------------------------------------------------------------- processes


@attrs.define
class Server:
    """A server the bench started: its process, log and port."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int

    def peak_rss_mb(self) -> float:
        return status_kb(self.process.pid, "VmHWM") / KB

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)

    def log_problems(self, limit: int = 10) -> list[str]:
        """Lines of its log that mention an error (buildcache's; the others log noise)."""
        if self.log.name != "server.log" or not self.log.exists():
            return []
        pattern = re.compile(r"error|traceback|unhandled|exception|failed|critical", re.I)
        lines = self.log.read_text(errors="replace").splitlines()
        return [line[:300] for line in lines if pattern.search(line)][:limit]


def launch(command: list[str], log: Path, port: int, cwd: Path) -> Server:
    """Start ``command`` (output to ``cwd``/output.log) and wait until it listens on ``port``."""
    with open(cwd / "output.log", "ab") as output:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )
    wait_for_port(port, process, log)
    return Server(process, log, port)


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        stop(server.process)


def start_distribution(directory: Path, remote: str | None) -> Server:
    """
    Debian's docker-registry on a free port (storage in
    ``directory``/storage); a pull-through proxy of ``remote`` if given.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = write_registry_config(directory, port, remote)
    return launch(registry_argv(config), directory / "output.log", port, directory)


@attrs.define
class Throttle:
    """nginx in front of the origin, sending at SLOW_RATE per connection, logging every request."""

    server: Server
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def mark(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests_since(self, mark: int, settle: float = 0.3) -> list[tuple[str, str, int]]:
        """
        (method, path, status) logged after ``mark``.  nginx logs a request
        when it ends, so wait until the count holds still.
        """
        def read() -> list[tuple[str, str, int]]:
            with open(self.access_log, "rb") as f:
                f.seek(mark)
                lines = f.read().decode(errors="replace").splitlines()
            return [(m, p, int(s)) for m, p, s, *_ in (line.split() for line in lines)]

        previous = read()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(settle)
            now = read()
            if len(now) == len(previous):
                return now
            previous = now
        return previous


def start_throttle(directory: Path, origin: Server, origin_storage: Path) -> Throttle:
    directory.mkdir()
    port = free_port()
    access_log = directory / "access.log"
    conf = directory / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        daemon off;
        master_process on;
        worker_processes 1;
        user root root;
        pid {directory}/nginx.pid;
        error_log {directory}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            client_body_temp_path {directory}/client_body;
            proxy_temp_path {directory}/proxy_temp;
            log_format bench '$request_method $uri $status $body_bytes_sent $request_time';
            access_log {access_log} bench;
            keepalive_requests 1000000;
            server {{
                listen 127.0.0.1:{port};
                # Blobs: nginx sends them from the origin's own storage, as
                # a static file at limit_rate, which it keeps to the byte per
                # second (proxied responses overshoot it by 50% and more).
                location ~ "^/v2/.+/blobs/sha256:(([0-9a-f]{{2}})[0-9a-f]{{62}})$" {{
                    alias {origin_storage}/docker/registry/v2/blobs/sha256/$2/$1/data;
                    default_type application/octet-stream;
                    add_header Docker-Content-Digest sha256:$1;
                    sendfile on;
                    tcp_nopush off;
                    limit_rate {SLOW_RATE};
                }}
                # The rest (/v2/, manifests, tags) is the origin's answer.
                location / {{
                    proxy_pass http://127.0.0.1:{origin.port};
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Host $http_host;
                    proxy_buffering off;
                }}
            }}
        }}
        """))
    server = launch(
        ["nginx", "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
        directory / "error.log", port, directory,
    )
    return Throttle(server, access_log)


def buildcache_help() -> str:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    done = subprocess.run([twistd, "buildcache", "--help"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def start_buildcache(directory: Path, throttle: Throttle) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    port, index_port, registry_port = free_port(), free_port(), free_port()
    command = [
        *buildcache_command(
            directory / "server.log", port, index_port, directory / "cache",
            registry_port=registry_port,
        ),
        "--max-size", "4G",
        # One-word-free names on this port go to docker.io, which is the
        # throttled origin here: no request can leave the machine.
        "--registry", f"docker.io={throttle.url}",
        "--allow-upstream", "127.0.0.1",
    ]
    return launch(command, directory / "server.log", registry_port, directory)


# ---------------------------------------------------------------- the client


@attrs.frozen
class Client:
    """
    skopeo with tests.registry_parts' private configuration: a
    registries.conf naming no registry (every name here is a loopback
    one), a policy accepting anything, no auth file, HOME and TMPDIR of its
    own, and a dead proxy for anything not on loopback.
    """

    skopeo: Skopeo

    def push(self, image: Image, registry: Server) -> None:
        self.skopeo.push(image.oci, f"127.0.0.1:{registry.port}/{REPOSITORY}:{TAG}")

    def pull(self, port: int, image: Image, destinations: list[Path]) -> float:
        """
        Pull the image into every destination at once (one skopeo process
        each), check every blob arrived whole, remove the copies, and return
        the wall time of the slowest.
        """
        source = f"127.0.0.1:{port}/{REPOSITORY}:{TAG}"
        began = time.perf_counter()
        processes = [
            subprocess.Popen(
                self.skopeo.argv(*self.skopeo.pull_arguments(source, destination)),
                env=self.skopeo.environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for destination in destinations
        ]
        failures = []
        for process in processes:
            try:
                _, error = process.communicate(timeout=PULL_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop(process)
                error = b"timed out"
            if process.returncode != 0:
                failures.append(error.decode(errors="replace").strip()[-500:])
        elapsed = time.perf_counter() - began
        try:
            if failures:
                raise RuntimeError(f"{len(failures)} of {len(processes)} pulls failed: {failures[0]}")
            for destination in destinations:
                check_copy(destination, image)
        finally:
            for destination in destinations:
                shutil.rmtree(destination, ignore_errors=True)
        return elapsed


def check_copy(destination: Path, image: Image) -> None:
    """skopeo's dir: copy holds every blob at its size (skopeo checked the digests)."""
    for blob in image.blobs:
        path = destination / blob.digest.removeprefix("sha256:")
        if not path.exists() or path.stat().st_size != blob.size:
            raise RuntimeError(f"{destination.name}: {blob.digest} missing or truncated")


# ---------------------------------------------------------------- measuring


@attrs.frozen
class Contender:
    """A row of the table: how to start a fresh server; None for the direct pulls."""

    name: str
    kind: str
    start: Callable[[Path], Server] | None


def upstream_counts(requests: list[tuple[str, str, int]], image: Image) -> dict[str, object]:
    """What reached the origin: GETs per blob, and the rest by kind."""
    gets: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for method, path, _status in requests:
        match = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", path)
        if match and method == "GET":
            gets[match.group(1)] += 1
        elif match:
            other[f"{method} blob"] += 1
        elif "/manifests/" in path:
            other[f"{method} manifest"] += 1
        elif method == "-":
            # skopeo tries TLS first on an insecure registry: nginx answers
            # the handshake 400 without a request line.
            other["TLS attempt (400)"] += 1
        else:
            other[f"{method} {path}"] += 1
    per_blob = [gets[blob.digest] for blob in image.blobs]
    return {
        "blob_gets_per_blob": per_blob,
        "blob_gets_max": max(per_blob),
        "blob_gets_min": min(per_blob),
        "other_requests": dict(other),
    }


def settle() -> None:
    """Write back every dirty page now, so no measurement pays for an earlier one's writes."""
    os.sync()


@attrs.define
class Trial:
    """One row's repeat: its server of the moment and what it measured."""

    contender: Contender
    label: str
    server: Server | None = None
    result: dict[str, object] = attrs.Factory(dict)
    rss: list[float] = attrs.Factory(list)
    cpu: dict[str, float] = attrs.Factory(dict)
    problems: list[str] = attrs.Factory(list)
    warm: list[float] = attrs.Factory(list)
    warm_requests: list[tuple[str, str, int]] = attrs.Factory(list)

    def start(self, scratch: Path, suffix: str) -> None:
        if self.contender.start:
            self.server = self.contender.start(scratch / f"{self.label}-{suffix}")

    def port(self, otherwise: int) -> int:
        return self.server.port if self.server else otherwise

    def stop(self) -> None:
        if self.server:
            self.rss.append(self.server.peak_rss_mb())
            stop(self.server.process)
            self.problems += self.server.log_problems()
            self.server = None


def one_repeat(
    contenders: list[Contender], repeat: int, image: Image, skopeo: Client,
    origin: Server, throttle: Throttle, scratch: Path, errors: dict[str, str],
) -> dict[str, dict[str, object]]:
    """
    One repeat of every row: a fresh server each, one cold pull each, then
    the warm pulls taking turns between the rows (so a busy moment of the
    machine falls on all of them alike), then per row CLIENTS cold pulls on
    another fresh server.  A row that fails is named in ``errors`` and left
    out from then on.
    """
    pulls = scratch / "pulls"
    pulls.mkdir(exist_ok=True)
    trials = [
        Trial(c, f"{c.name.replace(' ', '-')}-{repeat}") for c in contenders if c.name not in errors
    ]

    def each(step: Callable[[Trial], None], backwards: bool = False) -> None:
        for trial in trials[::-1] if backwards else trials:
            if trial.contender.name in errors:
                continue
            try:
                step(trial)
            except Exception as error:  # one row failing must not hide the others
                errors[trial.contender.name] = str(error)
                print(f"{trial.contender.name}: FAILED: {error}", flush=True)
                trial.stop()

    def cold(trial: Trial) -> None:
        settle()
        mark = throttle.mark()
        trial.result["cold_s"] = skopeo.pull(trial.port(throttle.server.port), image, [pulls / "cold"])
        trial.result["cold_upstream"] = upstream_counts(throttle.requests_since(mark), image)
        trial.cpu["cold"] = trial.server.cpu_s() if trial.server else 0.0

    def warm(trial: Trial) -> None:
        mark = throttle.mark()
        # Direct: the warm pulls go to the origin itself, unthrottled.
        trial.warm.append(skopeo.pull(trial.port(origin.port), image, [pulls / "warm"]))
        trial.warm_requests += throttle.requests_since(mark)

    def concurrent(trial: Trial) -> None:
        trial.start(scratch, "concurrent")
        settle()
        mark = throttle.mark()
        trial.result["concurrent_s"] = skopeo.pull(
            trial.port(throttle.server.port), image, [pulls / f"client{n}" for n in range(CLIENTS)],
        )
        trial.result["concurrent_upstream"] = upstream_counts(throttle.requests_since(mark), image)
        if trial.server:
            trial.cpu["concurrent"] = trial.server.cpu_s()
        trial.stop()

    try:
        each(lambda trial: trial.start(scratch, "single"))
        each(cold)
        # The fills just wrote 200 MB per cache: the kernel writing them
        # back would slow whichever warm pull it overlaps (the last row's,
        # mostly).  A warm pull comes long after its fill.
        settle()
        for turn in range(WARM_PULLS):
            each(warm, backwards=turn % 2 == 1)
        settle()
        for trial in trials:
            if trial.server and trial.warm:
                trial.cpu["warm_each"] = (trial.server.cpu_s() - trial.cpu["cold"]) / len(trial.warm)
            trial.stop()
        each(concurrent)
    finally:
        for trial in trials:
            trial.stop()
    results = {}
    for trial in trials:
        if trial.contender.name not in errors:
            results[trial.contender.name] = {
                **trial.result,
                "warm_pulls_s": trial.warm,
                "warm_s": statistics.median(trial.warm),
                "warm_upstream": upstream_counts(trial.warm_requests, image),
                "peak_rss_mb": max(trial.rss) if trial.rss else None,
                "server_cpu_s": trial.cpu if trial.contender.start else None,
                "log_problems": trial.problems,
            }
        for directory in scratch.glob(f"{trial.label}-*"):
            shutil.rmtree(directory, ignore_errors=True)
    return results


def summarise(repeats: list[dict[str, object]]) -> dict[str, object]:
    def median(key: str) -> float:
        return statistics.median(float(r[key]) for r in repeats)  # type: ignore[arg-type]

    def worst(key: str, field: str) -> int:
        return max(int(r[key][field]) for r in repeats)  # type: ignore[index]

    rss = [r["peak_rss_mb"] for r in repeats if r["peak_rss_mb"] is not None]
    return {
        "cold_s": median("cold_s"),
        "warm_s": median("warm_s"),
        "concurrent_s": median("concurrent_s"),
        # Every repeat's figure, to see the spread the medians hide.
        "cold_all": [r["cold_s"] for r in repeats],
        "warm_all": [t for r in repeats for t in r["warm_pulls_s"]],  # type: ignore[attr-defined]
        "concurrent_all": [r["concurrent_s"] for r in repeats],
        "cold_blob_gets_max": worst("cold_upstream", "blob_gets_max"),
        "warm_blob_gets_max": worst("warm_upstream", "blob_gets_max"),
        "concurrent_blob_gets_max": worst("concurrent_upstream", "blob_gets_max"),
        "concurrent_blob_gets_min": min(int(r["concurrent_upstream"]["blob_gets_min"]) for r in repeats),  # type: ignore[index]
        "peak_rss_mb": max(rss) if rss else None,  # type: ignore[type-var]
        "log_problems": [line for r in repeats for line in r["log_problems"]][:20],  # type: ignore[attr-defined]
        "repeats": repeats,
    }


def check_rate(throttle: Throttle, image: Image) -> float:
    """MB/s of one curl download of the largest layer through the throttle."""
    largest = max(image.layers, key=lambda blob: blob.size)
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}",
         f"{throttle.url}/v2/{REPOSITORY}/blobs/{largest.digest}"],
        capture_output=True, text=True, check=True, env=CLIENT_ENV, timeout=PULL_TIMEOUT,
    )
    speed, size = done.stdout.split()
    if int(size) != largest.size:
        raise RuntimeError(f"throttle check: got {size} bytes of {largest.size}")
    return float(speed) / MB


# ---------------------------------------------------------------- report


def targets(results: dict[str, dict[str, object]]) -> dict[str, bool | None]:
    direct, proxy, ours = (results.get(name) for name in ("direct", "distribution proxy", "buildcache"))
    if not ours or "error" in ours or not direct or "error" in direct:
        return {}

    def value(row: dict[str, object] | None, key: str) -> float | None:
        return None if not row or "error" in row else float(row[key])  # type: ignore[arg-type]

    def no_slower(key: str) -> bool | None:
        theirs = value(proxy, key)
        return None if theirs is None else float(ours[key]) <= theirs  # type: ignore[arg-type]

    return {
        "warm <= 1.1x direct": float(ours["warm_s"]) <= 1.1 * float(direct["warm_s"]),  # type: ignore[arg-type]
        "warm no slower than distribution proxy": no_slower("warm_s"),
        "cold (throttled) <= 1.1x direct": float(ours["cold_s"]) <= 1.1 * float(direct["cold_s"]),  # type: ignore[arg-type]
        "cold no slower than distribution proxy": no_slower("cold_s"),
        f"{CLIENTS} concurrent cold: exactly 1 upstream GET per blob": (
            ours["concurrent_blob_gets_max"] == 1 and ours["concurrent_blob_gets_min"] == 1
        ),
        "peak RSS < 150 MB": ours["peak_rss_mb"] is not None and float(ours["peak_rss_mb"]) < 150,  # type: ignore[arg-type]
    }


def print_table(results: dict[str, dict[str, object]], checks: dict[str, bool | None]) -> list[str]:
    """Print the table (markdown) and return its lines."""
    direct = results.get("direct", {})

    def ratio(row: dict[str, object], key: str) -> str:
        if "error" in row:
            return "failed"
        if "error" in direct or key not in direct:
            return f"{row[key]:.2f}"
        return f"{row[key]:.2f} ({float(row[key]) / float(direct[key]):.2f}x)"  # type: ignore[arg-type]

    columns = [
        ("cold, 1 pull (s)", lambda r: ratio(r, "cold_s")),
        (f"warm, pulls 2-{WARM_PULLS + 1} (s)", lambda r: ratio(r, "warm_s")),
        (f"{CLIENTS} concurrent cold (s)", lambda r: ratio(r, "concurrent_s")),
        ("cold: GETs per blob upstream", lambda r: "-" if "error" in r else f"{r['cold_blob_gets_max']}"),
        (f"{CLIENTS} cold: GETs per blob upstream", lambda r: "-" if "error" in r else (
            f"{r['concurrent_blob_gets_min']}" if r["concurrent_blob_gets_min"] == r["concurrent_blob_gets_max"]
            else f"{r['concurrent_blob_gets_min']}-{r['concurrent_blob_gets_max']}")),
        ("warm: blob GETs upstream", lambda r: "-" if "error" in r else f"{r['warm_blob_gets_max']}"),
        ("peak RSS (MB)", lambda r: "-" if "error" in r or r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"),
    ]
    lines = [
        "| | " + " | ".join(title for title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(render(row) for _, render in columns) + " |")
    lines.append("")
    for name, row in results.items():
        if "error" not in row:
            lines.append(f"- {name}, every repeat (s): " + "; ".join(
                f"{what} " + ", ".join(f"{v:.2f}" for v in row[key])  # type: ignore[attr-defined]
                for what, key in (("cold", "cold_all"), ("warm", "warm_all"),
                                  (f"{CLIENTS} concurrent", "concurrent_all"))
            ))
    for name, row in results.items():
        if "error" in row:
            lines.append(f"\n{name} failed: {row['error']}")
        elif row.get("log_problems"):
            lines.append(f"\n{name} log lines mentioning errors:")
            lines += [f"    {line}" for line in row["log_problems"]]  # type: ignore[attr-defined]
    if checks:
        lines.append("")
        for target, passed in checks.items():
            lines.append(f"- {'n/a ' if passed is None else 'PASS' if passed else 'FAIL'}  {target}")
    print("\n".join(lines))
    return lines


def versions() -> dict[str, str]:
    return machine_and_versions({
        "skopeo": ["skopeo", "--version"],
        "docker-registry": ["docker-registry", "--version"],
        "nginx": ["nginx", "-v"],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(HERE / "issue14" / "registry.json"))
    parser.add_argument("--only", action="append", help="run only this row (repeatable)")
    args = parser.parse_args()
    # "kill PID" should clean up like Ctrl-C does: unwind through finally.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    for tool in ("docker-registry", "skopeo", "nginx", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"missing {tool} (Debian: docker-registry skopeo nginx-light curl)")
    began = time.monotonic()
    environment = versions()
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-registry-bench-"))
    try:
        image = bench_image(scratch / "layout", args.size_mb)
        print(f"image: {len(image.layers)} layers, {image.total_bytes / MB:.1f} MB, "
              f"built in {time.monotonic() - began:.1f} s", flush=True)
        with running(start_distribution(scratch / "origin", None)) as origin, \
                running((throttle := start_throttle(scratch / "throttle", origin, scratch / "origin" / "storage")).server):
            skopeo = Client(Skopeo(scratch / "client"))
            skopeo.push(image, origin)
            rate = check_rate(throttle, image)
            print(f"throttled origin: {rate:.1f} MB/s on one connection (limit_rate {SLOW_RATE})", flush=True)
            contenders = [
                Contender("direct", "skopeo straight from the origin", None),
                Contender("distribution proxy", "docker-registry, proxy.remoteurl = the throttled origin",
                          lambda d: start_distribution(d, throttle.url)),
            ]
            if "--registry-port" in buildcache_help():
                contenders.append(Contender("buildcache", "--registry docker.io=the throttled origin",
                                            lambda d: start_buildcache(d, throttle)))
            else:
                print("buildcache: `twistd buildcache --help` shows no --registry-port on this tree;"
                      " its row is skipped", flush=True)
            contenders = [c for c in contenders if not args.only or c.name in args.only]
            repeats: dict[str, list[dict[str, object]]] = {c.name: [] for c in contenders}
            errors: dict[str, str] = {}
            # Repeats interleave the rows, so a drift of the machine spreads
            # over all of them.
            for repeat in range(args.repeats):
                started_at = time.monotonic()
                for name, result in one_repeat(
                    contenders, repeat, image, skopeo, origin, throttle, scratch, errors,
                ).items():
                    repeats[name].append(result)
                print(f"repeat {repeat + 1} in {time.monotonic() - started_at:.0f} s", flush=True)
        results: dict[str, dict[str, object]] = {
            c.name: {"kind": c.kind, "error": errors[c.name]} if c.name in errors
            else {"kind": c.kind, **summarise(repeats[c.name])}
            for c in contenders
        }
        checks = targets(results)
        print()
        table = print_table(results, checks)
        environment["loadavg_at_end"] = open("/proc/loadavg").read().strip()
        report = {
            "environment": environment,
            "image": {
                "layers_mb": [round(blob.size / MB, 1) for blob in image.layers],
                "total_mb": image.total_bytes / MB,
                "slow_rate": SLOW_RATE,
                "measured_throttle_mb_per_s": rate,
                "clients": CLIENTS,
                "repeats": args.repeats,
            },
            "results": results,
            "targets": checks,
            "table": table,
            "runtime_s": time.monotonic() - began,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json} after {report['runtime_s']:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
