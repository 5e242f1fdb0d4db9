"""
``buildcache warm``: fetching packages through a running server so that
later builds find them cached.  It talks only HTTP to the server (the
synchronous standard library client: this is a short-lived command, not
the server), so that everything it asks for goes through the server's
cache.
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import TextIO
from urllib.parse import quote, urljoin, urlsplit

from attrs import frozen

from buildcache import __version__
from buildcache.config import DEFAULT_INDEX_PORT, DEFAULT_PROXY_PORT
from buildcache.ecosystems.apk.index import (
    ALPINE_ARCHES,
    ApkIndex,
    ApkIndexEntry,
    ApkIndexError,
    parse_apkindex,
)
from buildcache.ops.cli_output import AdminError, Progress

#: Bytes read at a time when downloading.
CHUNK_SIZE = 1024 * 1024
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PROXY_PORT}"
DEFAULT_INDEX = f"http://127.0.0.1:{DEFAULT_INDEX_PORT}/simple/"
DEFAULT_HTTP_TIMEOUT = 120.0

_DEPENDENCY_OPERATOR = re.compile(r"[<>=~]")
# Machine names that differ from Alpine's architecture directory names.
_ALPINE_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "i686": "x86", "i386": "x86"}


@frozen
class WarmResult:
    """
    What ``warm`` fetched through the server, and what it could not.
    """

    fetched: tuple[tuple[str, int, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    unresolved: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.fetched)


@frozen
class ServerClient:
    """
    Blocking HTTP to a running buildcache server: its own URLs (mirror
    routes) directly, any other http URL through it as a forward proxy.
    Proxy settings of the environment are ignored either way: the point is
    to go through this server.
    """

    server: str
    timeout: float = DEFAULT_HTTP_TIMEOUT

    def url_for(self, location: str) -> str:
        """
        An absolute URL for ``location``: a path (``alpine/v3.20/main``) is
        taken relative to the server.
        """
        if "://" not in location:
            return urljoin(self.server.rstrip("/") + "/", location.lstrip("/"))
        if urlsplit(location).scheme != "http":
            raise AdminError(
                f"{location}: only http URLs can be cached by the server (an"
                " https URL through a proxy is an opaque tunnel); use the"
                f" server's mirror route, e.g. {self.server.rstrip('/')}/alpine/v3.20/main"
            )
        return location

    def open(self, url: str) -> http.client.HTTPResponse:
        if urlsplit(url).netloc == urlsplit(self.server).netloc:
            handler = urllib.request.ProxyHandler({})
        else:
            handler = urllib.request.ProxyHandler({"http": self.server})
        opener = urllib.request.build_opener(handler)
        request = urllib.request.Request(url, headers={"User-Agent": f"buildcache-warm/{__version__}"})
        try:
            response: http.client.HTTPResponse = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise AdminError(f"{url}: the server answered {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise AdminError(
                f"{url}: cannot reach the server at {self.server} ({reason});"
                " is it running? (--server)"
            ) from None
        return response


def default_alpine_arch() -> str:
    machine = platform.machine().lower()
    machine = _ALPINE_ARCH_ALIASES.get(machine, machine)
    return machine if machine in ALPINE_ARCHES else "x86_64"


def _dependency_name(token: str) -> str | None:
    """
    The package name a ``D:`` token asks for, without its version
    constraint; None for a conflict (``!name``), which asks for nothing.
    """
    if token.startswith("!"):
        return None
    return _DEPENDENCY_OPERATOR.split(token, maxsplit=1)[0]


@frozen
class ApkResolution:
    """
    The packages to fetch, by repository, and what could not be resolved.
    """

    packages: tuple[tuple[str, ApkIndexEntry], ...]
    unresolved: tuple[str, ...]
    not_found: tuple[str, ...]


def resolve_apk_closure(
    indexes: Sequence[tuple[str, ApkIndex]], names: Iterable[str]
) -> ApkResolution:
    """
    The named packages and, recursively, their dependencies, by package
    name; the first repository that lists a name provides it.

    Dependencies on something other than a package name (``so:``,
    ``cmd:``, ``pc:``) are satisfied through the ``p:`` (provides) of
    other packages; package names come first.  What nothing provides is
    returned in ``unresolved``, and named packages no repository lists in
    ``not_found``.
    """
    by_name: dict[str, tuple[str, ApkIndexEntry]] = {}
    for repository, index in indexes:
        for entry in index.values():
            by_name.setdefault(entry.name, (repository, entry))
    for repository, index in indexes:
        for entry in index.values():
            for provided in entry.provides:
                name = _dependency_name(provided)
                if name is not None:
                    by_name.setdefault(name, (repository, entry))
    chosen: dict[str, tuple[str, ApkIndexEntry]] = {}
    unresolved: dict[str, None] = {}
    not_found: list[str] = []
    pending = [(name, True) for name in names]
    while pending:
        name, asked = pending.pop(0)
        if name in chosen:
            continue
        found = by_name.get(name)
        if found is None:
            if asked:
                not_found.append(name)
            else:
                unresolved[name] = None
            continue
        chosen[name] = found
        for token in found[1].depends:
            dependency = _dependency_name(token)
            if dependency is not None and dependency not in chosen:
                pending.append((dependency, False))
    return ApkResolution(tuple(chosen.values()), tuple(unresolved), tuple(not_found))


def warm_apk(
    client: ServerClient,
    repositories: Sequence[str],
    packages: Sequence[str],
    arch: str,
    stderr: TextIO,
) -> WarmResult:
    """
    Fetch ``packages`` and their dependencies from ``repositories`` through
    the server, with a progress bar on ``stderr``.
    """
    indexes: list[tuple[str, ApkIndex]] = []
    for repository in repositories:
        base = client.url_for(repository).rstrip("/")
        url = f"{base}/{arch}/APKINDEX.tar.gz"
        with client.open(url) as response:
            try:
                indexes.append((base, parse_apkindex(response)))
            except (ApkIndexError, OSError, http.client.HTTPException) as error:
                raise AdminError(f"{url}: not a usable APKINDEX.tar.gz ({error})") from None
    resolution = resolve_apk_closure(indexes, packages)
    progress = Progress.on(
        stderr, len(resolution.packages),
        sum(entry.size for _, entry in resolution.packages),
    )
    fetched: list[tuple[str, int, str]] = []
    failed: list[tuple[str, str]] = []
    for base, entry in resolution.packages:
        url = f"{base}/{arch}/{quote(entry.filename)}"
        progress.start(entry.filename)
        try:
            size, cache_status = _download(client, url, progress)
        except AdminError as error:
            failed.append((url, str(error)))
            progress.finished(entry.filename, 0, "FAILED")
            continue
        if size != entry.size:
            failed.append((url, f"received {size} bytes, the index says {entry.size}"))
            progress.finished(entry.filename, size, "FAILED")
            continue
        fetched.append((url, size, cache_status))
        progress.finished(entry.filename, size, cache_status)
    progress.close()
    return WarmResult(
        tuple(fetched), tuple(failed), resolution.unresolved, resolution.not_found
    )


def _download(client: ServerClient, url: str, progress: Progress) -> tuple[int, str]:
    """
    GET ``url`` and discard the body (the server keeps it); returns the
    bytes received and the server's ``X-Cache``.
    """
    received = 0
    with client.open(url) as response:
        cache_status = response.headers.get("x-cache", "")
        try:
            while chunk := response.read(CHUNK_SIZE):
                received += len(chunk)
                progress.advance(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise AdminError(f"{url}: the body was cut short ({error!r})") from None
    return received, cache_status


def warm_requirements(
    requirement_files: Sequence[str],
    index_url: str,
    pip_arguments: Sequence[str],
    python: str,
    stderr: TextIO,
    environ: Mapping[str, str],
) -> WarmResult:
    """
    Let pip resolve and download the requirements' closure from the
    server's index into a temporary directory, then delete it: the server
    keeps every page and file pip asked for.

    pip runs isolated (no user configuration or ``PIP_*`` variables, which
    could add another index) and without its own cache (which would answer
    instead of the server); its output is copied to ``stderr``.
    """
    host = urlsplit(index_url).hostname or "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="buildcache-warm-") as destination:
        command = [
            python, "-m", "pip", "download", "--isolated", "--no-cache-dir",
            "--disable-pip-version-check", "--no-input",
            "--index-url", index_url, "--trusted-host", host,
            "--dest", destination,
        ]
        for requirement_file in requirement_files:
            command += ["--requirement", os.path.abspath(requirement_file)]
        command += list(pip_arguments)
        try:
            pip = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=dict(environ),
            )
        except OSError as error:
            raise AdminError(f"cannot run {python} -m pip: {error}") from None
        assert pip.stdout is not None
        with pip.stdout:
            for line in pip.stdout:
                stderr.write(line.decode("utf-8", "replace"))
                stderr.flush()
        status = pip.wait()
        fetched = tuple(
            (entry.name, entry.stat().st_size, "")
            for entry in sorted(os.scandir(destination), key=lambda e: e.name)
            if entry.is_file()
        )
    if status != 0:
        return WarmResult(fetched, ((index_url, f"pip download exited with status {status}"),))
    return WarmResult(fetched)



def index_beside(server: str) -> str:
    """
    The simple index of the server whose proxy port is at ``server``: the
    default index port of the same host (``--server http://box:8899`` is
    ``http://box:3141/simple/``).
    """
    host = urlsplit(server).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{DEFAULT_INDEX_PORT}/simple/"

