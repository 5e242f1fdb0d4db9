"""
pip-index benchmark: the full dependency closure of ``jupyter`` downloaded
with pip through buildcache's simple index, cold and warm, side by side with
devpi-server and proxpi on the same local origin, against the two baselines
``pip --no-index --find-links`` (the floor) and pip straight from the origin,
and two forwarders without a cache, which fetch every request from the
origin: nginx's ``proxy_pass`` and ``bench/forward.py`` (twisted.web and
treq, nothing else).  They measure what fetching on demand costs pip, the
part of a cold run no cache can avoid, in C and in buildcache's own stack.

    /work/venv/bin/python bench/pypi.py [--json bench/pypi.json] [--repeats 5]
        [--origin-latency-ms 20] [--origin-rate-mb 50] [--workers 2]
        [--quiet-cores 0.25] [--retries 2] [--max-wait 1800] [--no-wait]
        [--only buildcache]

With ``--origin-latency-ms`` every request to the origin waits that long
first (``bench/forward.py`` in front of nginx); with ``--origin-rate-mb``
nginx sends files at most that many MB/s per request (``limit_rate``):
together, an index across an office line.  The warm floor is then nginx
serving the same files from disk, unlimited (the ``nginx disk`` row).
The table gives, beside the times, the upstream requests pip would not
have made straight from the origin (wasted), and checks issue 16's pip
targets.

The workload is built once and kept under ``bench/tmp/`` (git-ignored):

  - ``bench/pypi-requirements.txt`` (committed) pins every project of the
    closure as ``name==version``, with the file pip chose named in a comment.
    When it is missing it is regenerated with ``pip download jupyter`` from
    pip's built-in default index (``PIP_CONFIG_FILE=/dev/null``, no ``PIP_*``
    variables), so it holds exactly the files pip picks for this Python and
    platform;
  - ``bench/tmp/files/`` holds those files, downloaded once;
  - ``bench/tmp/venvs/{devpi,proxpi}`` are virtualenvs with devpi-server and
    proxpi + gunicorn, installed with the machine's ordinary pip.

Every run then generates a static simple index (PEP 503 HTML and PEP 691
JSON pages, sha256 fragments, ``data-requires-python``, PEP 658/714
``.metadata`` files) and serves it with nginx on 127.0.0.1; nginx picks JSON
or HTML from the ``Accept`` header and logs every request, which is how
upstream requests are counted.

The client is ``pip download -r bench/pypi-requirements.txt -d <fresh dir>
--no-cache-dir`` with dependency resolution on (the pins are complete, so
the resolver reads every file's metadata and asks for nothing else), with
``PIP_CONFIG_FILE=/dev/null``, no ``PIP_*`` or proxy variables, and
``--disable-pip-version-check`` so pip does not ask the index under test for
its own page.  Each contender gets a fresh server and cache directory per
repeat (each forwarder a fresh process): a cold run, then ``--warm-runs``
warm runs against the same cache, each into a new directory and each after
a run of the warm floor (nginx from disk; on loopback, the origin).  Runs
are interleaved (the order rotates per repeat) and the median of each row's
runs is reported, with ratios to the floor and to the
direct run of the same bench, the CPU time pip and the server used, the
origin's requests (by kind, and the TCP connections they came on) and the
server's peak RSS (VmHWM, with its worker processes).  Beside the ratio
of the warm row's median to the floor's (the target), the median of each
warm run's time over that of the floor's run just before it is printed.

The machine is shared, so each run also records how much CPU other
processes took meanwhile; a run during which they took more than
``--quiet-cores`` on average is retried (up to ``--retries`` times; a cold
run with a fresh server and cache) and the least disturbed attempt counts.

Before measuring, the bench waits until no other benchmark that started
before it (any other ``bench/*.py``) is running on the machine.  All
traffic stays on 127.0.0.1; every process the bench starts is stopped by
its PID and the scratch directory is removed, also on error, Ctrl-C or
``kill``.  It takes about 8 minutes of measuring on 2 cores (more when runs
are retried), plus a few minutes the first time to build the workload.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import html
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timezone
from pathlib import Path

import attrs
from processes import (  # noqa: E402
    buildcache_command,
    children_of,
    cpu_seconds,
    expected_workers,
    free_port,
    machine_busy_seconds,
    status_kb,
    stop,
    wait_for_port,
)

try:
    from packaging.utils import (
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef, assignment]
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )

KB = 1024
MB = 1024 * KB

BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
TMP = BENCH / "tmp"
FILES = TMP / "files"
VENVS = TMP / "venvs"
REQUIREMENTS = BENCH / "pypi-requirements.txt"
ROOT_REQUIREMENT = "jupyter"

REPEATS = 5
# Warm runs per cache server and repeat, each beside a run of the warm floor
# (nginx disk): pip's own CPU time swings by 10-15% from run to run on a
# shared 2-core machine, more than the 5% the warm target allows, so one
# warm run per repeat decided the target by chance.
WARM_RUNS = 3
RETRY_PAUSE_S = 5.0
PIP_TIMEOUT = 300
INSTALL_TIMEOUT = 900
OTHER_BENCHMARKS = r"bench/[A-Za-z0-9_]+\.py"
# Issue 16's targets.
TARGET_COLD_OVER_DIRECT = 0.7  # with the origin's latency (20 ms)
TARGET_WASTED_SHARE = 0.10  # upstream requests pip never caused, buildcache cold
TARGET_WARM_OVER_DISK = 1.05  # nginx serving the same files from disk
TARGET_LOOPBACK_WAIT_OVER_TREQ_S = 0.2  # cold, loopback: pip waiting over direct
TARGET_PEAK_RSS_PROCESS_MB = 100.0
TARGET_PEAK_RSS_ALL_MB = 250.0
# buildcache's processes (--workers), as issue 16 measures.
DEFAULT_WORKERS = 2

# Packages for the anchors' virtualenvs, installed with the machine's pip.
ANCHOR_PACKAGES = {"devpi": ["devpi-server"], "proxpi": ["proxpi", "gunicorn"]}


def clean_pip_environment() -> dict[str, str]:
    """
    The environment for every pip the bench runs as a client: no machine
    configuration, no ``PIP_*`` variable, no proxy, so no other index or
    cache leaks in.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith("PIP_") and not name.lower().endswith("_proxy")
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


CLIENT_ENV = clean_pip_environment()
# The bench's own HTTP requests go to 127.0.0.1, never through a proxy.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Servers reach the origin on 127.0.0.1 directly, whatever the shell exports.
SERVER_ENV = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}


# ---------------------------------------------------------------- workload


@attrs.frozen
class Pin:
    """One project of the closure and the one file pip chose for it."""

    name: str
    version: str
    filename: str

    @property
    def path(self) -> Path:
        return FILES / self.filename


PIN_LINE = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)\s+#\s+(?P<filename>\S+)\s*$")


def name_and_version(filename: str) -> tuple[str, str]:
    if filename.endswith(".whl"):
        name, version, _, _ = parse_wheel_filename(filename)
    else:
        name, version = parse_sdist_filename(filename)
    return str(name), str(version)


def read_pins() -> list[Pin]:
    pins = []
    for line in REQUIREMENTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN_LINE.match(line)
        if match is None:
            raise SystemExit(f"{REQUIREMENTS}: cannot read pin {line!r}")
        pins.append(Pin(canonicalize_name(match["name"]), match["version"], match["filename"]))
    return pins


def pip_version() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, env=CLIENT_ENV, check=True
    )
    return done.stdout.split()[1]


def default_index_download(arguments: Sequence[str], destination: Path) -> None:
    """``pip download`` from pip's built-in default index into ``destination``."""
    shutil.rmtree(destination, ignore_errors=True)
    command = [
        sys.executable, "-m", "pip", "download", *arguments, "-d", str(destination),
        "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off", "-q",
    ]
    subprocess.run(command, env=CLIENT_ENV, check=True, timeout=INSTALL_TIMEOUT)


def resolve_closure() -> None:
    """Write the requirements file from one ``pip download jupyter``."""
    resolved = TMP / "resolve"
    print(f"resolving the closure of {ROOT_REQUIREMENT} with pip's default index ...", flush=True)
    default_index_download([ROOT_REQUIREMENT], resolved)
    pins = []
    for path in sorted(resolved.iterdir()):
        name, version = name_and_version(path.name)
        pins.append(Pin(canonicalize_name(name), version, path.name))
    pins.sort(key=lambda pin: pin.name)
    header = textwrap.dedent(
        f"""\
        # The full dependency closure of `{ROOT_REQUIREMENT}`, as `pip download {ROOT_REQUIREMENT}`
        # (pip {pip_version()}, CPython {platform.python_version()}, {platform.system()} {platform.machine()})
        # chose it from pip's default index on {date.today().isoformat()}: {len(pins)} files.
        # Written by bench/pypi.py, which serves exactly these files from its local
        # origin; the comment on each pin names the file pip chose.
        """
    )
    width = max(len(f"{pin.name}=={pin.version}") for pin in pins)
    lines = [f"{pin.name + '==' + pin.version:{width}}  # {pin.filename}" for pin in pins]
    REQUIREMENTS.write_text(header + "\n".join(lines) + "\n")
    shutil.rmtree(FILES, ignore_errors=True)
    resolved.rename(FILES)


def ensure_files(pins: Sequence[Pin]) -> None:
    """Download the pinned files once, and check pip chose the same ones."""
    if all(pin.path.is_file() for pin in pins):
        return
    print(f"downloading the {len(pins)} pinned files with pip's default index ...", flush=True)
    fetched = TMP / "fetch"
    default_index_download(["-r", str(REQUIREMENTS), "--no-deps"], fetched)
    got = sorted(path.name for path in fetched.iterdir())
    wanted = sorted(pin.filename for pin in pins)
    if got != wanted:
        raise SystemExit(
            f"pip chose other files than {REQUIREMENTS} names:\n"
            f"  unexpected: {sorted(set(got) - set(wanted))}\n  missing: {sorted(set(wanted) - set(got))}"
        )
    shutil.rmtree(FILES, ignore_errors=True)
    fetched.rename(FILES)


def ensure_workload() -> list[Pin]:
    TMP.mkdir(exist_ok=True)
    if not REQUIREMENTS.exists():
        resolve_closure()
    pins = read_pins()
    ensure_files(pins)
    return pins


def ensure_anchor_venvs() -> dict[str, str]:
    """Create the anchors' virtualenvs once; return their versions."""
    versions = {}
    for name, packages in ANCHOR_PACKAGES.items():
        venv = VENVS / name
        marker = venv / ".bench-installed"
        if not marker.exists():
            print(f"installing {', '.join(packages)} into {venv} ...", flush=True)
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *packages],
                check=True, timeout=INSTALL_TIMEOUT, env=SERVER_ENV,
            )
            marker.write_text(" ".join(packages) + "\n")
        listed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
            check=True, capture_output=True, text=True, env=CLIENT_ENV,
        )
        for entry in json.loads(listed.stdout):
            if entry["name"].lower() in packages:
                versions[entry["name"].lower()] = entry["version"]
    return versions


# ---------------------------------------------------------------- origin index


@attrs.frozen
class Distribution:
    """What the origin's pages say about one file."""

    pin: Pin
    sha256: str
    size: int
    requires_python: str | None
    metadata_sha256: str | None
    upload_time: str


def wheel_metadata(path: Path, name: str, version: str) -> bytes:
    """The METADATA file of a wheel's top-level ``.dist-info`` directory."""
    with zipfile.ZipFile(path) as wheel:
        candidates = [
            entry for entry in wheel.namelist()
            if entry.count("/") == 1 and entry.endswith(".dist-info/METADATA")
        ]
        wanted = f"{name}-{version}.dist-info".lower().replace("-", "_")
        for entry in candidates:
            if entry.split("/")[0].lower().replace("-", "_") == wanted:
                return wheel.read(entry)
        if len(candidates) == 1:
            return wheel.read(candidates[0])
    raise RuntimeError(f"{path.name}: no single .dist-info/METADATA")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_origin_tree(www: Path, pins: Sequence[Pin]) -> list[Distribution]:
    """
    A static simple index: ``/simple/`` and ``/simple/<name>/`` as
    ``index.html`` and ``index.json``, files and ``.metadata`` under
    ``/files/``, linked relatively from the pages.
    """
    files = www / "files"
    files.mkdir(parents=True)
    distributions = []
    for pin in pins:
        os.link(pin.path, files / pin.filename)
        requires_python = metadata_sha256 = None
        if pin.filename.endswith(".whl"):
            wheel_name, wheel_version = pin.filename.split("-")[:2]
            metadata = wheel_metadata(pin.path, wheel_name, wheel_version)
            (files / f"{pin.filename}.metadata").write_bytes(metadata)
            metadata_sha256 = hashlib.sha256(metadata).hexdigest()
            headers = email.parser.BytesHeaderParser().parsebytes(metadata)
            requires_python = headers.get("Requires-Python")
        stat = pin.path.stat()
        distributions.append(
            Distribution(
                pin=pin,
                sha256=sha256_of(pin.path),
                size=stat.st_size,
                requires_python=str(requires_python).strip() if requires_python else None,
                metadata_sha256=metadata_sha256,
                upload_time=datetime.fromtimestamp(stat.st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            )
        )
    simple = www / "simple"
    simple.mkdir()
    meta = {"api-version": "1.1"}
    for dist in distributions:
        page = simple / dist.pin.name
        page.mkdir()
        url = f"../../files/{dist.pin.filename}"
        attributes = f'href="{html.escape(url)}#sha256={dist.sha256}"'
        entry: dict[str, object] = {
            "filename": dist.pin.filename,
            "url": url,
            "hashes": {"sha256": dist.sha256},
            "size": dist.size,
            "upload-time": dist.upload_time,
        }
        if dist.requires_python:
            attributes += f' data-requires-python="{html.escape(dist.requires_python)}"'
            entry["requires-python"] = dist.requires_python
        if dist.metadata_sha256:
            value = f"sha256={dist.metadata_sha256}"
            attributes += f' data-core-metadata="{value}" data-dist-info-metadata="{value}"'
            entry["core-metadata"] = entry["dist-info-metadata"] = {"sha256": dist.metadata_sha256}
        (page / "index.html").write_text(
            "<!DOCTYPE html>\n<html><head>"
            '<meta name="pypi:repository-version" content="1.1">'
            f"<title>Links for {dist.pin.name}</title></head>\n<body><h1>Links for {dist.pin.name}</h1>\n"
            f"<a {attributes}>{html.escape(dist.pin.filename)}</a><br/>\n</body></html>\n"
        )
        (page / "index.json").write_text(
            json.dumps({"meta": meta, "name": dist.pin.name, "versions": [dist.pin.version], "files": [entry]})
        )
    names = sorted(dist.pin.name for dist in distributions)
    (simple / "index.html").write_text(
        '<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.1">'
        "<title>Simple index</title></head><body>\n"
        + "".join(f'<a href="{name}/">{name}</a>\n' for name in names)
        + "</body></html>\n"
    )
    (simple / "index.json").write_text(json.dumps({"meta": meta, "projects": [{"name": n} for n in names]}))
    return distributions


# ---------------------------------------------------------------- processes


@attrs.define
class Running:
    """A server the bench started: its process, its log, where it listens."""

    process: subprocess.Popen[bytes]
    log: Path
    port: int
    scan_log: bool = False

    def pids(self) -> list[int]:
        return [self.process.pid, *children_of(self.process.pid)]

    def peak_rss_mb(self) -> float:
        """VmHWM of the process plus its children (workers), in MB."""
        return sum(status_kb(pid, "VmHWM") for pid in self.pids()) / KB

    def peak_rss_process_mb(self) -> float:
        """The largest VmHWM of the process and its children, in MB."""
        return max(status_kb(pid, "VmHWM") for pid in self.pids()) / KB

    def cpu_seconds(self) -> float:
        """CPU used so far by the process and its live children."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def log_problems(self, limit: int = 20) -> list[str]:
        if not self.scan_log or not self.log.exists():
            return []
        pattern = re.compile(r"error|traceback|unhandled|exception|fail|critical|stale|mismatch", re.I)
        lines = self.log.read_text(errors="replace").splitlines()
        return [line[:400] for line in lines if pattern.search(line)][:limit]

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""


def spawn(command: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            list(command), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env if env is not None else SERVER_ENV), cwd=cwd,
        )


def listening(running: Running, workers: int = 1) -> Running:
    """
    ``running`` once it listens (and its ``workers`` processes serve);
    stopped if it never does.
    """
    wait_for_port(running.port, running.process, running.log, workers=workers)
    return running


# ---------------------------------------------------------------- origin


@attrs.frozen
class Request:
    method: str
    uri: str
    status: int
    # nginx's connection serial number: distinct values = TCP connections.
    connection: str


@attrs.define
class Origin:
    """The nginx origin and its access log, one line per request."""

    running: Running
    access_log: Path

    @property
    def index_url(self) -> str:
        return f"http://127.0.0.1:{self.running.port}/simple/"

    def mark(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests_since(self, mark: int) -> list[Request]:
        """
        Requests logged after ``mark``.  nginx logs a request when it ends,
        so wait until the count holds still.
        """
        def read() -> list[Request]:
            with open(self.access_log, "rb") as f:
                f.seek(mark)
                lines = f.read().decode(errors="replace").splitlines()
            requests = []
            for line in lines:
                method, uri, status, connection = line.split()[:4]
                requests.append(Request(method, uri, int(status), connection))
            return requests

        previous = read()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = read()
            if len(now) == len(previous):
                return now
            previous = now
        return previous


NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes {workers};
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    keepalive_requests 1000000;
{http}
}}
"""


def start_nginx(prefix: Path, port: int, http: str, workers: str = "auto") -> Running:
    """nginx in ``prefix`` (which must exist) with ``http`` in its http block."""
    (prefix / "nginx.conf").write_text(
        NGINX_MAIN.format(workers=workers, prefix=prefix, http=textwrap.indent(http, "    "))
    )
    log = prefix / "error.log"
    process = spawn(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(log)], prefix / "stderr.log")
    return listening(Running(process, log, port))


def origin_server(port: int, www: Path, access_log: Path, rate_bytes: int) -> str:
    """
    One nginx ``server`` block of the origin on ``port``, logging to
    ``access_log``; files (and ``.metadata``) sent at most ``rate_bytes``
    per second per request (nginx ``limit_rate``; 0: unlimited).
    """
    limit = f"limit_rate {rate_bytes};" if rate_bytes else ""
    return textwrap.dedent(
        f"""\
        server {{
            listen 127.0.0.1:{port};
            access_log {access_log} bench;
            # Relative redirects ("/simple/x/" for "/simple/x"): a client
            # that reached the origin through a forwarder stays behind it.
            absolute_redirect off;
            root {www};
            location / {{ }}
            location /files/ {{ {limit} }}
            location ~ ^/simple/([^/]+/)?$ {{
                types {{
                    text/html html;
                    application/vnd.pypi.simple.v1+json json;
                }}
                add_header Vary Accept;
                try_files ${{uri}}index.$simple_format =404;
            }}
        }}
        """
    )


def start_origin(scratch: Path, www: Path, rate_mb: float = 0.0) -> tuple[Origin, Origin]:
    """
    The origin: one nginx with two servers on the same tree, the *line*
    (files at most ``rate_mb`` MB/s per request when given, what every
    contender but the floors fetches from) and the *disk* (unlimited, for
    the warm floor: nginx serving the same files from disk), each with its
    own access log.
    """
    prefix = scratch / "origin"
    prefix.mkdir()
    line_port, disk_port = free_port(), free_port()
    line_log, disk_log = prefix / "access.log", prefix / "disk-access.log"
    http = textwrap.dedent(
        """\
        default_type application/octet-stream;
        sendfile on;
        tcp_nopush off;
        log_format bench '$request_method $request_uri $status $connection $body_bytes_sent $request_time';
        # PEP 691: JSON for clients that ask for it (every client here
        # that names it prefers it), HTML otherwise.
        map $http_accept $simple_format {
            default html;
            "~application/vnd\\.pypi\\.simple\\.v1\\+json" json;
        }
        """
    )
    http += origin_server(line_port, www, line_log, int(rate_mb * 1_000_000))
    http += origin_server(disk_port, www, disk_log, 0)
    running = start_nginx(prefix, line_port, http)
    wait_for_port(disk_port, running.process, running.log)
    return Origin(running, line_log), Origin(attrs.evolve(running, port=disk_port), disk_log)


def check_origin(origin: Origin, pins: Sequence[Pin]) -> None:
    """The origin answers JSON and HTML pages, files and metadata."""
    name = pins[0].name
    base = origin.index_url

    def get(url: str, accept: str | None = None) -> tuple[str, bytes]:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        with LOCAL.open(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read()

    kind, body = get(f"{base}{name}/", "application/vnd.pypi.simple.v1+json, text/html; q=0.01")
    assert kind == "application/vnd.pypi.simple.v1+json", kind
    assert json.loads(body)["files"][0]["filename"] == pins[0].filename
    kind, body = get(f"{base}{name}/")
    assert kind.startswith("text/html") and pins[0].filename.encode() in body, kind
    kind, body = get(f"{base}{name}/../../files/{pins[0].filename}.metadata")
    assert body.startswith(b"Metadata-Version"), body[:40]


# ---------------------------------------------------------------- upstream requests


def upstream_summary(requests: Sequence[Request], pins: Sequence[Pin]) -> dict[str, object]:
    """
    The origin's requests during one client run, by kind, and whether every
    page and every file was asked for exactly once (and nothing else but
    each ``.metadata`` file at most once).
    """
    pages = {f"/simple/{pin.name}/" for pin in pins}
    files = {f"/files/{pin.filename}" for pin in pins}
    metadata = {f"{uri}.metadata" for uri in files}
    # What pip asks for straight from the origin: every page and file, and
    # the metadata of every wheel (an sdist has none).
    asked = pages | files | {f"/files/{pin.filename}.metadata" for pin in pins if pin.filename.endswith(".whl")}
    counts = Counter(request.uri for request in requests)
    # Fetched upstream and never asked for by pip: anything pip would not
    # have asked for, and every repeat.
    wasted = sum(n if uri not in asked else n - 1 for uri, n in counts.items())
    kinds: Counter[str] = Counter()
    for request in requests:
        if request.uri in pages:
            kinds["pages"] += 1
        elif request.uri in files:
            kinds["files"] += 1
        elif request.uri in metadata:
            kinds["metadata"] += 1
        else:
            kinds["other"] += 1
    unusual = sorted(
        {f"{r.method} {r.uri} {r.status}" for r in requests if r.method != "GET" or r.status != 200 or r.uri not in pages | files | metadata}
    )
    duplicates = sorted(uri for uri, n in counts.items() if n > 1)
    # Read-ahead may ask for pages pip does not (a dependency on no page
    # here: a 404); those count as wasted, not here.
    exactly_once = (
        not duplicates
        and all(r.method == "GET" and (r.status == 200 or r.uri not in asked) for r in requests)
        and pages <= counts.keys()
        and files <= counts.keys()
    )
    return {
        "requests": len(requests),
        "connections": len({r.connection for r in requests}),
        "pages": kinds["pages"],
        "metadata": kinds["metadata"],
        "files": kinds["files"],
        "other": kinds["other"],
        "wasted": wasted,
        "wasted_uris": sorted(uri for uri in counts if uri not in asked)[:20],
        "methods": dict(Counter(r.method for r in requests)),
        "statuses": dict(Counter(str(r.status) for r in requests)),
        "duplicates": duplicates[:20],
        "unusual": unusual[:20],
        "exactly_once_per_page_and_file": exactly_once,
    }


# ---------------------------------------------------------------- client


class ClientFailed(Exception):
    pass


@attrs.frozen
class Measurement:
    """
    One client run: its wall time, the CPU that pip (with this bench), the
    server under test and the origin used, and the CPU that everything else
    on the machine (other sessions' tests, the hypervisor's steal) took
    meanwhile, which is what distorts wall times.
    """

    seconds: float
    client_cpu_s: float
    server_cpu_s: float
    origin_cpu_s: float
    foreign_cpu_s: float

    @property
    def foreign_cores(self) -> float:
        return self.foreign_cpu_s / self.seconds


def pip_download(
    index_arguments: Sequence[str],
    destination: Path,
    pins: Sequence[Pin],
    server: Running | None = None,
    origin: Running | None = None,
) -> Measurement:
    """One timed ``pip download`` of the pinned closure; checks what arrived."""
    command = [
        sys.executable, "-m", "pip", "download", "-r", str(REQUIREMENTS), "-d", str(destination),
        "--no-cache-dir", "--disable-pip-version-check", "--progress-bar", "off", "-q",
        *index_arguments,
    ]
    def ours() -> tuple[float, float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return (
            children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime,
            server.cpu_seconds() if server else 0.0,
            origin.cpu_seconds() if origin else 0.0,
            machine_busy_seconds(),
        )

    before = ours()
    started = time.perf_counter()
    done = subprocess.run(command, env=CLIENT_ENV, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    elapsed = time.perf_counter() - started
    client, served, originated, busy = (b - a for a, b in zip(before, ours()))
    if done.returncode != 0:
        raise ClientFailed(f"pip exited {done.returncode}:\n{done.stderr[-3000:]}")
    got = {path.name: path.stat().st_size for path in destination.iterdir()}
    wanted = {pin.filename: pin.path.stat().st_size for pin in pins}
    if got != wanted:
        raise ClientFailed(
            f"downloaded files differ: unexpected {sorted(set(got.items()) - set(wanted.items()))[:5]}, "
            f"missing {sorted(set(wanted.items()) - set(got.items()))[:5]}"
        )
    shutil.rmtree(destination)
    return Measurement(
        seconds=elapsed,
        client_cpu_s=client,
        server_cpu_s=served,
        origin_cpu_s=originated,
        foreign_cpu_s=max(0.0, busy - client - served - originated),
    )


# ---------------------------------------------------------------- contenders


@attrs.frozen
class Server:
    """A caching index: how to start it in a fresh directory, and its URL."""

    name: str
    start: Callable[[Path, Origin], Running]
    index_path: str


#: Options added to buildcache's command line (``--workers``), set by main.
BUILDCACHE_OPTIONS: list[str] = []
#: The forwarders and caches measured (``--only``), set by main; all when empty.
ONLY: set[str] = set()


def wanted(name: str) -> bool:
    return not ONLY or name in ONLY


def workers_supported() -> bool:
    """Whether this buildcache has ``--workers``."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    done = subprocess.run([twistd, "buildcache", "--help"], capture_output=True, text=True, env=SERVER_ENV)
    return "--workers" in done.stdout


def workers_options(wanted: int | None) -> list[str]:
    """
    buildcache's ``--workers`` option: ``wanted`` or issue 16's 2 when
    this buildcache has the option; nothing when it has not (it is one
    process), which only ``--workers 1`` accepts.
    """
    if workers_supported():
        return ["--workers", str(DEFAULT_WORKERS if wanted is None else wanted)]
    if wanted not in (None, 1):
        raise SystemExit(f"--workers {wanted}: this buildcache has no --workers option yet")
    return []


def buildcache_stats(running: Running) -> dict[str, object]:
    """The read-ahead counters of ``/-/stats.json``."""
    with LOCAL.open(f"http://127.0.0.1:{running.port}/-/stats.json", timeout=10) as response:
        store = json.load(response)["store"]
    return {"prefetches": store["prefetches"], "prefetch_hits": store["prefetch_hits"]}


def start_buildcache(run_dir: Path, origin: Origin) -> Running:
    port, index_port = free_port(), free_port()
    log = run_dir / "buildcache.log"
    command = buildcache_command(
        log, port, index_port, run_dir / "cache", "--pypi-upstream", origin.index_url,
        *BUILDCACHE_OPTIONS,
    )
    process = spawn(command, run_dir / "stdout.log", cwd=run_dir)
    return listening(
        Running(process, log, index_port, scan_log=True), workers=expected_workers(command)
    )


DEVPI_ROOT_PASSWORD = "bench"


def start_devpi(run_dir: Path, origin: Origin) -> Running:
    bin_dir = VENVS / "devpi" / "bin"
    server_dir = run_dir / "server"
    log = run_dir / "devpi.log"
    subprocess.run(
        [str(bin_dir / "devpi-init"), "--serverdir", str(server_dir), "--no-root-pypi",
         "--root-passwd", DEVPI_ROOT_PASSWORD],
        check=True, capture_output=True, timeout=120, env=SERVER_ENV,
    )
    port = free_port()
    process = spawn(
        [str(bin_dir / "devpi-server"), "--serverdir", str(server_dir), "--host", "127.0.0.1", "--port", str(port)],
        log,
    )
    running = Running(process, log, port)
    try:
        wait_for_port(port, process, log)
        credentials = base64.b64encode(f"root:{DEVPI_ROOT_PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/root/pypi",
            data=json.dumps({"type": "mirror", "mirror_url": origin.index_url}).encode(),
            method="PUT",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": f"Basic {credentials}",
            },
        )
        with LOCAL.open(request, timeout=30) as response:
            response.read()
    except BaseException:
        stop(process)
        raise
    return running


def start_proxpi(run_dir: Path, origin: Origin) -> Running:
    port = free_port()
    log = run_dir / "proxpi.log"
    env = dict(
        SERVER_ENV,
        PROXPI_INDEX_URL=origin.index_url,
        PROXPI_EXTRA_INDEX_URLS="",
        PROXPI_CACHE_DIR=str(run_dir / "cache"),
    )
    # One process with two threads, as proxpi's own container runs it:
    # its cache is not shared between processes.
    process = spawn(
        [str(VENVS / "proxpi" / "bin" / "gunicorn"), "--workers", "1", "--threads", "2",
         "--bind", f"127.0.0.1:{port}", "proxpi.server:app"],
        log, env=env, cwd=run_dir,
    )
    return listening(Running(process, log, port))


SERVERS = (
    Server("buildcache", start_buildcache, "/simple/"),
    Server("devpi-server", start_devpi, "/root/pypi/+simple/"),
    Server("proxpi", start_proxpi, "/index/"),
)


@attrs.frozen
class Forwarder:
    """
    A reference with no cache: it fetches every request from the origin, so
    its run is what fetching on demand costs pip with that software.
    """

    name: str
    start: Callable[[Path, Origin], Running]


def start_nginx_forward(run_dir: Path, origin: Origin) -> Running:
    port = free_port()
    http = textwrap.dedent(
        f"""\
        access_log off;
        upstream origin {{
            server 127.0.0.1:{origin.running.port};
            keepalive 8;
        }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://origin;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """
    )
    return start_nginx(run_dir, port, http, workers="1")


def start_forward_py(run_dir: Path, upstream_port: int, delay_ms: float = 0.0) -> Running:
    """``bench/forward.py`` in front of 127.0.0.1:``upstream_port``."""
    port = free_port()
    log = run_dir / "forward.log"
    process = spawn(
        [sys.executable, str(BENCH / "forward.py"), str(port), f"http://127.0.0.1:{upstream_port}",
         "--delay-ms", str(delay_ms)],
        log,
    )
    return listening(Running(process, log, port))


def start_treq_forward(run_dir: Path, origin: Origin) -> Running:
    return start_forward_py(run_dir, origin.running.port)


FORWARDERS = (
    Forwarder("nginx forward", start_nginx_forward),
    Forwarder("treq forward", start_treq_forward),
)


# ---------------------------------------------------------------- measuring


def started_at_ticks(pid: int) -> int:
    """A process's start time, in clock ticks since boot."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def other_benchmarks() -> list[str]:
    """
    Processes running another ``bench/*.py`` that started before this one.
    Benchmarks started later wait for this one (they all follow this rule,
    or wait for every other), so two of them never wait for each other.
    """
    found = subprocess.run(["pgrep", "-af", OTHER_BENCHMARKS], capture_output=True, text=True)
    mine = started_at_ticks(os.getpid())
    others = []
    for line in found.stdout.splitlines():
        pid = int(line.split()[0])
        if pid == os.getpid() or "bench/pypi.py" in line:
            continue
        try:
            if started_at_ticks(pid) <= mine:
                others.append(line)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return others


def wait_for_quiet_machine(max_wait: float) -> float:
    """Wait until no other benchmark runs; returns the seconds waited."""
    started = time.monotonic()
    announced = False
    while others := other_benchmarks():
        if time.monotonic() - started > max_wait:
            raise SystemExit("another benchmark is still running; giving up:\n" + "\n".join(others))
        if not announced:
            print("waiting for another benchmark to end:\n  " + "\n  ".join(o[:200] for o in others), flush=True)
            announced = True
        time.sleep(5)
    return time.monotonic() - started


@attrs.frozen
class Run:
    """One row's outcome in one repeat."""

    measurement: Measurement
    upstream: dict[str, object] | None = None
    peak_rss_mb: float | None = None
    peak_rss_process_mb: float | None = None
    # buildcache's read-ahead counters after the run (cold).
    readahead: dict[str, object] | None = None
    # Runs disturbed by other processes are retried; the least disturbed counts.
    attempts: int = 1
    # A warm run: the seconds of the warm floor's run just before it.
    floor_beside_s: float | None = None


@attrs.frozen
class Quiet:
    """When a run counts as undisturbed, and how often a disturbed one is retried."""

    cores: float
    retries: int


#: Each row's runs in one repeat (warm rows and the warm floor have several).
Repeat = dict[str, list[Run]]
# "nginx disk" (pip straight from nginx on this machine, no latency nor
# rate limit) is measured only when the line is modelled; otherwise it is
# "direct".
ROWS = ["floor", "nginx disk", "direct", *(forwarder.name for forwarder in FORWARDERS)] + [
    f"{server.name} {state}" for server in SERVERS for state in ("cold", "warm")
]


def least_disturbed(
    quiet: Quiet, take: Callable[[], tuple[Run, ...]], pause_s: float = RETRY_PAUSE_S
) -> tuple[Run, ...]:
    """
    Call ``take`` until its first run was quiet, at most ``1 + retries``
    times, ``pause_s`` apart; return the attempt whose first run lost the
    least CPU to other processes, each run marked with the number of
    attempts.
    """
    best: tuple[Run, ...] | None = None
    attempts = 0
    for attempts in range(1, quiet.retries + 2):
        runs = take()
        if best is None or runs[0].measurement.foreign_cores < best[0].measurement.foreign_cores:
            best = runs
        if runs[0].measurement.foreign_cores <= quiet.cores:
            break
        if attempts <= quiet.retries:
            # Let a burst of someone else's work pass before trying again.
            time.sleep(pause_s)
    assert best is not None
    return tuple(attrs.evolve(run, attempts=max(run.attempts, attempts)) for run in best)


def run_repeat(
    number: int, pins: Sequence[Pin], origin: Origin, disk: Origin | None, scratch: Path, quiet: Quiet,
    errors: dict[str, str], problems: dict[str, list[str]], warm_runs: int = WARM_RUNS,
) -> Repeat:
    """
    Every row once: the baselines, then each server cold and warm with a
    fresh server and cache directory.  The order rotates with ``number`` so
    no contender always runs first or last.  Each cache server's cold run
    is followed by ``warm_runs`` warm runs, each after a run of the warm
    floor (nginx disk, or on loopback the origin: direct), so that warm runs and their floor
    are compared over the same stretch of time.  A run during which other
    processes took more than ``quiet.cores`` is retried (a cold one with a
    fresh server and cache).
    """
    repeat: Repeat = defaultdict(list)
    downloads = scratch / f"downloads-{number}"
    downloads.mkdir()
    counter = iter(range(1_000_000))

    def fresh_destination() -> Path:
        return downloads / f"run-{next(counter)}"

    def floor() -> None:
        repeat["floor"] += least_disturbed(quiet, lambda: (
            Run(pip_download(
                ["--no-index", "--find-links", str(FILES)], fresh_destination(), pins, origin=origin.running
            )),
        ))

    def through(url: list[str], running: Running | None = None) -> Run:
        """One run against ``url``, with the origin requests it caused."""
        mark = origin.mark()
        measurement = pip_download(url, fresh_destination(), pins, server=running, origin=origin.running)
        return Run(
            measurement, upstream_summary(origin.requests_since(mark), pins),
            running.peak_rss_mb() if running is not None else None,
            running.peak_rss_process_mb() if running is not None else None,
        )

    def direct() -> None:
        repeat["direct"] += least_disturbed(quiet, lambda: (through(["--index-url", origin.index_url]),))

    def from_disk() -> None:
        assert disk is not None
        repeat["nginx disk"] += least_disturbed(quiet, lambda: (
            Run(pip_download(["--index-url", disk.index_url], fresh_destination(), pins, origin=disk.running)),
        ))

    def forward(forwarder: Forwarder) -> Callable[[], None]:
        def once() -> tuple[Run]:
            run_dir = scratch / f"{forwarder.name.replace(' ', '-')}-{number}-{next(counter)}"
            run_dir.mkdir()
            running = forwarder.start(run_dir, origin)
            try:
                return (through(["--index-url", f"http://127.0.0.1:{running.port}/simple/"], running),)
            finally:
                stop(running.process)
                shutil.rmtree(run_dir, ignore_errors=True)

        def run() -> None:
            repeat[forwarder.name] += least_disturbed(quiet, once)
        return run

    def cache(server: Server) -> Callable[[], None]:
        attempt_numbers = iter(range(1_000_000))

        def cold_and_warm() -> tuple[Run, ...]:
            run_dir = scratch / f"{server.name}-{number}-{next(attempt_numbers)}"
            run_dir.mkdir()
            running: Running | None = None
            try:
                running = live = server.start(run_dir, origin)
                url = ["--index-url", f"http://127.0.0.1:{live.port}{server.index_path}"]
                cold = through(url, live)
                if server.name == "buildcache":
                    cold = attrs.evolve(cold, readahead=buildcache_stats(live))
                # No pause: the warm runs follow the cold one well within
                # every contender's index TTL (buildcache 300 s, devpi-server
                # and proxpi 1800 s), so no page is revalidated upstream.
                warm: list[Run] = []
                for _ in range(warm_runs):
                    if disk is not None:
                        from_disk()
                    else:
                        # On loopback the origin itself is the warm floor.
                        direct()
                    beside = repeat["nginx disk" if disk is not None else "direct"][-1]
                    warm += (
                        attrs.evolve(run, floor_beside_s=beside.measurement.seconds)
                        for run in least_disturbed(quiet, lambda: (through(url, live),), pause_s=0.0)
                    )
                if live.process.poll() is not None:
                    raise RuntimeError(f"{server.name} exited during the run")
                return (cold, *warm)
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                if running is not None:
                    message += f"\n--- {running.log.name} (tail) ---\n{running.log_tail()}"
                raise ServerFailed(message) from error
            finally:
                if running is not None:
                    stop(running.process)
                    found = running.log_problems()
                    if found:
                        problems.setdefault(server.name, []).extend(found)
                shutil.rmtree(run_dir, ignore_errors=True)

        def run() -> None:
            if server.name in errors:
                return
            try:
                cold, *warm = least_disturbed(quiet, cold_and_warm)
            except ServerFailed as failure:
                errors[server.name] = str(failure)
                print(f"{server.name}: FAILED in repeat {number + 1}: {failure}", flush=True)
                return
            repeat[f"{server.name} cold"] = [cold]
            repeat[f"{server.name} warm"] = warm
        return run

    steps: list[Callable[[], None]] = [
        floor, *([from_disk] if disk is not None else []), direct,
        *(forward(forwarder) for forwarder in FORWARDERS if wanted(forwarder.name)),
        *(cache(server) for server in SERVERS if wanted(server.name)),
    ]
    shift = number % len(steps)
    for step in steps[shift:] + steps[:shift]:
        step()
    shutil.rmtree(downloads, ignore_errors=True)
    return repeat


class ServerFailed(Exception):
    pass


def measure(
    pins: Sequence[Pin], origin: Origin, disk: Origin | None, scratch: Path, repeats: int, quiet: Quiet,
    warm_runs: int = WARM_RUNS,
) -> tuple[list[Repeat], dict[str, str], dict[str, list[str]]]:
    """All repeats; returns them, errors by server, and log problems by server."""
    done: list[Repeat] = []
    errors: dict[str, str] = {}
    problems: dict[str, list[str]] = {}
    for number in range(repeats):
        began = time.monotonic()
        repeat = run_repeat(number, pins, origin, disk, scratch, quiet, errors, problems, warm_runs)
        done.append(repeat)
        print(
            f"repeat {number + 1}/{repeats} in {time.monotonic() - began:.0f} s: "
            + ", ".join(
                f"{name} {run.measurement.seconds:.2f}"
                + (f" ({run.attempts} tries)" if run.attempts > 1 else "")
                for name, runs in repeat.items() for run in runs
            ),
            flush=True,
        )
    return done, errors, problems


def summarise(repeats: Sequence[Repeat], errors: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """Per row: medians over its runs in every repeat, and every run."""
    rows: dict[str, dict[str, object]] = {}
    for name in ROWS:
        runs = [run for repeat in repeats for run in repeat.get(name, [])]
        row: dict[str, object] = {}
        server = name.rsplit(" ", 1)[0]
        if not runs and server not in errors:
            continue
        if server in errors:
            row["error"] = errors[server]
        elif runs:
            row["median_s"] = statistics.median(r.measurement.seconds for r in runs)
            row["median_client_cpu_s"] = statistics.median(r.measurement.client_cpu_s for r in runs)
            row["median_server_cpu_s"] = statistics.median(r.measurement.server_cpu_s for r in runs)
            # Wall time pip did not spend computing: what the index cost it.
            # Steadier than wall time on a shared machine, whose slow spells
            # stretch pip's own CPU time too.
            row["median_wait_s"] = statistics.median(
                r.measurement.seconds - r.measurement.client_cpu_s for r in runs
            )
            row["runs"] = [
                {
                    **attrs.asdict(r.measurement), "foreign_cores": r.measurement.foreign_cores,
                    "attempts": r.attempts, "floor_beside_s": r.floor_beside_s,
                }
                for r in runs
            ]
            beside = [r.measurement.seconds / r.floor_beside_s for r in runs if r.floor_beside_s]
            if beside:
                # Each warm run over the floor's run just before it: steadier
                # than the medians' ratio when the machine drifts slowly,
                # less steady when it swings from run to run.
                row["median_over_floor_beside"] = statistics.median(beside)
            upstream = [r.upstream for r in runs if r.upstream is not None]
            if upstream:
                row["upstream"] = upstream
            rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
            if rss:
                row["peak_rss_mb"] = max(rss)
            rss_process = [r.peak_rss_process_mb for r in runs if r.peak_rss_process_mb is not None]
            if rss_process:
                row["peak_rss_process_mb"] = max(rss_process)
            readahead = [r.readahead for r in runs if r.readahead is not None]
            if readahead:
                row["readahead"] = readahead
        rows[name] = row
    return rows


def wasted_share(rows: Mapping[str, Mapping[str, object]], name: str) -> tuple[int, int] | None:
    """Upstream requests wasted and in all, summed over the runs of ``name``."""
    runs = rows.get(name, {}).get("upstream")
    if not isinstance(runs, list) or not runs:
        return None
    return sum(int(u["wasted"]) for u in runs), sum(int(u["requests"]) for u in runs)


def targets(rows: Mapping[str, Mapping[str, object]], latency_ms: float) -> dict[str, bool | None]:
    """Issue 16's pip targets, each passed (True), failed or not measured here (None)."""
    def number(name: str, key: str = "median_s") -> float | None:
        value = rows.get(name, {}).get(key)
        return float(value) if isinstance(value, (int, float)) else None

    def check(value: float | None, limit: float | None) -> bool | None:
        return None if value is None or limit is None else value <= limit

    def ahead(value: float | None, others: Sequence[float | None]) -> bool | None:
        if value is None or any(other is None for other in others):
            return None
        return all(value < other for other in others if other is not None)

    direct = number("direct")
    disk = number("nginx disk") or (direct if not latency_ms and "nginx disk" not in rows else None)
    cold, warm = number("buildcache cold"), number("buildcache warm")
    checks: dict[str, bool | None] = {}
    if latency_ms:
        checks[f"cold ({latency_ms:g} ms origin) at most {TARGET_COLD_OVER_DIRECT}x straight from the origin"] = check(
            cold, None if direct is None else TARGET_COLD_OVER_DIRECT * direct
        )
        checks["cold ahead of devpi-server and proxpi (cold)"] = ahead(
            cold, [number("devpi-server cold"), number("proxpi cold")]
        )
    wasted = wasted_share(rows, "buildcache cold")
    checks[f"cold: wasted upstream requests under {TARGET_WASTED_SHARE:.0%} of all"] = (
        None if wasted is None or not wasted[1] else wasted[0] / wasted[1] < TARGET_WASTED_SHARE
    )
    checks[f"warm at most {TARGET_WARM_OVER_DISK}x nginx serving the files from disk"] = check(
        warm, None if disk is None else TARGET_WARM_OVER_DISK * disk
    )
    anchors = [number("devpi-server warm"), number("proxpi warm")]
    checks["warm no slower than devpi-server and proxpi (warm)"] = (
        None if warm is None or any(a is None for a in anchors)
        else all(warm <= a for a in anchors if a is not None)
    )
    if not latency_ms:
        over = {
            name: None if number(name, "median_wait_s") is None or number("direct", "median_wait_s") is None
            else number(name, "median_wait_s") - number("direct", "median_wait_s")  # type: ignore[operator]
            for name in ("buildcache cold", "treq forward")
        }
        checks[
            f"cold, loopback: pip waiting over direct at most the treq forwarder's + {TARGET_LOOPBACK_WAIT_OVER_TREQ_S} s"
        ] = check(
            over["buildcache cold"],
            None if over["treq forward"] is None else over["treq forward"] + TARGET_LOOPBACK_WAIT_OVER_TREQ_S,
        )
    cold_upstream = rows.get("buildcache cold", {}).get("upstream")
    checks["cold: every page and file fetched once (no repeat)"] = (
        all(u["exactly_once_per_page_and_file"] for u in cold_upstream)
        if isinstance(cold_upstream, list) and cold_upstream else None
    )
    rss_process = max(
        (v for v in (number("buildcache cold", "peak_rss_process_mb"), number("buildcache warm", "peak_rss_process_mb"))
         if v is not None), default=None,
    )
    rss_all = max(
        (v for v in (number("buildcache cold", "peak_rss_mb"), number("buildcache warm", "peak_rss_mb")) if v is not None),
        default=None,
    )
    checks[f"peak RSS under {TARGET_PEAK_RSS_PROCESS_MB:.0f} MB per process"] = check(rss_process, TARGET_PEAK_RSS_PROCESS_MB)
    checks[f"peak RSS under {TARGET_PEAK_RSS_ALL_MB:.0f} MB for all its processes"] = check(rss_all, TARGET_PEAK_RSS_ALL_MB)
    return checks


def print_table(
    rows: Mapping[str, Mapping[str, object]], pins: Sequence[Pin], checks: Mapping[str, bool | None],
    line: str,
) -> None:
    floor, direct = rows["floor"].get("median_s"), rows["direct"].get("median_s")
    print(f"origin: {line}")
    print(
        f"{'':18} {'median s':>8} {'x floor':>7} {'x direct':>8} {'server CPU s':>12} {'pip CPU s':>9}"
        f" {'pip waiting s':>13}  "
        f"{'upstream: requests (pages/meta/files/other) conns':>50} {'wasted':>7} {'peak RSS MB':>11}"
    )
    for name, row in rows.items():
        seconds = row.get("median_s")
        if not isinstance(seconds, float):
            print(f"{name:18} {'FAILED' if 'error' in row else '-':>8}")
            continue
        ratio_floor = f"{seconds / floor:.2f}" if isinstance(floor, float) else "-"
        ratio_direct = f"{seconds / direct:.2f}" if isinstance(direct, float) else "-"
        server_cpu = f"{row['median_server_cpu_s']:.2f}" if name not in ("floor", "direct", "nginx disk") else "-"
        upstream_runs = row.get("upstream")
        wasted_text = "-"
        if isinstance(upstream_runs, list) and upstream_runs:
            totals = "/".join(str(t) for t in sorted({u["requests"] for u in upstream_runs}))
            last = upstream_runs[-1]
            upstream = (
                f"{totals} ({last['pages']}/{last['metadata']}/{last['files']}/{last['other']})"
                f" {last['connections']}"
            )
            wasted = wasted_share(rows, name)
            if wasted is not None and wasted[1]:
                wasted_text = f"{wasted[0] / wasted[1]:.1%}"
        else:
            upstream = "-"
        rss = row.get("peak_rss_mb")
        rss_text = f"{rss:.1f}" if isinstance(rss, float) else "-"
        print(
            f"{name:18} {seconds:8.2f} {ratio_floor:>7} {ratio_direct:>8} {server_cpu:>12}"
            f" {row['median_client_cpu_s']:9.2f} {row['median_wait_s']:13.2f}  {upstream:>50} {wasted_text:>7}"
            f" {rss_text:>11}"
        )
    print(f"\n{len(pins)} projects, {len(pins)} files, {sum(p.path.stat().st_size for p in pins) / MB:.1f} MB")
    readahead = rows.get("buildcache cold", {}).get("readahead")
    if isinstance(readahead, list) and readahead:
        print(
            "buildcache cold, read-aheads (files and pages) started / asked for since, per run: "
            + ", ".join(f"{r['prefetches']}/{r['prefetch_hits']}" for r in readahead)
            + " (a page a hit worker answers is not seen as asked for)"
        )
    cold_upstream = rows.get("buildcache cold", {}).get("upstream")
    if isinstance(cold_upstream, list) and cold_upstream and cold_upstream[-1]["wasted_uris"]:
        print("buildcache cold, fetched and never asked for by pip: " + " ".join(cold_upstream[-1]["wasted_uris"]))
    for name in (f"{server.name} warm" for server in SERVERS):
        paired = rows.get(name, {}).get("median_over_floor_beside")
        if isinstance(paired, float):
            floor_row = "nginx disk" if "nginx disk" in rows else "direct"
            of_medians = rows[name].get("median_s")
            floor_median = rows[floor_row].get("median_s")
            print(
                f"{name}: each run over the {floor_row} run just before it, median {paired:.3f}"
                + (
                    f" (median over median, the target's: {of_medians / floor_median:.3f})"
                    if isinstance(of_medians, float) and isinstance(floor_median, float) else ""
                )
            )
    waits = {name: row.get("median_wait_s") for name, row in rows.items()}
    direct_wait = waits.get("direct")
    if isinstance(direct_wait, float):
        print("\npip waited, over direct:")
        for name in (*(forwarder.name for forwarder in FORWARDERS), *(f"{s.name} cold" for s in SERVERS)):
            wait = waits.get(name)
            if isinstance(wait, float):
                print(f"  {name:18} {wait - direct_wait:5.2f} s")
    print("\nbuildcache against the pip targets of issue 16:")
    for target, passed in checks.items():
        verdict = "n/a " if passed is None else "PASS" if passed else "FAIL"
        print(f"  {verdict}  {target}")


def environment(anchor_versions: Mapping[str, str]) -> dict[str, str]:
    import twisted

    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    commit = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPOSITORY), "status", "--porcelain", "buildcache"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "pip": pip_version(),
        "twisted": twisted.__version__,
        "nginx": nginx,
        "buildcache_commit": commit + ("+modified" if dirty else ""),
        "cpus": str(os.cpu_count()),
        **anchor_versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--json", help="where to write the results (default bench/pypi.json, or"
                        " bench/pypi-latency.json with --origin-latency-ms)")
    parser.add_argument(
        "--origin-latency-ms", type=float, default=0.0,
        help="hold every origin request this long (bench/forward.py in front of nginx): an index"
        " across a slow line; everything but the floor goes through it",
    )
    parser.add_argument(
        "--origin-rate-mb", type=float, default=0.0,
        help="send files from the origin at most this many MB/s (10^6 bytes) per request (nginx limit_rate),"
        " as over an office line; issue 16 measures 50. Behind --origin-latency-ms, the delay comes first,"
        " then the file streams at this rate",
    )
    parser.add_argument(
        "--workers", type=int, default=None,
        help=f"buildcache's --workers (default {DEFAULT_WORKERS} when buildcache has the option, as issue 16 measures)",
    )
    parser.add_argument(
        "--only", default="",
        help="comma-separated forwarders and caches to measure (e.g. 'buildcache,treq forward');"
        " the floor and direct always run. To try a change out; the targets need every row",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument(
        "--warm-runs", type=int, default=WARM_RUNS,
        help="warm runs per cache server and repeat, each after a run of the warm floor (nginx from disk; on loopback, direct)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=1800, help="seconds to wait for other benchmarks to end"
    )
    parser.add_argument(
        "--no-wait", action="store_true",
        help="measure even while another benchmark runs (to try the bench out; numbers are then distorted)",
    )
    parser.add_argument(
        "--quiet-cores", type=float, default=0.25,
        help="a run is disturbed when other processes took more cores than this on average meanwhile",
    )
    parser.add_argument("--retries", type=int, default=2, help="retries of a disturbed run")
    args = parser.parse_args()
    json_path = args.json or str(BENCH / (
        "pypi"
        + ("-latency" if args.origin_latency_ms else "")
        + (f"-{args.origin_rate_mb:g}MBps" if args.origin_rate_mb else "")
        + ".json"
    ))
    BUILDCACHE_OPTIONS[:] = workers_options(args.workers)
    ONLY.update(name.strip() for name in args.only.split(",") if name.strip())
    line = (
        (f"{args.origin_latency_ms:g} ms latency" if args.origin_latency_ms else "loopback")
        + (f", files at {args.origin_rate_mb:g} MB/s per request" if args.origin_rate_mb else ", no rate limit")
        + f"; buildcache {' '.join(BUILDCACHE_OPTIONS) or 'one process'}"
    )
    # "kill PID" should clean up like Ctrl-C does: unwind through finally.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is missing: apt-get install nginx-light (or nginx)")
    pins = ensure_workload()
    anchor_versions = ensure_anchor_venvs()
    scratch = Path(tempfile.mkdtemp(prefix="buildcache-pypi-bench-"))
    origin: Origin | None = None
    distant: Running | None = None
    try:
        build_origin_tree(scratch / "www", pins)
        origin, disk = start_origin(scratch, scratch / "www", args.origin_rate_mb)
        check_origin(origin, pins)
        check_origin(disk, pins)
        nearby = origin
        if args.origin_latency_ms:
            distant = start_forward_py(scratch, nearby.running.port, args.origin_latency_ms)
            # Requests are still counted in nginx's log, behind the delay.
            nearby = Origin(distant, origin.access_log)
            check_origin(nearby, pins)
        waited = 0.0 if args.no_wait else wait_for_quiet_machine(args.max_wait)
        started_at = time.monotonic()
        # One unmeasured pass of each baseline warms the page cache and pip's imports.
        warmup = scratch / "warmup"
        pip_download(["--no-index", "--find-links", str(FILES)], warmup, pins)
        pip_download(["--index-url", nearby.index_url], warmup, pins)
        quiet = Quiet(args.quiet_cores, args.retries)
        modelled = bool(args.origin_latency_ms or args.origin_rate_mb)
        repeats, errors, problems = measure(
            pins, nearby, disk if modelled else None, scratch, args.repeats, quiet, args.warm_runs
        )
        rows = summarise(repeats, errors)
        checks = targets(rows, args.origin_latency_ms)
        print()
        print_table(rows, pins, checks, line)
        disturbed = [
            f"{name} {run.measurement.foreign_cores:.2f}"
            for repeat in repeats for name, runs in repeat.items() for run in runs
            if run.measurement.foreign_cores > quiet.cores
        ]
        if disturbed:
            print(f"\nruns still disturbed after {quiet.retries} retries (other processes' cores): {', '.join(disturbed)}")
        for name, lines in problems.items():
            print(f"\n{name} log lines that mention problems:")
            for line in lines[:20]:
                print("  " + line)
        report = {
            "environment": environment(anchor_versions),
            "workload": {
                "requirement": ROOT_REQUIREMENT,
                "projects": len(pins),
                "files": len(pins),
                "wheels": sum(p.filename.endswith(".whl") for p in pins),
                "total_mb": sum(p.path.stat().st_size for p in pins) / MB,
                "client": "pip download -r bench/pypi-requirements.txt -d <fresh dir> --no-cache-dir"
                " --disable-pip-version-check --progress-bar off -q (dependency resolution on);"
                " PIP_CONFIG_FILE=/dev/null, no PIP_* variables",
                "origin": "nginx, static PEP 503 HTML + PEP 691 JSON by Accept, PEP 658 .metadata",
                "origin_latency_ms": args.origin_latency_ms,
                "origin_rate_mb_per_s": args.origin_rate_mb,
                "buildcache_options": BUILDCACHE_OPTIONS,
            },
            "repeats": args.repeats,
            "warm_runs": args.warm_runs,
            "results": rows,
            "targets": checks,
            "quiet": {"max_foreign_cores": quiet.cores, "retries": quiet.retries},
            "log_problems": problems,
            "waited_for_other_benchmarks_s": waited,
            "runtime_s": time.monotonic() - started_at,
        }
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {json_path} after {report['runtime_s']:.0f} s of measuring")
    finally:
        if distant is not None:
            stop(distant.process)
        if origin is not None:
            stop(origin.running.process)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
