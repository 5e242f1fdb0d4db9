"""
Writing simple pages: a :class:`~buildcache.ecosystems.pypi.model.ProjectPage`
rendered as PEP 691 JSON or PEP 503 HTML with the links the caller chooses,
the streamed root page, and PEP 691 content negotiation (which of the three
representations a client's ``Accept`` header gets).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from html import escape
from typing import Any, Final

import attrs

from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPE_HTML,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LEGACY_HTML,
    ProjectFile,
    ProjectPage,
    normalize_project_name,
)

__all__ = [
    "render_json",
    "render_html",
    "render_page",
    "render_root_html",
    "render_root_json",
    "choose_media_type",
]


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
    Render ``page`` as a PEP 691 JSON document, each file's URL being
    ``link_for(file)``.

    Core metadata is advertised for files whose upstream advertised it and,
    when ``metadata_available`` is given, for which it returns true.
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
    Render ``page`` as a PEP 503 HTML document (valid for both HTML media
    types), each link being ``link_for(file)`` plus a hash fragment.

    Anchor text is the file name; ``link_for`` must return a URL whose last
    path segment is that name.  Core metadata is advertised as in
    :func:`render_json`, under both ``data-core-metadata`` and
    ``data-dist-info-metadata``.
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
    Render ``page`` in ``media_type``, one of :data:`~buildcache.ecosystems.pypi.model.MEDIA_TYPES`.
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
    Stream the root index page linking ``<normalised name>/`` for each name,
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
    Stream the PEP 691 JSON root index for ``names``, in the order given.
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
        How closely this range names ``media_type``: 2 exactly, 1 by
        ``type/*``, 0 by ``*/*``, ``None`` not at all.
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
    Pick the representation to send for an ``Accept`` header (PEP 691).

    Returns one of :data:`~buildcache.ecosystems.pypi.model.MEDIA_TYPES`, or ``None`` when the client accepts none
    of them (answer 406).  No header (or an empty one) means
    ``text/html``.  Each type takes the quality of the most specific range
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
