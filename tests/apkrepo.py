"""
Test support: real Alpine-style packages and repositories built in Python,
and a local HTTP origin that serves them.

Owns the byte layout of test artifacts, matching what abuild writes:
  - ``build_apk`` makes a package from two or three concatenated gzip
    streams: signature (``.SIGN.RSA.key.rsa.pub``, dummy bytes), control
    (``.PKGINFO`` with ``datahash``) and data.  Signature and control tars are
    cut (no end-of-archive blocks, as ``abuild-tar --cut`` does) so the
    inflated streams read as one tar; the data tar ends normally.
  - ``build_apkindex`` makes ``APKINDEX.tar.gz``: a signature stream followed
    by a gzip'd tar of ``DESCRIPTION`` and ``APKINDEX``.
  - ``write_repository`` lays them out as ``<dir>/<arch>/...``.
  - :class:`RepositoryResource` serves a directory the way a plain static origin
    does (``Content-Length``, ``Last-Modified``, ``ETag``, 304 on conditional
    requests, never ``Content-Encoding``), counts requests per path, and can
    hold a response half-way or answer with an error status on demand.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import os
import random
import tarfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "BuiltApk",
    "RecordedRequest",
    "RepositoryResource",
    "SIGNATURE_NAME",
    "build_apk",
    "build_apkindex",
    "gzip_stream",
    "gzip_tar",
    "index_block",
    "listen_on_loopback",
    "write_repository",
]

SIGNATURE_NAME = ".SIGN.RSA.key.rsa.pub"
BUILD_TIME = 1_700_000_000
# Above this much data, the data stream is stored (deflate level 0): test
# padding is random and would not shrink anyway, and level 9 on 40 MB of it
# costs a second per build.
_STORE_ABOVE = 4 * 1024 * 1024
_COPY_BUFFER = 1024 * 1024


@attrs.frozen
class BuiltApk:
    """
    A package built by :func:`build_apk`, with the facts an index lists about it.

    :ivar content: the whole ``.apk`` file.
    :ivar signature_length: length of the leading signature gzip stream in
        ``content``, 0 for an unsigned package.
    :ivar control_length: length of the control gzip stream that follows.
    :ivar control_sha1: SHA-1 of the compressed control stream (the index's
        ``C:``).
    :ivar datahash: hex SHA-256 of the compressed data stream, as written in
        ``.PKGINFO`` (also when ``.PKGINFO`` leaves it out).
    """

    name: str
    version: str
    arch: str
    content: bytes = attrs.field(repr=False)
    signature_length: int
    control_length: int
    installed_size: int
    control_sha1: bytes
    datahash: str
    depends: tuple[str, ...] = ()
    description: str = ""

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.apk"

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def control_checksum(self) -> str:
        """The index's ``C:`` value."""
        return "Q1" + base64.b64encode(self.control_sha1).decode("ascii")

    @property
    def signature_stream(self) -> bytes:
        return self.content[: self.signature_length]

    @property
    def control_stream(self) -> bytes:
        start = self.signature_length
        return self.content[start : start + self.control_length]

    @property
    def data_stream(self) -> bytes:
        return self.content[self.signature_length + self.control_length :]


def gzip_stream(data: bytes, level: int = 9) -> bytes:
    """One gzip member, deterministic (no name, mtime 0) like ``gzip -n``."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def gzip_tar(files: Mapping[str, bytes], *, end_of_archive: bool = True) -> bytes:
    """
    A gzip stream of a tar of ``files``, in the given order.  With
    ``end_of_archive=False`` the tar is cut like ``abuild-tar --cut``.
    """
    sink = _GzipSink(9)
    _write_tar(sink, [(path, content) for path, content in files.items()], end_of_archive)
    return sink.finish()


def build_apk(
    name: str,
    version: str,
    arch: str = "x86_64",
    data_files: Mapping[str, bytes] | None = None,
    depends: Iterable[str] = (),
    data_size_pad: int = 0,
    *,
    description: str | None = None,
    signed: bool = True,
    include_datahash: bool = True,
    pad_seed: int = 0,
) -> BuiltApk:
    """
    Build a package.

    :param data_files: path (relative, ``/``-separated) to contents; parent
        directories are added as directory entries.  Defaults to a single
        small ``usr/share/<name>/README``.
    :param data_size_pad: add ``usr/share/<name>/padding.bin`` with this many
        pseudo-random (incompressible) bytes from ``random.Random(pad_seed)``;
        a 40 MB package builds in well under a second.
    :param signed: prepend the signature stream (real packages always have
        one; without it the package has two gzip streams).
    :param include_datahash: write ``datahash`` into ``.PKGINFO``.
    """
    if description is None:
        description = f"{name} test package"
    if data_files is None:
        data_files = {f"usr/share/{name}/README": f"{name} {version}\n".encode()}
    depends = tuple(depends)
    installed_size = sum(len(content) for content in data_files.values()) + data_size_pad
    level = 0 if installed_size > _STORE_ABOVE else 9

    data_sink = _GzipSink(level)
    entries: list[tuple[str, bytes | _SeededRandomReader]] = []
    file_entries: dict[str, bytes | _SeededRandomReader] = dict(data_files)
    if data_size_pad:
        file_entries[f"usr/share/{name}/padding.bin"] = _SeededRandomReader(
            data_size_pad, pad_seed
        )
    directories: set[str] = set()
    for path in file_entries:
        parts = path.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directories.add("/".join(parts[:depth]))
    for path in sorted(directories | set(file_entries)):
        if path in file_entries:
            entries.append((path, file_entries[path]))
        else:
            entries.append((path + "/", b""))
    _write_tar(data_sink, entries, end_of_archive=True)
    data_stream = data_sink.finish()
    datahash = hashlib.sha256(data_stream).hexdigest()

    pkginfo_lines = [
        "# Generated by buildcache tests/apkrepo.py",
        f"pkgname = {name}",
        f"pkgver = {version}",
        f"pkgdesc = {description}",
        "url = http://127.0.0.1/",
        f"builddate = {BUILD_TIME}",
        "packager = Buildcache Tests <tests@example.invalid>",
        f"size = {installed_size}",
        f"arch = {arch}",
        f"origin = {name}",
        "license = MIT",
        *(f"depend = {dependency}" for dependency in depends),
    ]
    if include_datahash:
        pkginfo_lines.append(f"datahash = {datahash}")
    pkginfo = ("\n".join(pkginfo_lines) + "\n").encode()
    control_stream = gzip_tar({".PKGINFO": pkginfo}, end_of_archive=False)

    signature_stream = b""
    if signed:
        # Dummy "signature" bytes derived from the control stream, the way
        # a real one signs it.
        signature = hashlib.sha512(control_stream).digest() * 4
        signature_stream = gzip_tar({SIGNATURE_NAME: signature}, end_of_archive=False)

    return BuiltApk(
        name=name,
        version=version,
        arch=arch,
        content=signature_stream + control_stream + data_stream,
        signature_length=len(signature_stream),
        control_length=len(control_stream),
        installed_size=installed_size,
        control_sha1=hashlib.sha1(control_stream).digest(),
        datahash=datahash,
        depends=depends,
        description=description,
    )


def index_block(apk: BuiltApk) -> str:
    """The ``APKINDEX`` block describing ``apk``, ending in a blank line."""
    lines = [
        f"C:{apk.control_checksum}",
        f"P:{apk.name}",
        f"V:{apk.version}",
        f"A:{apk.arch}",
        f"S:{apk.size}",
        f"I:{apk.installed_size}",
        f"T:{apk.description}",
        "U:http://127.0.0.1/",
        "L:MIT",
        f"o:{apk.name}",
        f"t:{BUILD_TIME}",
    ]
    if apk.depends:
        lines.append("D:" + " ".join(apk.depends))
    return "\n".join(lines) + "\n\n"


def build_apkindex(
    packages: Sequence[BuiltApk],
    *,
    description: str = "buildcache test repository",
    signed: bool = True,
) -> bytes:
    """
    An ``APKINDEX.tar.gz`` listing ``packages``: a signature stream (unless
    ``signed=False``) followed by a gzip'd tar of ``DESCRIPTION`` and
    ``APKINDEX``.
    """
    text = "".join(index_block(apk) for apk in packages)
    index_stream = gzip_tar(
        {"DESCRIPTION": description.encode(), "APKINDEX": text.encode()}
    )
    if not signed:
        return index_stream
    signature = hashlib.sha512(index_stream).digest() * 4
    return gzip_tar({SIGNATURE_NAME: signature}, end_of_archive=False) + index_stream


def write_repository(
    directory: str | os.PathLike[str],
    packages: Sequence[BuiltApk],
    arch: str = "x86_64",
    *,
    signed: bool = True,
    mtime: float | None = None,
) -> Path:
    """
    Write ``<directory>/<arch>/APKINDEX.tar.gz`` and every package next to it.

    :param mtime: if given, set every written file's modification time to it
        (the origin's ``Last-Modified``); otherwise they get the current time.
    :return: the ``<directory>/<arch>`` path.
    """
    arch_directory = Path(directory) / arch
    arch_directory.mkdir(parents=True, exist_ok=True)
    written = [arch_directory / "APKINDEX.tar.gz"]
    written[0].write_bytes(build_apkindex(packages, signed=signed))
    for apk in packages:
        target = arch_directory / apk.filename
        target.write_bytes(apk.content)
        written.append(target)
    if mtime is not None:
        for path in written:
            os.utime(path, (mtime, mtime))
    return arch_directory


class _SeededRandomReader:
    """File-like source of ``size`` reproducible pseudo-random bytes."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self._remaining = size
        self._random = random.Random(seed)

    def read(self, count: int = -1) -> bytes:
        if count < 0 or count > self._remaining:
            count = self._remaining
        self._remaining -= count
        return self._random.randbytes(count)


class _GzipSink:
    """Write-only file that gzips what it is given into a list of chunks."""

    def __init__(self, level: int) -> None:
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(self._compressor.compress(data))
        return len(data)

    def finish(self) -> bytes:
        self._chunks.append(self._compressor.flush())
        return b"".join(self._chunks)


class _CuttingWriter:
    """
    Passes tar output to a sink until told to stop, so the end-of-archive
    blocks ``TarFile.close`` writes can be dropped.
    """

    def __init__(self, sink: _GzipSink) -> None:
        self._sink = sink
        self._position = 0
        self.passing = True

    def write(self, data: bytes) -> int:
        if self.passing:
            self._sink.write(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position


def _write_tar(
    sink: _GzipSink,
    entries: Sequence[tuple[str, bytes | _SeededRandomReader]],
    end_of_archive: bool,
) -> None:
    writer = _CuttingWriter(sink)
    # Mode "w" (not "w|") writes each member straight through, so what has
    # been written when the last member is added is exactly the cut tar.
    archive = tarfile.open(
        fileobj=writer,  # type: ignore[call-overload]
        mode="w",
        format=tarfile.PAX_FORMAT,
        copybufsize=_COPY_BUFFER,
    )
    for path, content in entries:
        info = tarfile.TarInfo(path.rstrip("/"))
        info.mtime = BUILD_TIME
        info.uname = info.gname = "root"
        if path.endswith("/"):
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
            continue
        info.mode = 0o644
        source: IO[bytes] | _SeededRandomReader
        if isinstance(content, _SeededRandomReader):
            info.size = content.size
            source = content
        else:
            info.size = len(content)
            source = io.BytesIO(content)
        archive.addfile(info, source)  # type: ignore[arg-type]
    writer.passing = end_of_archive
    archive.close()


@attrs.frozen
class RecordedRequest:
    """One request the origin received (header names lower-cased)."""

    method: str
    path: str
    headers: Mapping[str, str]


@implementer(IPushProducer)
class _FlowControl:
    """Lets the response loop wait while the transport asks it to pause."""

    def __init__(self) -> None:
        self.stopped = False
        self.resumed: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        if self.resumed is None:
            self.resumed = Deferred()

    def resumeProducing(self) -> None:
        resumed, self.resumed = self.resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()


class RepositoryResource(Resource):
    """
    Serves the files under ``root`` at their relative paths, like a plain
    static web server (nginx-style ``ETag``), for tests.

    :ivar request_counts: requests received per (percent-decoded) path,
        whatever the answer was.
    :ivar requests: every request received, in order.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = Path(root)
        self.request_counts: collections.Counter[str] = collections.Counter()
        self.requests: list[RecordedRequest] = []
        self._held: dict[str, list[Deferred[None]]] = {}
        self._statuses: dict[str, int] = {}

    def hold(self, path: str) -> None:
        """
        From now on, responses to ``GET path`` send their headers and the
        first half of the body, then wait for :func:`release`.
        """
        self._held.setdefault(path, [])

    def release(self, path: str) -> None:
        """Let held responses for ``path`` finish, and stop holding it."""
        for waiting in self._held.pop(path, []):
            waiting.callback(None)

    def set_status(self, path: str, code: int | None) -> None:
        """Answer ``path`` with an empty ``code`` response (``None``: serve it)."""
        if code is None:
            self._statuses.pop(path, None)
        else:
            self._statuses[path] = code

    def render_HEAD(self, request: Request) -> bytes | int:
        return self._render(request)

    def render_GET(self, request: Request) -> bytes | int:
        return self._render(request)

    def _render(self, request: Request) -> bytes | int:
        path = unquote((request.path or b"/").decode("utf-8", "replace"))
        method = (request.method or b"GET").decode("ascii", "replace")
        self.request_counts[path] += 1
        self.requests.append(
            RecordedRequest(
                method=method,
                path=path,
                headers={
                    name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
            )
        )
        forced = self._statuses.get(path)
        if forced is not None:
            request.setResponseCode(forced)
            request.setHeader(b"content-length", b"0")
            return b""
        file_path = self._file_for(path)
        if file_path is None:
            request.setResponseCode(http.NOT_FOUND)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        status = file_path.stat()
        etag = f'"{status.st_mtime_ns:x}-{status.st_size:x}"'
        request.setHeader(b"etag", etag.encode("ascii"))
        request.setHeader(
            b"last-modified", http.datetimeToString(int(status.st_mtime))
        )
        if _not_modified(request, etag, int(status.st_mtime)):
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(status.st_size).encode("ascii"))
        if request.method == b"HEAD":
            return b""
        sending = Deferred.fromCoroutine(
            self._send_body(request, path, file_path, status.st_size)
        )
        sending.addErrback(self._log_send_failure, path)
        return NOT_DONE_YET

    def _file_for(self, path: str) -> Path | None:
        segments = path.lstrip("/").split("/")
        if any(segment in ("", ".", "..") for segment in segments):
            return None
        candidate = self.root.joinpath(*segments)
        return candidate if candidate.is_file() else None

    async def _send_body(
        self, request: Request, path: str, file_path: Path, size: int
    ) -> None:
        flow = _FlowControl()
        request.notifyFinish().addErrback(lambda _: flow.stopProducing())
        request.registerProducer(flow, True)
        sent = 0
        with file_path.open("rb") as body:
            while not flow.stopped:
                if path in self._held and sent >= size // 2:
                    waiting: Deferred[None] = Deferred()
                    self._held[path].append(waiting)
                    await waiting
                    continue
                limit = 64 * 1024
                if path in self._held:
                    limit = min(limit, max(size // 2 - sent, 1))
                chunk = body.read(limit)
                if not chunk:
                    break
                request.write(chunk)
                sent += len(chunk)
                if flow.resumed is not None:
                    await flow.resumed
        if flow.stopped:
            return
        request.unregisterProducer()
        request.finish()

    def _log_send_failure(self, failure: Failure, path: str) -> None:
        self._log.failure("Serving {path} failed", failure, path=path)


def _not_modified(request: Request, etag: str, mtime: int) -> bool:
    """
    RFC 9110 precedence: If-None-Match decides when present, otherwise
    If-Modified-Since compared by date (304 if unchanged since then).
    """
    if_none_match = request.getHeader(b"if-none-match")
    if if_none_match is not None:
        candidates = [
            tag.strip().removeprefix("W/")
            for tag in if_none_match.decode("latin-1").split(",")
        ]
        return "*" in candidates or etag in candidates
    if_modified_since = request.getHeader(b"if-modified-since")
    if if_modified_since is None:
        return False
    try:
        since = http.stringToDatetime(if_modified_since.split(b";", 1)[0])
    except ValueError:
        return False
    return mtime <= since


class _ListensOnTCP(Protocol):
    """The part of ``IReactorTCP`` used here (typed for mypy)."""

    def listenTCP(
        self, port: int, factory: Site, backlog: int = 50, interface: str = ""
    ) -> tcp.Port: ...


def listen_on_loopback(reactor: _ListensOnTCP, resource: Resource) -> tuple[tcp.Port, str]:
    """
    Serve ``resource`` on an ephemeral 127.0.0.1 port.

    :param reactor: an ``IReactorTCP`` provider.
    :return: the listening port (stop it in cleanup) and its base URL,
        ``http://127.0.0.1:<port>`` without a trailing slash.
    """
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


def build_apk_of_size(
    name: str, target_size: int, arch: str = "x86_64", seed: int = 0
) -> BuiltApk:
    """
    A package whose file is very close to ``target_size`` bytes (the data
    stream is padded with seeded, incompressible bytes).
    """
    probe = build_apk(name, "1.0-r0", arch, data_size_pad=1, pad_seed=seed)
    overhead = probe.size - 1
    return build_apk(
        name, "1.0-r0", arch, data_size_pad=max(1, target_size - overhead), pad_seed=seed
    )
