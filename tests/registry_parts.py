"""
The real parts of the registry end-to-end tests and of ``bench/registry.py``:
Debian's ``docker-registry`` as an origin, ``skopeo`` with a private
configuration that names only loopback registries, and the buildcache
service with its registry port; it also gathers the OCI images built by
hand (:mod:`tests.oci_layout`) and the counting forwarder
(:mod:`tests.registry_forwarder`), so one import serves.  containerd is in
:mod:`tests.containerd_parts`.

Nothing here talks to anything but 127.0.0.1, and every client runs with
:data:`LOOPBACK_ONLY`.  Two kinds of helpers:

- plain functions and ``subprocess`` (for the bench, which runs no reactor
  while it measures): :func:`build_image`, :func:`write_registry_config`,
  :func:`registry_argv`, :class:`Skopeo` (``argv``/``run``),
  :func:`access_log_counts`;
- Twisted ones (for trial tests, whose reactor keeps serving while a client
  runs): :func:`start_registry`, :func:`start_buildcache`,
  :class:`CountingForwarder`, :meth:`Skopeo.call`, :func:`run_process`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from buildcache.config import Config, Registry
from buildcache.service import make_service

# The parts this module gathers for its users (tests, bench/registry.py).
from tests.oci_layout import (  # noqa: F401
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    Manifest,
    OciImage,
    build_image,
    layout_blobs,
    sha256_file,
)
from tests.registry_forwarder import CountingForwarder, Seen, require_loopback  # noqa: F401
from tests.support import ChildProcess

reactor: Any = _reactor


#: The Accept header containerd 1.6's resolver sends for a manifest (HEAD by
#: tag, GET by digest), as captured from ``ctr images pull`` on this machine.
CONTAINERD_MANIFEST_ACCEPT = ", ".join(
    [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"]
)

#: The Accept header skopeo 1.9 sends for a manifest by tag (a GET; no
#: ``*/*``), as captured here.
SKOPEO_MANIFEST_ACCEPT = ", ".join([
    OCI_MANIFEST, DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_LIST, OCI_INDEX,
])

#: Environment for every client a test runs: anything not on loopback
#: goes to a proxy where nothing listens (port 9), so a client that would
#: fall back to a real registry (a config it could not read, a mirror that
#: failed) fails instead, without even a DNS lookup.
LOOPBACK_ONLY = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}

REGISTRY_BINARY = "docker-registry"
SKOPEO_BINARY = "skopeo"
CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr"


def missing_binaries(*names: str) -> list[str]:
    """The names among ``names`` not found on ``PATH``."""
    return [name for name in names if shutil.which(name) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- docker-registry (the origin) -----------------------------------------


def htpasswd_line(user: str, password: str) -> str:
    """
    ``user:BCRYPT-HASH``, the only htpasswd form ``docker-registry`` takes,
    made with the system's libcrypt (any Python version).
    """
    library = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    library.crypt_gensalt.restype = ctypes.c_char_p
    library.crypt.restype = ctypes.c_char_p
    salt = library.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = library.crypt(password.encode(), salt)
    if not salt or not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt cannot make a bcrypt hash here")
    return f"{user}:{hashed.decode()}"


def write_registry_config(
    directory: Path, port: int, proxy_remote: str | None = None,
    htpasswd: tuple[str, str] | None = None,
) -> Path:
    """
    ``directory/config.yml`` for ``docker-registry serve``: filesystem
    storage in ``directory/storage``, listening on 127.0.0.1:``port``, its
    access log on stdout and its info log on stderr; a pull-through proxy of
    ``proxy_remote`` (an http URL on loopback) when given; with
    ``htpasswd`` (user, password) every request needs those credentials
    (HTTP Basic).
    """
    if proxy_remote is not None:
        require_loopback(proxy_remote)
    directory.mkdir(parents=True, exist_ok=True)
    storage = directory / "storage"
    storage.mkdir(exist_ok=True)
    # JSON is YAML: no YAML writer needed.
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # A fixed secret keeps the start-up warning out of the log.
        "http": {"addr": f"127.0.0.1:{port}", "secret": "registry-parts-test-secret"},
    }
    if proxy_remote is not None:
        config["proxy"] = {"remoteurl": proxy_remote}
    if htpasswd is not None:
        # Basic authentication (401 with a Basic challenge), plain HTTP.
        users = directory / "htpasswd"
        users.write_text(htpasswd_line(*htpasswd) + "\n")
        config["auth"] = {"htpasswd": {"realm": "registry-parts", "path": str(users)}}
    path = directory / "config.yml"
    path.write_text(json.dumps(config, indent=1))
    return path


def registry_argv(config: Path) -> list[str]:
    return [shutil.which(REGISTRY_BINARY) or REGISTRY_BINARY, "serve", str(config)]


class _OnLoopback:
    """A registry listening on 127.0.0.1 at ``port``: its authority and URL."""

    port: int

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}"


_ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) ([^ "?]+)[^ "]* HTTP/[0-9.]+" ([0-9]{3}) ')


def access_log_counts(text: str, status: int | None = None) -> Counter[tuple[str, str]]:
    """
    Requests by (method, path) in a ``docker-registry`` access log (its
    combined-format lines, on its standard error), only those answered ``status`` when given.  A line
    is written once its response is done: read it after the clients
    finished and the registry stopped (a test uses the forwarder instead).
    """
    found: Counter[tuple[str, str]] = Counter()
    for method, path, code in _ACCESS_LINE.findall(text):
        if status is None or int(code) == status:
            found[(method, path)] += 1
    return found


def spawn_child(testcase: Any, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
           path: str | None = None) -> ChildProcess:
    child = ChildProcess(name)
    reactor.spawnProcess(child, argv[0], list(argv), env=dict(env or os.environ), path=path)
    testcase.addCleanup(child.stop)
    return child


@define
class RunningRegistry(_OnLoopback):
    """A ``docker-registry`` child of the test's reactor."""

    directory: Path
    port: int
    child: ChildProcess

    def stop(self) -> Deferred[None]:
        return self.child.stop()


async def start_registry(
    testcase: Any, directory: Path, proxy_remote: str | None = None,
    htpasswd: tuple[str, str] | None = None,
) -> RunningRegistry:
    """
    ``docker-registry`` on a free loopback port with its own config and
    storage in ``directory``, ready when this returns; stopped (SIGTERM by
    PID) in the test's cleanup.
    """
    port = free_port()
    config = write_registry_config(directory, port, proxy_remote, htpasswd)
    child = spawn_child(testcase, "docker-registry", registry_argv(config))
    await child.wait_for(b"listening on 127.0.0.1:%d" % port)
    return RunningRegistry(directory, port, child)


# -- skopeo ------------------------------------------------------------------


@frozen
class RegistryEntry:
    """
    One ``[[registry]]`` table: ``prefix`` (what image names it matches;
    may be a real registry's name such as ``docker.io``, as long as
    ``location`` overrides it with a loopback one) pulled from ``location``
    after trying each of ``mirrors`` (``host:port[/path]``, all loopback).
    """

    prefix: str
    location: str
    mirrors: tuple[str, ...] = ()

    def toml(self) -> str:
        require_loopback(self.location)
        lines = [
            "[[registry]]",
            f'prefix = "{self.prefix}"',
            f'location = "{self.location}"',
            "insecure = true",
            "blocked = false",
        ]
        for mirror in self.mirrors:
            require_loopback(mirror)
            lines += ["", "[[registry.mirror]]", f'location = "{mirror}"', "insecure = true"]
        return "\n".join(lines) + "\n"


def registries_conf(entries: Iterable[RegistryEntry]) -> str:
    """
    A ``registries.conf`` naming only the given (loopback) registries and no
    search registry, so a short or unknown name is never resolved against a
    real registry.
    """
    parts = ['unqualified-search-registries = []', 'short-name-mode = "enforcing"', ""]
    parts += [entry.toml() for entry in entries]
    return "\n".join(parts)


@define
class Skopeo:
    """
    skopeo with a private configuration in ``directory``: its
    ``registries.conf`` (``--registries-conf``; only the loopback
    registries given), a ``policy.json`` accepting anything (``--policy``),
    an empty ``registries.d`` (no lookaside sites), and ``HOME``,
    ``XDG_RUNTIME_DIR``, ``XDG_CONFIG_HOME`` and ``TMPDIR`` inside it (no
    ``auth.json``, no per-user ``registries.conf``).  skopeo 1.9 still reads
    ``/etc/containers/registries.conf.d/`` (Debian ships short-name aliases
    there only; every reference here is fully qualified, so none applies).
    """

    directory: Path
    entries: tuple[RegistryEntry, ...] = ()

    def __attrs_post_init__(self) -> None:
        for sub in ("home", "run", "config", "tmp", "registries.d"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "run").chmod(0o700)
        self.write_registries(self.entries)
        (self.directory / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )

    def write_registries(self, entries: Iterable[RegistryEntry]) -> None:
        self.entries = tuple(entries)
        (self.directory / "registries.conf").write_text(registries_conf(self.entries))

    @property
    def environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.directory / "home"),
            "XDG_RUNTIME_DIR": str(self.directory / "run"),
            "XDG_CONFIG_HOME": str(self.directory / "config"),
            "TMPDIR": str(self.directory / "tmp"),
            **LOOPBACK_ONLY,
        }

    def argv(self, *arguments: str, debug: bool = False) -> list[str]:
        return [
            shutil.which(SKOPEO_BINARY) or SKOPEO_BINARY,
            *(["--debug"] if debug else []),
            "--registries-conf", str(self.directory / "registries.conf"),
            "--registries.d", str(self.directory / "registries.d"),
            "--policy", str(self.directory / "policy.json"),
            "--tmpdir", str(self.directory / "tmp"),
            *arguments,
        ]

    def push_arguments(
        self, image: OciImage, destination: str, format: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> list[str]:
        """
        ``copy`` arguments pushing ``image`` to ``docker://destination``
        (``127.0.0.1:PORT/team/app:tag``, over plain HTTP): ``format``
        ``v2s2`` converts it to a Docker v2 schema 2 manifest (list); the
        OCI manifest is pushed unchanged without it.
        """
        require_loopback(destination)
        arguments = ["copy", "--quiet", "--dest-tls-verify=false"]
        if image.is_index:
            arguments.append("--all")
        if format is not None:
            arguments += ["--format", format]
        if credentials is not None:
            arguments += ["--dest-creds", ":".join(credentials)]
        return [*arguments, image.reference, f"docker://{destination}"]

    def pull_arguments(self, source: str, directory: Path) -> list[str]:
        """
        ``copy`` arguments pulling ``docker://source`` (resolved through
        ``registries.conf``, so through its mirrors) into ``directory`` with
        the ``dir:`` transport, which keeps every manifest and blob as it
        was received (``oci:`` would convert a Docker manifest); read it
        with :func:`pulled_blobs`.
        """
        return ["copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
                f"docker://{source}", f"dir:{directory}"]

    def run(self, *arguments: str, debug: bool = False) -> subprocess.CompletedProcess[bytes]:
        """Run skopeo blocking (the bench; a test pushing straight to the origin)."""
        done = subprocess.run(
            self.argv(*arguments, debug=debug), env=self.environment, capture_output=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"skopeo {' '.join(arguments)} exited {done.returncode}:\n"
                + done.stderr.decode(errors="replace")[-3000:]
            )
        return done

    def push(self, image: OciImage, destination: str, format: str | None = None) -> None:
        self.run(*self.push_arguments(image, destination, format))

    async def call(self, *arguments: str, debug: bool = False) -> tuple[bytes, bytes, int]:
        """Run skopeo while the reactor keeps serving: (stdout, stderr, exit code)."""
        argv = self.argv(*arguments, debug=debug)
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=self.environment, path=str(self.directory), reactor=reactor
        )
        return out, err, code


async def run_process(argv: Sequence[str], env: Mapping[str, str] | None = None,
                      path: str | None = None) -> tuple[bytes, bytes, int]:
    """Run a child while the reactor keeps serving: (stdout, stderr, exit code)."""
    out, err, code = await getProcessOutputAndValue(
        argv[0], list(argv[1:]), env=dict(env if env is not None else os.environ),
        path=path, reactor=reactor,
    )
    return out, err, code


def pulled_blobs(directory: Path) -> tuple[str, dict[str, int]]:
    """
    What ``skopeo copy ... dir:DIRECTORY`` wrote: the digest of the top
    manifest (``manifest.json``, as received) and every blob and instance
    manifest (digest -> size), each file's digest checked against its name.
    """
    found = {}
    for path in sorted(directory.iterdir()):
        name = path.name.removesuffix(".manifest.json")
        if len(name) != 64 or not all(c in "0123456789abcdef" for c in name):
            continue
        digest = sha256_file(path)
        if digest != "sha256:" + name:
            raise AssertionError(f"{path} holds {digest}")
        found[digest] = path.stat().st_size
    return sha256_file(directory / "manifest.json"), found


# -- the service ---------------------------------------------------------------


def dead_authority() -> str:
    """A loopback ``host:port`` where nothing listens (connection refused)."""
    return f"127.0.0.1:{free_port()}"


def start_buildcache(
    testcase: Any, cache: Path, registries: tuple[Registry, ...], index_ttl: float = 300
) -> str:
    """
    The whole buildcache service (``make_service``, as twistd starts it) with these
    upstream registries (loopback; ``docker.io`` always among them),
    stopped in cleanup; returns its registry port's ``host:port``.
    """
    assert any(registry.name == "docker.io" for registry in registries)
    port = free_port()
    config = Config(
        cache_dir=str(cache),
        proxy_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
        index_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
        pypi_upstreams=(f"http://{dead_authority()}/simple",),
        mirrors=(),
        registry_endpoint=f"tcp:{port}:interface=127.0.0.1",
        registries=registries,
        allow_upstream=("127.0.0.1",),
        index_ttl=index_ttl,
    )
    service = make_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    testcase.addCleanup(service.stopService)
    return f"127.0.0.1:{port}"


def tls_client_hello() -> bytes:
    """The first bytes a TLS client sends (a client hello), from Python's ssl."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = context.wrap_bio(incoming, outgoing, server_hostname="box.test")
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _Exchange(Protocol):
    """Sends bytes on connecting; collects what comes back until closed."""

    def __init__(self, send: bytes) -> None:
        self.send = send
        self.received = bytearray()
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(bytes(self.received))


async def answer_to(authority: str, data: bytes) -> bytes:
    """Send ``data`` on a new connection to ``authority``; all it got back until closed."""
    host, port = authority.rsplit(":", 1)
    exchange = _Exchange(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), exchange)
    return await exchange.closed
