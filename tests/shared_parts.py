"""
The real parts of the shared-tier end-to-end tests
(:mod:`tests.test_shared_e2e`), all on 127.0.0.1:

- an origin: :class:`tests.apkrepo.RepositoryResource` serving apt-style
  ``pool/`` files from a directory (immutable to the apt policy), counting
  requests per path and holding a response half-way on demand
  (:class:`Origin`);
- a gate in front of the object store's S3 port
  (:class:`tests.store_gate.StoreGate`), which can hold an upload mid-body;
- buildcache nodes: ``twistd buildcache`` children with their own cache
  directories, JSON logs in a file, a mirror route ``/deb/`` to the origin
  and the shared store behind the gate (:func:`start_node`);
- clients: ``curl`` (:func:`curl`), and the test's own signed S3
  requests to list, read and overwrite objects (:class:`Bucket`).

SeaweedFS itself comes from :mod:`tests.seaweed_parts`.  Nodes run with
its dummy AWS credentials in their environment and no AWS configuration
file: nothing here reads the developer's ``~/.aws``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.apkrepo import RepositoryResource
from tests.registry_parts import LOOPBACK_ONLY, free_port
from tests.seaweed_parts import Seaweed, credentials_env
from tests.support import ChildProcess, Client, listen, pattern_bytes, url_of
from tests.support import reactor as _reactor

KB = 1024
MB = 1024 * KB

reactor: Any = _reactor

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

#: The mirror route every node serves the origin under.
ROUTE = "deb"


def pool_path(name: str, version: str = "1.0") -> str:
    """An apt pool path (immutable to the apt policy) for package ``name``."""
    return f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb"


def write_files(root: Path, sizes: Mapping[str, int], seed: bytes = b"") -> dict[str, bytes]:
    """
    Write one file per ``path -> size`` under ``root`` (deterministic,
    incompressible bytes) and return their contents by path.
    """
    written = {}
    for path, size in sizes.items():
        data = pattern_bytes(size, seed + path.encode())
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written[path] = data
    return written


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def poll(
    condition: Callable[[], Any], what: str, bound: float = 30.0, every: float = 0.1
) -> Any:
    """
    Wait until ``condition()`` (a plain or async callable) is truthy and
    return its value; fail naming ``what`` once ``bound`` seconds passed.
    """
    deadline = reactor.seconds() + bound
    while True:
        value = condition()
        if isinstance(value, Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what}")
        await deferLater(reactor, every, lambda: None)


# -- the origin --------------------------------------------------------------


@define
class Origin:
    """
    A static origin on a loopback port serving ``root``; ``/PATH`` counts
    as the request path of ``PATH``.
    """

    resource: RepositoryResource
    port: IListeningPort
    url: str

    def gets(self, path: str) -> int:
        """GET requests the origin received for ``path`` (relative)."""
        wanted = "/" + path
        return sum(
            1 for seen in self.resource.requests
            if seen.path == wanted and seen.method == "GET"
        )

    def hold(self, path: str) -> None:
        """Send the first half of ``path``'s body, then wait for :meth:`release`."""
        self.resource.hold("/" + path)

    def release(self, path: str) -> None:
        self.resource.release("/" + path)


def start_origin(testcase: Any, root: Path) -> Origin:
    resource = RepositoryResource(root)
    port = listen(resource)
    url = url_of(port).rstrip("/")
    testcase.addCleanup(port.stopListening)

    def release_all() -> None:
        # A held response left waiting would keep its connection open.
        for path in list(resource._held):
            resource.release(path)

    testcase.addCleanup(release_all)
    return Origin(resource, port, url)


# -- the bucket, read and written by the test itself --------------------------


@frozen
class Bucket:
    """
    The tests' own view of one bucket under one prefix: list, read and
    overwrite objects with the store's dummy credentials (blocking calls:
    small objects, and the nodes are other processes).
    """

    store: Seaweed
    bucket: str
    prefix: str

    def shared_store(self, endpoint: str) -> str:
        """The ``--shared-store`` value of this bucket at ``endpoint``."""
        return f"s3://{self.bucket}/{self.prefix}?endpoint={endpoint}"

    def names(self, under: str = "") -> list[str]:
        """Object names (relative to the prefix) under ``under``."""
        keys = self.store.list_keys(self.bucket, self.prefix + under)
        return [key[len(self.prefix):] for key in keys]

    def get(self, name: str) -> bytes | None:
        return self.store.get_object(self.bucket, self.prefix + name)

    def put(self, name: str, data: bytes) -> None:
        self.store.put_object(self.bucket, self.prefix + name, data)

    def has_record_and_blob(self, data: bytes) -> bool:
        """
        Whether some record names ``data``'s digest and its blob holds
        exactly ``data``: what a node published for it.  (Cheap checks
        first: the blob is read only once both objects are listed.)
        """
        digest = sha256(data)
        if blob_name(data) not in self.names(blob_name(data)):
            return False
        for name in self.names("records/"):
            record = self.get(name)
            if record is not None and json.loads(record).get("sha256") == digest:
                blob = self.get(blob_name(data))
                return blob is not None and sha256(blob) == digest
        return False

    def records_naming(self, data: bytes) -> list[str]:
        """The records that name ``data``'s digest, whether or not its blob is there."""
        digest = sha256(data)
        named = []
        for name in self.names("records/"):
            record = self.get(name)
            if record is not None and json.loads(record).get("sha256") == digest:
                named.append(name)
        return named


def blob_name(data: bytes) -> str:
    """The bucket object (under the prefix) that holds ``data``."""
    return f"blobs/sha256/{sha256(data)}"


# -- buildcache nodes ----------------------------------------------------------


@define(eq=False)
class Node:
    """One ``twistd buildcache`` child with the shared tier configured."""

    name: str
    child: ChildProcess
    proxy_port: int
    index_port: int
    cache_dir: Path
    log: Path
    argv: list[str]
    env: dict[str, str]

    def url(self, path: str) -> str:
        """The node's URL for origin path ``path`` (through the mirror route)."""
        return f"http://127.0.0.1:{self.proxy_port}/{ROUTE}/{path}"

    def index_url(self) -> str:
        return f"http://127.0.0.1:{self.index_port}/simple/"

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON log event so far (the log is a file: never cut)."""
        if not self.log.exists():
            return []
        events = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def events(self, name: str) -> list[dict[str, Any]]:
        """Logged events whose ``event`` field is ``name``."""
        return [e for e in self.log_events() if e.get("event") == name]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_event(self, name: str, count: int = 1, bound: float = 30.0) -> list[dict[str, Any]]:
        async def found() -> list[dict[str, Any]] | None:
            if self.child.ended.called:
                raise AssertionError(f"{self.name} ended:\n{self.log_text()[-3000:]}")
            events = self.events(name)
            return events if len(events) >= count else None

        result: list[dict[str, Any]] = await poll(found, f"{self.name} logs {name} x{count}", bound)
        return result

    async def page(self, path: str) -> bytes:
        """A page of the node's own (``/``, ``/-/stats.json``, ``/-/metrics``)."""
        client = Client()
        try:
            got = await client.get(f"http://127.0.0.1:{self.proxy_port}{path}")
        finally:
            await client.close()
        if got.status != 200:
            raise AssertionError(f"{self.name} {path}: {got.status}")
        return got.body

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self.page("/-/stats.json"))
        return result

    async def tier(self) -> dict[str, Any]:
        """The shared tier's figures in the node's stats."""
        figures: dict[str, Any] = (await self.stats()).get("shared") or {}
        return figures

    def stop(self) -> Deferred[None]:
        return self.child.stop()


def write_secret(directory: Path, secret: bytes = b"shared-e2e-secret-0123456789") -> Path:
    path = directory / "shared-secret"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def node_environment() -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PIP_")) and not k.lower().endswith("_proxy")
    }
    # The store's dummy keys; no AWS configuration file, no ~/.aws.
    environ.update(credentials_env())
    environ.update(LOOPBACK_ONLY)
    environ["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return environ


async def start_node(
    testcase: Any, name: str, work: Path, origin_url: str, shared_store: str | None,
    secret_file: Path | None, *options: str, pypi_upstream: str = "http://127.0.0.1:1/simple",
    wait_for_tier: bool = True,
) -> Node:
    """
    ``twistd buildcache`` in ``work/name`` on free loopback ports (the
    registry port too, its docker.io a dead loopback port), the origin at
    ``/deb/``, the shared store ``shared_store`` (None: no tier), JSON logs
    in ``work/name/node.log``; ready (listening, and the tier's start-up
    probe logged when ``wait_for_tier``) when this returns; SIGKILLed by
    PID in the test's cleanup if it still runs.
    """
    if not os.access(TWISTD, os.X_OK):
        testcase.skipTest("twistd of this Python is not installed")
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    log = home / "node.log"
    proxy_port, index_port = free_port(), free_port()
    argv = [
        TWISTD, "--nodaemon", "--pidfile=", f"--logfile={log}", "buildcache",
        "--log-format", "json",
        "--port", f"tcp:{proxy_port}:interface=127.0.0.1",
        "--pypi-port", f"tcp:{index_port}:interface=127.0.0.1",
        "--registry-port", f"tcp:{free_port()}:interface=127.0.0.1",
        "--registry", "docker.io=http://127.0.0.1:1",
        "--pypi-upstream", pypi_upstream,
        "--cache-dir", str(home / "cache"),
        "--mirror", f"{ROUTE}={origin_url}",
        *options,
    ]
    if shared_store is not None:
        argv += ["--shared-store", shared_store]
        if secret_file is not None:
            argv += ["--shared-secret-file", str(secret_file)]
    env = node_environment()
    env["HOME"] = str(home)
    child = spawn(testcase, name, argv, env, home)
    node = Node(name, child, proxy_port, index_port, home / "cache", log, argv, env)
    await wait_started(node)
    if shared_store is not None and wait_for_tier:
        await node.wait_event("shared_store_conditional")
    return node


def spawn(testcase: Any, name: str, argv: Sequence[str], env: Mapping[str, str], path: Path) -> ChildProcess:
    child = ChildProcess(name)
    reactor.spawnProcess(child, argv[0], list(argv), env=dict(env), path=str(path))

    def kill() -> Deferred[None] | None:
        if child.ended.called:
            return None
        assert child.transport is not None
        child.transport.signalProcess("KILL")
        return child.ended

    testcase.addCleanup(kill)
    return child


async def wait_started(node: Node) -> None:
    marker = f"ProxySite starting on {node.proxy_port}"

    def started() -> bool:
        if node.child.ended.called:
            raise AssertionError(
                f"{node.name} ended:\n{node.child.output.decode(errors='replace')[-2000:]}"
                f"\n{node.log_text()[-3000:]}"
            )
        return marker in node.log_text()

    await poll(started, f"{node.name} listening on {node.proxy_port}", bound=60)


# -- clients -------------------------------------------------------------------


@frozen
class Fetched:
    """What one curl transfer got."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    exit_code: int
    error: str

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("x-cache")


#: After each transfer: its URL, status and headers (JSON over several
#: lines), then an end marker.
_CURL_END = "@@end-of-transfer@@"
_CURL_WRITE_OUT = "%{url}\\t%{http_code}\\t%{header_json}\\n" + _CURL_END + "\\n"


def curl_environment() -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    environ.update(LOOPBACK_ONLY)
    environ["CURL_HOME"] = "/nonexistent"
    return environ


async def curl(urls: Iterable[str], directory: Path) -> list[Fetched]:
    """
    One ``curl`` process fetching ``urls`` in parallel (all started at
    once), bodies to files in ``directory``; one :class:`Fetched` per URL,
    in order.  ``--fail`` is not given: a status is an answer to check.
    """
    directory.mkdir(parents=True, exist_ok=True)
    urls = list(urls)
    argv = ["-sS", "--no-progress-meter", "--parallel", "--parallel-immediate", "--parallel-max", "50",
            "--max-time", "120", "--noproxy", "*", "-q", "-w", _CURL_WRITE_OUT]
    bodies = []
    for n, url in enumerate(urls):
        body = directory / f"body-{n}"
        bodies.append(body)
        argv += ["-o", str(body), url]
    out, err, code = await getProcessOutputAndValue(
        "curl", argv, env=curl_environment(), reactor=reactor
    )
    statuses: dict[str, tuple[int, dict[str, str]]] = {}
    for report in out.decode(errors="replace").split(_CURL_END):
        if not report.strip():
            continue
        url, _, rest = report.strip().partition("\t")
        status, _, headers = rest.partition("\t")
        parsed = json.loads(headers) if headers.strip() else {}
        statuses[url] = (int(status or 0), {k.lower(): v[0] for k, v in parsed.items()})
    results = []
    for url, body in zip(urls, bodies):
        status, headers = statuses.get(url, (0, {}))
        data = body.read_bytes() if body.exists() else b""
        results.append(Fetched(url, status, headers, data, code, err.decode(errors="replace")))
    return results


async def fetch_one(url: str, directory: Path) -> Fetched:
    return (await curl([url], directory))[0]
