"""
Reading simple pages: an upstream's PEP 691 JSON or PEP 503 HTML project
page, as bytes, into a :class:`~buildcache.ecosystems.pypi.model.ProjectPage`.

The parsers are strict about structure (a captive portal's page or a
truncated document is a :class:`~buildcache.ecosystems.pypi.model.SimplePageError`,
never an empty project) and lenient where pip is (unknown attributes,
unparseable metadata hashes).  File URLs come out absolute and without
fragment; entries whose file name could escape a path segment are dropped
with a warning.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from twisted.logger import Logger

from buildcache.ecosystems.pypi.model import (
    HASH_PREFERENCE,
    MEDIA_TYPE_HTML,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LEGACY_HTML,
    ProjectFile,
    ProjectPage,
    SimplePageError,
    is_safe_filename,
    normalize_project_name,
)

__all__ = ["parse_json_page", "parse_html_page", "parse_page"]

_log = Logger(namespace="buildcache.ecosystems.pypi.parse")

_SERIAL_COMMENT = re.compile(r"\s*SERIAL\s+(\d+)\s*")


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
    if not is_safe_filename(filename):
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
    Parse a PEP 691 JSON project page fetched from ``base_url``.

    Relative file URLs are resolved against ``base_url``.  Entries whose file
    name could escape a path segment are skipped.

    :raises SimplePageError: When ``data`` is not such a page.
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
    ``<base href>``, the repository version meta tag and the serial comment.
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
        if sep and digest and name in HASH_PREFERENCE:
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
    if not is_safe_filename(filename):
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
    Parse a PEP 503 HTML project page fetched from ``base_url``.

    Links are resolved against the page's first ``<base href>`` (itself
    resolved against ``base_url``) or ``base_url``.  The file name is the last
    path segment of the link, as pip takes it.  HTML carries no project name,
    so it is ``name`` or else the last path segment of ``base_url``,
    normalised.

    :raises SimplePageError: When ``data`` is not such a page.
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
    Parse an upstream response by its ``Content-Type``.

    :raises SimplePageError: For a content type that is not one of the three
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
