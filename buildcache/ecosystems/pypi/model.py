"""
The Python simple repository API as data: parsing, rendering and negotiation.

This module owns the model of a project page of a PEP 503 / PEP 691 index
(with PEP 592 yanks, PEP 658/714 core metadata and PEP 700 sizes, upload
times and version lists), the parsers that turn an upstream HTML or JSON page
into that model, the renderers that turn the model back into the three
representations a client may ask for, and PEP 691 content negotiation.
It does no networking and no file I/O: the index front end fetches bytes and
decides where file links point, this module only translates.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from html import escape
from html.parser import HTMLParser
from typing import Any, Final, final
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import attrs
from twisted.logger import Logger

__all__ = [
    "MEDIA_TYPE_JSON",
    "MEDIA_TYPE_HTML",
    "MEDIA_TYPE_LEGACY_HTML",
    "MEDIA_TYPES",
    "UPSTREAM_ACCEPT",
    "SimplePageError",
    "Hashes",
    "ProjectFile",
    "ProjectPage",
    "normalize_project_name",
    "is_valid_project_name",
    "parse_json_page",
    "parse_html_page",
    "parse_page",
    "render_json",
    "render_html",
    "render_page",
    "render_root_html",
    "render_root_json",
    "choose_media_type",
]

_log = Logger(namespace="buildcache.ecosystems.pypi.model")

MEDIA_TYPE_JSON: Final = "application/vnd.pypi.simple.v1+json"
MEDIA_TYPE_HTML: Final = "application/vnd.pypi.simple.v1+html"
MEDIA_TYPE_LEGACY_HTML: Final = "text/html"
MEDIA_TYPES: Final = (MEDIA_TYPE_JSON, MEDIA_TYPE_HTML, MEDIA_TYPE_LEGACY_HTML)

# What a mirror sends upstream: JSON when offered (it alone carries the PEP
# 700 fields), HTML otherwise.  The same preference order pip uses.
UPSTREAM_ACCEPT: Final = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)

# Hash names a client can check, strongest first; the first one a file has
# is the one put in an HTML link fragment, which holds a single hash.
_HASH_PREFERENCE: Final = ("sha256", "sha512", "sha384", "sha224", "sha1", "md5")

_NAME_SEPARATORS = re.compile(r"[-_.]+")
# ASCII only, and fullmatch: IGNORECASE would let [A-Z] match the Kelvin
# sign and dotless i, and "$" would accept a trailing newline.
_VALID_NAME = re.compile(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]")
_SERIAL_COMMENT = re.compile(r"\s*SERIAL\s+(\d+)\s*")


class SimplePageError(ValueError):
    """
    Bytes that are not a simple-index project page this module understands.
    """


def normalize_project_name(name: str) -> str:
    """
    The PEP 503 normalised form of a project name.
    """
    return _NAME_SEPARATORS.sub("-", name).lower()


def is_valid_project_name(name: str) -> bool:
    """
    Whether C{name} is a valid distribution name under PEP 508.
    """
    return _VALID_NAME.fullmatch(name) is not None


def _is_safe_filename(filename: str) -> bool:
    # File names become one path segment of a cache key and of a link the
    # index serves, so anything that could climb or split a path is refused.
    return (
        bool(filename)
        and filename not in (".", "..")
        and not any(c in filename for c in "/\\")
        and all(ord(c) >= 0x20 and ord(c) != 0x7F for c in filename)
    )


@final
class Hashes(Mapping[str, str]):
    """
    An immutable, hashable mapping of hash name (lower case) to hex digest.

    Compares equal to any mapping with the same items, so
    C{Hashes({"sha256": d}) == {"sha256": d}}.
    """

    __slots__ = ("_items",)

    _items: tuple[tuple[str, str], ...]

    def __init__(
        self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()
    ) -> None:
        pairs = dict(items)
        for name, digest in pairs.items():
            if not isinstance(name, str) or not isinstance(digest, str):
                raise TypeError(f"hash name and digest must be str: {name!r}")
        self._items = tuple(
            sorted((name.lower(), digest) for name, digest in pairs.items())
        )

    def __getitem__(self, name: str) -> str:
        for key, digest in self._items:
            if key == name:
                return digest
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Hashes({dict(self._items)!r})"

    def preferred(self) -> tuple[str, str] | None:
        """
        The strongest (name, digest) pair a client can check, if any.
        """
        for name in _HASH_PREFERENCE:
            for key, digest in self._items:
                if key == name:
                    return key, digest
        return None


def _to_hashes(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> Hashes:
    if isinstance(value, Hashes):
        return value
    return Hashes(value)


def _to_yanked(value: bool | str) -> bool | str:
    # PEP 691 allows only a non-empty reason; an empty one still means yanked.
    if isinstance(value, str):
        return value if value else True
    return bool(value)


def _to_core_metadata(value: bool | Mapping[str, str]) -> bool | Hashes:
    if isinstance(value, bool):
        return value
    hashes = _to_hashes(value)
    # An empty hash dictionary still says the metadata file exists.
    return hashes if hashes else True


def _to_versions(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _to_files(value: Iterable[ProjectFile]) -> tuple[ProjectFile, ...]:
    return tuple(value)


def _check_filename(instance: object, attribute: object, value: str) -> None:
    if not _is_safe_filename(value):
        raise ValueError(f"unsafe distribution file name: {value!r}")


@attrs.frozen
class ProjectFile:
    """
    One distribution file listed on a project page.

    @ivar url: Absolute upstream URL of the file, without fragment.
    @ivar hashes: Digests of the file (PEP 503 fragment / PEP 691 C{hashes}).
    @ivar yanked: C{False}, C{True}, or the yank reason (PEP 592).
    @ivar core_metadata: C{False}, C{True}, or the digests of the
        C{<url>.metadata} file (PEP 658/714).
    @ivar size: Size in bytes (PEP 700), when the upstream said.
    @ivar upload_time: ISO 8601 upload time (PEP 700), when the upstream said.
    """

    filename: str = attrs.field(validator=_check_filename)
    url: str
    hashes: Hashes = attrs.field(factory=Hashes, converter=_to_hashes)
    requires_python: str | None = None
    yanked: bool | str = attrs.field(default=False, converter=_to_yanked)
    core_metadata: bool | Hashes = attrs.field(
        default=False, converter=_to_core_metadata
    )
    size: int | None = None
    upload_time: str | None = None

    @property
    def is_yanked(self) -> bool:
        return self.yanked is not False

    @property
    def yanked_reason(self) -> str | None:
        return self.yanked if isinstance(self.yanked, str) else None

    @property
    def has_core_metadata(self) -> bool:
        return self.core_metadata is not False

    @property
    def core_metadata_hashes(self) -> Hashes:
        """
        Digests of the metadata file; empty when none were given.
        """
        if isinstance(self.core_metadata, Hashes):
            return self.core_metadata
        return Hashes()

    @property
    def metadata_url(self) -> str:
        """
        Where the upstream serves this file's core metadata (PEP 658).
        """
        return self.url + ".metadata"

    @property
    def sha256(self) -> str | None:
        return self.hashes.get("sha256")


@attrs.frozen
class ProjectPage:
    """
    A project page: the files of one project and what is known about them.

    @ivar name: The project name as the page gives it (normalised for JSON).
    @ivar versions: All versions of the project (PEP 700), when known.
    @ivar api_version: The repository API version the page declared.
    @ivar last_serial: The upstream's change serial, when it gave one.
    """

    name: str
    files: tuple[ProjectFile, ...] = attrs.field(default=(), converter=_to_files)
    versions: tuple[str, ...] | None = attrs.field(
        default=None, converter=_to_versions
    )
    api_version: str = "1.0"
    last_serial: int | None = None

    @cached_property
    def _files_by_name(self) -> Mapping[str, ProjectFile]:
        by_name: dict[str, ProjectFile] = {}
        for file in self.files:
            by_name.setdefault(file.filename, file)
        return by_name

    def file_named(self, filename: str) -> ProjectFile | None:
        """
        The first listed file called C{filename}, if any.
        """
        return self._files_by_name.get(filename)


def _name_from_url(page_url: str) -> str:
    segments = [s for s in urlsplit(page_url).path.split("/") if s]
    if not segments:
        raise SimplePageError(f"cannot tell the project name from {page_url!r}")
    return normalize_project_name(unquote(segments[-1]))


def _check_api_version(version: str) -> str:
    major, _, _ = version.partition(".")
    if major.strip() != "1":
        raise SimplePageError(f"unsupported repository API version {version!r}")
    return version.strip()


# --- JSON (PEP 691) -------------------------------------------------------


def _json_hashes(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SimplePageError(f"{what} must map hash names to hex digests")
    return value


def _json_file(entry: object, base_url: str) -> ProjectFile | None:
    if not isinstance(entry, dict):
        raise SimplePageError("a file entry must be an object")
    filename = entry.get("filename")
    url = entry.get("url")
    if not isinstance(filename, str) or not isinstance(url, str):
        raise SimplePageError("a file entry needs string filename and url")
    hashes = _json_hashes(entry.get("hashes", {}), "hashes")
    requires_python = entry.get("requires-python")
    if requires_python is not None and not isinstance(requires_python, str):
        raise SimplePageError(f"bad requires-python for {filename!r}")
    yanked = entry.get("yanked", False)
    if not isinstance(yanked, (bool, str)):
        raise SimplePageError(f"bad yanked value for {filename!r}")
    # PEP 714: core-metadata is the name; dist-info-metadata the fallback.
    metadata = entry.get("core-metadata")
    if metadata is None:
        metadata = entry.get("dist-info-metadata", False)
    if not isinstance(metadata, bool):
        metadata = _json_hashes(metadata, "core-metadata")
    size = entry.get("size")
    if size is not None and (
        not isinstance(size, int) or isinstance(size, bool) or size < 0
    ):
        raise SimplePageError(f"bad size for {filename!r}")
    upload_time = entry.get("upload-time")
    if upload_time is not None and not isinstance(upload_time, str):
        raise SimplePageError(f"bad upload-time for {filename!r}")
    if not _is_safe_filename(filename):
        _log.warn("Skipping unsafe file name {filename!r}", filename=filename)
        return None
    absolute_url, _ = urldefrag(urljoin(base_url, url))
    return ProjectFile(
        filename=filename,
        url=absolute_url,
        hashes=hashes,
        requires_python=requires_python or None,
        yanked=yanked,
        core_metadata=metadata,
        size=size,
        upload_time=upload_time,
    )


def parse_json_page(data: bytes, base_url: str) -> ProjectPage:
    """
    Parse a PEP 691 JSON project page fetched from C{base_url}.

    Relative file URLs are resolved against C{base_url}.  Entries whose file
    name could escape a path segment are skipped.

    @raise SimplePageError: When C{data} is not such a page.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SimplePageError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise SimplePageError("a project page must be a JSON object")
    meta = document.get("meta", {})
    if not isinstance(meta, dict):
        raise SimplePageError("meta must be an object")
    api_version = meta.get("api-version", "1.0")
    if not isinstance(api_version, str):
        raise SimplePageError("meta.api-version must be a string")
    api_version = _check_api_version(api_version)
    last_serial = meta.get("_last-serial")
    if not isinstance(last_serial, int) or isinstance(last_serial, bool):
        last_serial = None
    name = document.get("name")
    if name is None:
        name = _name_from_url(base_url)
    elif not isinstance(name, str):
        raise SimplePageError("name must be a string")
    entries = document.get("files")
    if not isinstance(entries, list):
        raise SimplePageError("files must be a list")
    versions = document.get("versions")
    if versions is not None and (
        not isinstance(versions, list)
        or not all(isinstance(version, str) for version in versions)
    ):
        raise SimplePageError("versions must be a list of strings")
    files = [_json_file(entry, base_url) for entry in entries]
    return ProjectPage(
        name=name,
        files=tuple(file for file in files if file is not None),
        versions=versions,
        api_version=api_version,
        last_serial=last_serial,
    )


# --- HTML (PEP 503) -------------------------------------------------------


class _AnchorCollector(HTMLParser):
    """
    Collects what a simple page says: anchors with their text, the first
    C{<base href>}, the repository version meta tag and the serial comment.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base_href: str | None = None
        self.repository_version: str | None = None
        self.last_serial: int | None = None
        self.saw_markup = False
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._open_anchor: dict[str, str | None] | None = None
        self._anchor_text: list[str] = []

    def handle_starttag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        self.saw_markup = True
        named = dict(attributes)
        if tag == "base":
            href = named.get("href")
            if self.base_href is None and href:
                self.base_href = href
        elif tag == "meta":
            if named.get("name") == "pypi:repository-version":
                self.repository_version = named.get("content")
        elif tag == "a":
            self._close_anchor()
            self._open_anchor = named

    def handle_endtag(self, tag: str) -> None:
        self.saw_markup = True
        if tag == "a":
            self._close_anchor()

    def handle_data(self, data: str) -> None:
        if self._open_anchor is not None:
            self._anchor_text.append(data)

    def handle_comment(self, data: str) -> None:
        self.saw_markup = True
        serial = _SERIAL_COMMENT.fullmatch(data)
        if serial is not None:
            self.last_serial = int(serial.group(1))

    def handle_decl(self, decl: str) -> None:
        self.saw_markup = True

    def close(self) -> None:
        super().close()
        self._close_anchor()

    def _close_anchor(self) -> None:
        if self._open_anchor is not None:
            self.anchors.append((self._open_anchor, "".join(self._anchor_text)))
        self._open_anchor = None
        self._anchor_text = []


def _fragment_hashes(fragment: str) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for part in fragment.split("&"):
        name, sep, digest = part.partition("=")
        name = name.lower()
        if sep and digest and name in _HASH_PREFERENCE:
            hashes.setdefault(name, digest)
    return hashes


def _html_core_metadata(value: str | None) -> bool | dict[str, str]:
    # Like pip: "true" or anything unparseable means the file exists without
    # a known hash; "name=digest" gives its hash.
    if value is None or value == "true":
        return True
    name, sep, digest = value.partition("=")
    if sep and name and digest:
        return {name.lower(): digest}
    return True


def _html_file(
    attributes: dict[str, str | None], text: str, base_url: str
) -> ProjectFile | None:
    href = attributes.get("href")
    if not href:
        return None
    url, fragment = urldefrag(urljoin(base_url, href.strip()))
    filename = unquote(urlsplit(url).path.rpartition("/")[2]) or text.strip()
    if not _is_safe_filename(filename):
        _log.warn("Skipping unsafe file name {filename!r}", filename=filename)
        return None
    if "data-yanked" in attributes:
        yanked: bool | str = attributes["data-yanked"] or True
    else:
        yanked = False
    if "data-core-metadata" in attributes:
        metadata = _html_core_metadata(attributes["data-core-metadata"])
    elif "data-dist-info-metadata" in attributes:
        metadata = _html_core_metadata(attributes["data-dist-info-metadata"])
    else:
        metadata = False
    return ProjectFile(
        filename=filename,
        url=url,
        hashes=_fragment_hashes(fragment),
        requires_python=attributes.get("data-requires-python") or None,
        yanked=yanked,
        core_metadata=metadata,
    )


def parse_html_page(
    data: bytes,
    base_url: str,
    *,
    name: str | None = None,
    encoding: str = "utf-8",
) -> ProjectPage:
    """
    Parse a PEP 503 HTML project page fetched from C{base_url}.

    Links are resolved against the page's first C{<base href>} (itself
    resolved against C{base_url}) or C{base_url}.  The file name is the last
    path segment of the link, as pip takes it.  HTML carries no project name,
    so it is C{name} or else the last path segment of C{base_url},
    normalised.

    @raise SimplePageError: When C{data} is not such a page.
    """
    try:
        text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as error:
        raise SimplePageError(f"cannot decode page: {error}") from None
    collector = _AnchorCollector()
    try:
        collector.feed(text)
        collector.close()
    except (AssertionError, ValueError) as error:
        raise SimplePageError(f"cannot parse HTML: {error}") from None
    if not collector.saw_markup:
        raise SimplePageError("no HTML markup in page")
    api_version = _check_api_version(collector.repository_version or "1.0")
    link_base = base_url
    if collector.base_href is not None:
        link_base = urljoin(base_url, collector.base_href.strip())
    files = [
        _html_file(attributes, anchor_text, link_base)
        for attributes, anchor_text in collector.anchors
    ]
    return ProjectPage(
        name=name if name is not None else _name_from_url(base_url),
        files=tuple(file for file in files if file is not None),
        versions=None,
        api_version=api_version,
        last_serial=collector.last_serial,
    )


def parse_page(
    data: bytes, content_type: bytes | str | None, base_url: str
) -> ProjectPage:
    """
    Parse an upstream response by its C{Content-Type}.

    @raise SimplePageError: For a content type that is not one of the three
        simple-index types, or a body that does not parse.
    """
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    media_type, _, parameters = (content_type or "").partition(";")
    media_type = media_type.strip().lower()
    if media_type == MEDIA_TYPE_JSON:
        return parse_json_page(data, base_url)
    if media_type in (MEDIA_TYPE_HTML, MEDIA_TYPE_LEGACY_HTML):
        charset = "utf-8"
        for parameter in parameters.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        return parse_html_page(data, base_url, encoding=charset)
    raise SimplePageError(f"not a simple index content type: {content_type!r}")


# --- Rendering ------------------------------------------------------------


def _rendered_api_version(page: ProjectPage) -> str:
    # 1.1 promises versions and every size (PEP 700); claim it only then.
    if page.versions is not None and all(f.size is not None for f in page.files):
        return "1.1"
    return "1.0"


def _advertise(
    file: ProjectFile, metadata_available: Callable[[ProjectFile], bool] | None
) -> bool:
    if not file.has_core_metadata:
        return False
    return metadata_available is None or metadata_available(file)


def render_json(
    page: ProjectPage,
    link_for: Callable[[ProjectFile], str],
    *,
    metadata_available: Callable[[ProjectFile], bool] | None = None,
) -> bytes:
    """
    Render C{page} as a PEP 691 JSON document, each file's URL being
    C{link_for(file)}.

    Core metadata is advertised for files whose upstream advertised it and,
    when C{metadata_available} is given, for which it returns true.
    """
    files: list[dict[str, Any]] = []
    for file in page.files:
        entry: dict[str, Any] = {
            "filename": file.filename,
            "url": link_for(file),
            "hashes": dict(file.hashes),
        }
        if file.requires_python is not None:
            entry["requires-python"] = file.requires_python
        if file.is_yanked:
            entry["yanked"] = file.yanked
        if _advertise(file, metadata_available):
            metadata: bool | dict[str, str] = (
                dict(file.core_metadata_hashes) or True
            )
            entry["core-metadata"] = metadata
            entry["dist-info-metadata"] = metadata
        if file.size is not None:
            entry["size"] = file.size
        if file.upload_time is not None:
            entry["upload-time"] = file.upload_time
        files.append(entry)
    meta: dict[str, Any] = {"api-version": _rendered_api_version(page)}
    if page.last_serial is not None:
        meta["_last-serial"] = page.last_serial
    document: dict[str, Any] = {"meta": meta, "name": page.name}
    if page.versions is not None:
        document["versions"] = list(page.versions)
    document["files"] = files
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def _html_attribute(name: str, value: str) -> str:
    return f' {name}="{escape(value, quote=True)}"'


def render_html(
    page: ProjectPage,
    link_for: Callable[[ProjectFile], str],
    *,
    metadata_available: Callable[[ProjectFile], bool] | None = None,
) -> bytes:
    """
    Render C{page} as a PEP 503 HTML document (valid for both HTML media
    types), each link being C{link_for(file)} plus a hash fragment.

    Anchor text is the file name; C{link_for} must return a URL whose last
    path segment is that name.  Core metadata is advertised as in
    L{render_json}, under both C{data-core-metadata} and
    C{data-dist-info-metadata}.
    """
    title = escape(page.name)
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "  <head>",
        '    <meta name="pypi:repository-version"'
        f' content="{_rendered_api_version(page)}">',
        f"    <title>Links for {title}</title>",
        "  </head>",
        "  <body>",
        f"    <h1>Links for {title}</h1>",
    ]
    for file in page.files:
        href = link_for(file)
        preferred = file.hashes.preferred()
        if preferred is not None:
            href = f"{href}#{preferred[0]}={preferred[1]}"
        attributes = _html_attribute("href", href)
        if file.requires_python is not None:
            attributes += _html_attribute("data-requires-python", file.requires_python)
        if file.is_yanked:
            attributes += _html_attribute("data-yanked", file.yanked_reason or "")
        if _advertise(file, metadata_available):
            metadata_hash = file.core_metadata_hashes.preferred()
            value = "true" if metadata_hash is None else "=".join(metadata_hash)
            attributes += _html_attribute("data-core-metadata", value)
            attributes += _html_attribute("data-dist-info-metadata", value)
        lines.append(f"    <a{attributes}>{escape(file.filename)}</a><br />")
    lines += ["  </body>", "</html>"]
    if page.last_serial is not None:
        lines.append(f"<!--SERIAL {page.last_serial}-->")
    return ("\n".join(lines) + "\n").encode("utf-8")


def render_page(
    page: ProjectPage,
    media_type: str,
    link_for: Callable[[ProjectFile], str],
    *,
    metadata_available: Callable[[ProjectFile], bool] | None = None,
) -> bytes:
    """
    Render C{page} in C{media_type}, one of L{MEDIA_TYPES}.
    """
    if media_type == MEDIA_TYPE_JSON:
        return render_json(page, link_for, metadata_available=metadata_available)
    if media_type in (MEDIA_TYPE_HTML, MEDIA_TYPE_LEGACY_HTML):
        return render_html(page, link_for, metadata_available=metadata_available)
    raise ValueError(f"not a simple index media type: {media_type!r}")


_ROOT_BATCH = 512


def _batched(names: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for name in names:
        batch.append(name)
        if len(batch) == _ROOT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def render_root_html(names: Iterable[str]) -> Iterator[bytes]:
    """
    Stream the root index page linking C{<normalised name>/} for each name,
    in the order given.
    """
    yield (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.0">\n'
        "    <title>Simple index</title>\n  </head>\n  <body>\n"
    ).encode("utf-8")
    for batch in _batched(names):
        yield "".join(
            f'    <a href="{escape(normalize_project_name(name), quote=True)}/">'
            f"{escape(name)}</a><br />\n"
            for name in batch
        ).encode("utf-8")
    yield b"  </body>\n</html>\n"


def render_root_json(names: Iterable[str]) -> Iterator[bytes]:
    """
    Stream the PEP 691 JSON root index for C{names}, in the order given.
    """
    yield b'{"meta":{"api-version":"1.0"},"projects":['
    first = True
    for batch in _batched(names):
        chunk = ",".join(
            json.dumps({"name": name}, separators=(",", ":")) for name in batch
        )
        yield (chunk if first else "," + chunk).encode("ascii")
        first = False
    yield b"]}"


# --- Content negotiation (PEP 691) ----------------------------------------

# Media ranges that name one of our types exactly, "latest" aliases included.
_EXACT_NAMES: Final = {
    MEDIA_TYPE_JSON: (MEDIA_TYPE_JSON, "application/vnd.pypi.simple.latest+json"),
    MEDIA_TYPE_HTML: (MEDIA_TYPE_HTML, "application/vnd.pypi.simple.latest+html"),
    MEDIA_TYPE_LEGACY_HTML: (MEDIA_TYPE_LEGACY_HTML,),
}

# When the client rates several types equally through the same wildcard, the
# server chooses: plain HTML first, since "*/*" comes from browsers, curl and
# old tools that predate PEP 691.
_SERVER_PREFERENCE: Final = (MEDIA_TYPE_LEGACY_HTML, MEDIA_TYPE_JSON, MEDIA_TYPE_HTML)


@attrs.frozen
class _MediaRange:
    full_type: str
    quality: float
    position: int

    def specificity(self, media_type: str) -> int | None:
        """
        How closely this range names C{media_type}: 2 exactly, 1 by
        C{type/*}, 0 by C{*/*}, C{None} not at all.
        """
        if self.full_type in _EXACT_NAMES[media_type]:
            return 2
        if self.full_type == media_type.split("/")[0] + "/*":
            return 1
        if self.full_type == "*/*":
            return 0
        return None


def _parse_accept(accept: str) -> list[_MediaRange]:
    ranges: list[_MediaRange] = []
    for position, element in enumerate(accept.split(",")):
        full_type, *parameters = element.split(";")
        full_type = full_type.strip().lower()
        if full_type.count("/") != 1 or full_type.startswith("/") or full_type.endswith("/"):
            continue
        quality = 1.0
        malformed = False
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    malformed = True
                    break
                if not 0.0 <= quality <= 1.0:
                    malformed = True
                break
        if not malformed:
            ranges.append(_MediaRange(full_type, quality, position))
    return ranges


def choose_media_type(accept_header: bytes | str | None) -> str | None:
    """
    Pick the representation to send for an C{Accept} header (PEP 691).

    Returns one of L{MEDIA_TYPES}, or C{None} when the client accepts none
    of them (answer 406).  No header (or an empty one) means
    C{text/html}.  Each type takes the quality of the most specific range
    naming it; the highest quality wins, then an exact mention over a
    wildcard, then the type the client listed first, then the server's
    preference.
    """
    if isinstance(accept_header, bytes):
        accept_header = accept_header.decode("latin-1")
    if accept_header is None or not accept_header.strip():
        return MEDIA_TYPE_LEGACY_HTML
    return _choose_media_type(accept_header)


# Clients send the same few Accept headers over and over.
@functools.lru_cache(maxsize=256)
def _choose_media_type(accept_header: str) -> str | None:
    ranges = _parse_accept(accept_header)
    best: tuple[tuple[float, int, int, int], str] | None = None
    for preference, media_type in enumerate(_SERVER_PREFERENCE):
        matches = [
            (specificity, media_range)
            for media_range in ranges
            if (specificity := media_range.specificity(media_type)) is not None
        ]
        if not matches:
            continue
        top = max(specificity for specificity, _ in matches)
        chosen = max(
            (r for specificity, r in matches if specificity == top),
            key=lambda r: (r.quality, -r.position),
        )
        if chosen.quality <= 0.0:
            continue
        rank = (chosen.quality, top, -chosen.position, -preference)
        if best is None or rank > best[0]:
            best = (rank, media_type)
    return None if best is None else best[1]
