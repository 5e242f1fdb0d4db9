"""
A small, real Python package index for tests.

:func:`build_index` writes installable wheels (with correct ``RECORD``), sdists
and PEP 658 metadata files for two demo projects to a directory and returns
the :class:`IndexFixture` describing them; :class:`StaticSimpleIndex` serves that fixture
over HTTP as a PEP 503/691 upstream, counting requests and able to fail on
demand.

The projects:

  - ``bcdemo-b``: 0.5 (wheel, yanked without reason), 1.0 (wheel + sdist),
    2.0 (wheel, yanked "broken build").
  - ``bcdemo-a``: 1.0 (wheel + sdist, needs ``bcdemo-b``), 2.0 (wheel + sdist,
    needs ``bcdemo-b>=1.0``, Python >=3.8), 3.0 (wheel, Python >=4).

So a resolver honouring the index installs ``bcdemo-a 2.0`` and
``bcdemo-b 1.0``.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import io
import tarfile
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urljoin

import attrs
from twisted.web.http import (
    MOVED_PERMANENTLY,
    NOT_ACCEPTABLE,
    NOT_FOUND,
    NOT_MODIFIED,
    OK,
    SERVICE_UNAVAILABLE,
)
from twisted.web.resource import Resource
from twisted.web.server import Request

from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LEGACY_HTML,
    ProjectFile,
    ProjectPage,
    normalize_project_name,
)
from buildcache.ecosystems.pypi.render import (
    choose_media_type,
    render_page,
    render_root_html,
    render_root_json,
)

# 2024-01-01T00:00:00Z: every fixture file claims this modification time.
FIXTURE_EPOCH = 1704067200.0

_ZIP_TIMESTAMP = (2024, 1, 1, 0, 0, 0)


@attrs.frozen
class DemoRelease:
    """
    One release of a demo project, as the fixture builds it.
    """

    project: str
    version: str
    requires: tuple[str, ...] = ()
    requires_python: str | None = None
    sdist: bool = False
    yanked: bool | str = False


DEMO_RELEASES: tuple[DemoRelease, ...] = (
    DemoRelease("bcdemo-b", "0.5", yanked=True),
    DemoRelease("bcdemo-b", "1.0", sdist=True),
    DemoRelease("bcdemo-b", "2.0", yanked="broken build"),
    DemoRelease("bcdemo-a", "1.0", requires=("bcdemo-b",), sdist=True),
    DemoRelease(
        "bcdemo-a",
        "2.0",
        requires=("bcdemo-b>=1.0",),
        requires_python=">=3.8",
        sdist=True,
    ),
    DemoRelease(
        "bcdemo-a", "3.0", requires=("bcdemo-b>=1.0",), requires_python=">=4"
    ),
)


def _distribution_name(project: str) -> str:
    return normalize_project_name(project).replace("-", "_")


def core_metadata(release: DemoRelease) -> bytes:
    """
    The ``METADATA`` / ``PKG-INFO`` text of a release.
    """
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {release.project}",
        f"Version: {release.version}",
        f"Summary: buildcache test project {release.project}",
    ]
    if release.requires_python is not None:
        lines.append(f"Requires-Python: {release.requires_python}")
    lines += [f"Requires-Dist: {requirement}" for requirement in release.requires]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _record_digest(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
    return "sha256=" + digest.rstrip(b"=").decode("ascii")


def make_wheel(release: DemoRelease) -> tuple[str, bytes]:
    """
    Build a pure-Python wheel for ``release``: (file name, bytes).

    The bytes are deterministic, so digests are stable across runs.
    """
    distribution = _distribution_name(release.project)
    dist_info = f"{distribution}-{release.version}.dist-info"
    members: list[tuple[str, bytes]] = [
        (
            f"{distribution}/__init__.py",
            f'__version__ = "{release.version}"\n'.encode("ascii"),
        ),
        (f"{dist_info}/METADATA", core_metadata(release)),
        (
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\n"
            b"Generator: buildcache-tests\n"
            b"Root-Is-Purelib: true\n"
            b"Tag: py3-none-any\n\n",
        ),
    ]
    record = "".join(
        f"{path},{_record_digest(data)},{len(data)}\n" for path, data in members
    )
    record += f"{dist_info}/RECORD,,\n"
    members.append((f"{dist_info}/RECORD", record.encode("utf-8")))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in members:
            info = zipfile.ZipInfo(path, _ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    filename = f"{distribution}-{release.version}-py3-none-any.whl"
    return filename, buffer.getvalue()


def make_sdist(release: DemoRelease) -> tuple[str, bytes]:
    """
    Build a source distribution for ``release``: (file name, bytes).
    """
    distribution = _distribution_name(release.project)
    root = f"{distribution}-{release.version}"
    pyproject = (
        "[build-system]\n"
        'requires = ["setuptools>=61"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        f'name = "{release.project}"\n'
        f'version = "{release.version}"\n'
    )
    if release.requires_python is not None:
        pyproject += f'requires-python = "{release.requires_python}"\n'
    pyproject += "dependencies = [%s]\n" % ", ".join(
        f'"{requirement}"' for requirement in release.requires
    )
    members = [
        (f"{root}/PKG-INFO", core_metadata(release)),
        (f"{root}/pyproject.toml", pyproject.encode("utf-8")),
        (
            f"{root}/{distribution}/__init__.py",
            f'__version__ = "{release.version}"\n'.encode("ascii"),
        ),
    ]
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in members:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = int(FIXTURE_EPOCH)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    gzip_buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=gzip_buffer, mtime=0
    ) as compressed:
        compressed.write(tar_buffer.getvalue())
    return f"{root}.tar.gz", gzip_buffer.getvalue()


@attrs.frozen
class IndexFixture:
    """
    The demo index written to disk.

    :ivar directory: Where the files are: ``directory/files/<filename>`` and
        ``directory/files/<wheel>.metadata``.
    :ivar projects: Normalised name to page; file URLs are the path-absolute
        ``/files/<filename>`` (see :meth:`IndexFixture.page` for absolute ones).
    :ivar metadata: Wheel file name to its core metadata bytes, for wheels
        whose metadata file exists.
    """

    directory: Path
    projects: Mapping[str, ProjectPage] = attrs.field(hash=False)
    metadata: Mapping[str, bytes] = attrs.field(hash=False)

    @property
    def files_directory(self) -> Path:
        return self.directory / "files"

    def path_for(self, filename: str) -> Path:
        return self.files_directory / filename

    def content(self, filename: str) -> bytes:
        return self.path_for(filename).read_bytes()

    def file(self, filename: str) -> ProjectFile:
        for page in self.projects.values():
            found = page.file_named(filename)
            if found is not None:
                return found
        raise KeyError(filename)

    def page(self, name: str, root_url: str) -> ProjectPage:
        """
        The page of project ``name`` with file URLs made absolute against
        ``root_url`` (e.g. ``"http://127.0.0.1:8080/"``).
        """
        page = self.projects[normalize_project_name(name)]
        return attrs.evolve(
            page,
            files=tuple(
                attrs.evolve(file, url=urljoin(root_url, file.url))
                for file in page.files
            ),
        )


def build_index(
    directory: str | Path,
    *,
    releases: Sequence[DemoRelease] = DEMO_RELEASES,
    with_metadata: bool = True,
) -> IndexFixture:
    """
    Write the demo index under ``directory`` and describe it.

    :param with_metadata: Write ``<wheel>.metadata`` files and advertise them
        with their sha256 (PEP 658); when false, neither.
    """
    files_directory = Path(directory) / "files"
    files_directory.mkdir(parents=True, exist_ok=True)
    project_files: dict[str, list[ProjectFile]] = {}
    project_versions: dict[str, list[str]] = {}
    metadata: dict[str, bytes] = {}
    upload_day = 0
    for release in releases:
        name = normalize_project_name(release.project)
        versions = project_versions.setdefault(name, [])
        if release.version not in versions:
            versions.append(release.version)
        built = [make_wheel(release)]
        if release.sdist:
            built.append(make_sdist(release))
        for filename, data in built:
            upload_day += 1
            (files_directory / filename).write_bytes(data)
            advertised: bool | dict[str, str] = False
            if with_metadata and filename.endswith(".whl"):
                metadata_bytes = core_metadata(release)
                (files_directory / f"{filename}.metadata").write_bytes(metadata_bytes)
                metadata[filename] = metadata_bytes
                advertised = {"sha256": hashlib.sha256(metadata_bytes).hexdigest()}
            project_files.setdefault(name, []).append(
                ProjectFile(
                    filename=filename,
                    url=f"/files/{quote(filename)}",
                    hashes={"sha256": hashlib.sha256(data).hexdigest()},
                    requires_python=release.requires_python,
                    yanked=release.yanked,
                    core_metadata=advertised,
                    size=len(data),
                    upload_time=f"2024-01-{upload_day:02d}T12:00:00.000000Z",
                )
            )
    projects = {
        name: ProjectPage(
            name=name,
            files=tuple(files),
            versions=tuple(project_versions[name]),
            api_version="1.1",
        )
        for name, files in project_files.items()
    }
    return IndexFixture(
        directory=Path(directory), projects=projects, metadata=metadata
    )


@attrs.frozen
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str] = attrs.field(hash=False)


def _etag_matches(if_none_match: str, etag: str) -> bool:
    candidates = [candidate.strip() for candidate in if_none_match.split(",")]
    weakless = etag.removeprefix("W/")
    return "*" in candidates or any(
        candidate.removeprefix("W/") == weakless for candidate in candidates
    )


class StaticSimpleIndex(Resource):
    """
    A test upstream serving an :class:`IndexFixture`.

    Routes: ``/simple/`` (root), ``/simple/<name>/`` (301 to the normalised,
    slashed path when needed, 404 for unknown projects), ``/files/<file>``
    and ``/files/<wheel>.metadata``.  Pages and files carry an ``ETag`` and
    ``Last-Modified`` and answer ``If-None-Match`` / ``If-Modified-Since`` with
    304.

    :ivar json: Negotiate PEP 691 (JSON and both HTML types; 406 when
        nothing fits); when false, always answer ``text/html`` like an old
        index.
    :ivar absolute_urls: Link files by absolute URL built from the request's
        ``Host``, instead of ``../../files/<file>``.
    :ivar projects: The pages served, by normalised name; tests may replace
        entries (e.g. to yank a file) while serving.
    :ivar broken: When true, every request gets ``broken_status`` (503).
    :ivar page_cache_control: When set, project pages are sent with this
        ``Cache-Control``.
    :ivar garbage_pages: When true, project pages are a 200 that is not a
        simple-index page (what a captive portal sends).
    :ivar serve_metadata: When false, metadata files 404 even if advertised.
    :ivar last_modified: The modification time announced for everything.
    :ivar requests: Count of requests (any method) per request path.
    :ivar request_log: Every request, in order.
    """

    isLeaf = True

    def __init__(
        self, fixture: IndexFixture, json: bool = True, absolute_urls: bool = False
    ) -> None:
        super().__init__()
        self.fixture = fixture
        self.json = json
        self.absolute_urls = absolute_urls
        self.projects: dict[str, ProjectPage] = dict(fixture.projects)
        self.broken = False
        self.broken_status = SERVICE_UNAVAILABLE
        self.page_cache_control: str | None = None
        self.garbage_pages = False
        self.serve_metadata = True
        self.last_modified = FIXTURE_EPOCH
        self.requests: Counter[str] = Counter()
        self.request_log: list[RecordedRequest] = []
        #: When false, a HEAD is answered 405, as by an origin that does
        #: not do HEAD.
        self.head_allowed = True

    def render_HEAD(self, request: Request) -> bytes:
        if self.head_allowed:
            return self.render_GET(request)
        path = request.path.decode("latin-1")
        self.requests[path] += 1
        self.request_log.append(RecordedRequest(method="HEAD", path=path, headers={}))
        request.setResponseCode(405)
        return b""

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode("latin-1")
        self.requests[path] += 1
        self.request_log.append(
            RecordedRequest(
                method=request.method.decode("latin-1"),
                path=path,
                headers={
                    name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
            )
        )
        if self.broken:
            request.setResponseCode(self.broken_status)
            return b"upstream is down\n"
        segments = [unquote(segment) for segment in path.split("/")[1:]]
        if segments == ["simple"]:
            return self._redirect(request, "/simple/")
        if segments == ["simple", ""]:
            return self._root(request)
        if len(segments) == 2 and segments[0] == "simple":
            return self._redirect(
                request, f"/simple/{normalize_project_name(segments[1])}/"
            )
        if len(segments) == 3 and segments[0] == "simple" and segments[2] == "":
            if self.page_cache_control is not None:
                request.setHeader(b"cache-control", self.page_cache_control.encode("ascii"))
            return self._project(request, segments[1])
        if len(segments) == 2 and segments[0] == "files":
            return self._file(request, segments[1])
        return self._not_found(request)

    def _not_found(self, request: Request) -> bytes:
        request.setResponseCode(NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found\n"

    def _redirect(self, request: Request, location: str) -> bytes:
        request.setResponseCode(MOVED_PERMANENTLY)
        request.setHeader(b"location", location.encode("ascii"))
        return b""

    def _negotiate(self, request: Request) -> str | None:
        request.setHeader(b"vary", b"Accept")
        if not self.json:
            return MEDIA_TYPE_LEGACY_HTML
        return choose_media_type(request.getHeader(b"accept"))

    def _respond(self, request: Request, body: bytes, content_type: str) -> bytes:
        etag = '"%s"' % hashlib.sha256(
            content_type.encode("ascii") + b"\0" + body
        ).hexdigest()[:32]
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"etag", etag.encode("ascii"))
        request.setHeader(
            b"last-modified",
            email.utils.formatdate(self.last_modified, usegmt=True).encode("ascii"),
        )
        if_none_match = request.getHeader(b"if-none-match")
        if_modified_since = request.getHeader(b"if-modified-since")
        if if_none_match is not None:
            unchanged = _etag_matches(if_none_match.decode("latin-1"), etag)
        elif if_modified_since is not None:
            try:
                since = email.utils.parsedate_to_datetime(
                    if_modified_since.decode("latin-1")
                ).timestamp()
            except (TypeError, ValueError):
                unchanged = False
            else:
                unchanged = self.last_modified <= since
        else:
            unchanged = False
        if unchanged:
            request.setResponseCode(NOT_MODIFIED)
            return b""
        request.setResponseCode(OK)
        return body

    def _root(self, request: Request) -> bytes:
        media_type = self._negotiate(request)
        if media_type is None:
            request.setResponseCode(NOT_ACCEPTABLE)
            return b""
        names = sorted(self.projects)
        chunks = (
            render_root_json(names)
            if media_type == MEDIA_TYPE_JSON
            else render_root_html(names)
        )
        return self._respond(request, b"".join(chunks), media_type)

    def _project(self, request: Request, name: str) -> bytes:
        normalized = normalize_project_name(name)
        if normalized != name:
            return self._redirect(request, f"/simple/{normalized}/")
        page = self.projects.get(name)
        if page is None:
            return self._not_found(request)
        if self.garbage_pages:
            request.setHeader(b"content-type", MEDIA_TYPE_JSON.encode("ascii"))
            return b'{"error": "please log in to the guest network"}'
        media_type = self._negotiate(request)
        if media_type is None:
            request.setResponseCode(NOT_ACCEPTABLE)
            return b""
        if self.absolute_urls:
            host = (request.getHeader(b"host") or b"").decode("latin-1")

            def link_for(file: ProjectFile) -> str:
                return urljoin(f"http://{host}/", file.url)

        else:

            def link_for(file: ProjectFile) -> str:
                return "../.." + file.url

        body = render_page(page, media_type, link_for)
        return self._respond(request, body, media_type)

    def _file(self, request: Request, filename: str) -> bytes:
        if filename.endswith(".metadata"):
            if not self.serve_metadata:
                return self._not_found(request)
            metadata = self.fixture.metadata.get(filename.removesuffix(".metadata"))
            if metadata is None:
                return self._not_found(request)
            return self._respond(request, metadata, "application/octet-stream")
        path = self.fixture.path_for(filename)
        if "/" in filename or filename in ("", ".", "..") or not path.is_file():
            return self._not_found(request)
        return self._respond(request, path.read_bytes(), "application/octet-stream")
