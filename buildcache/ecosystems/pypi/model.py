"""
The Python simple repository API as data: the model of a project page.

This module owns what a project page of a PEP 503 / PEP 691 index says
(with PEP 592 yanks, PEP 658/714 core metadata and PEP 700 sizes, upload
times and version lists) as immutable values, the three media types a page
comes in, and project names (normalised and validated with ``packaging``).
Turning bytes into this model is :mod:`.parse`; turning it back into bytes,
and choosing which bytes a client gets, is :mod:`.render`.  Nothing here
does networking or file I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from typing import Final, final

import attrs
from packaging.utils import InvalidName, canonicalize_name

__all__ = [
    "MEDIA_TYPE_JSON",
    "MEDIA_TYPE_HTML",
    "MEDIA_TYPE_LEGACY_HTML",
    "MEDIA_TYPES",
    "UPSTREAM_ACCEPT",
    "HASH_PREFERENCE",
    "SimplePageError",
    "Hashes",
    "ProjectFile",
    "ProjectPage",
    "normalize_project_name",
    "is_valid_project_name",
    "is_safe_filename",
]

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

#: Hash names a client can check, strongest first; the first one a file has
#: is the one put in an HTML link fragment, which holds a single hash.
HASH_PREFERENCE: Final = ("sha256", "sha512", "sha384", "sha224", "sha1", "md5")



class SimplePageError(ValueError):
    """
    Bytes that are not a simple-index project page this module understands.
    """


def normalize_project_name(name: str) -> str:
    """
    The PEP 503 normalised form of a project name.
    """
    return str(canonicalize_name(name))


def is_valid_project_name(name: str) -> bool:
    """
    Whether ``name`` is a valid distribution name under PEP 508.
    """
    # Printable ASCII first, whatever packaging says: a packaging older
    # than 24.1 (setup.cfg allows 23.2) matched with ``re.match`` (so
    # "numpy\n" passed) and case-insensitively without re.ASCII (so [A-Z]
    # matched the Kelvin sign and the dotless i).
    if not (name.isascii() and name.isprintable()):
        return False
    try:
        canonicalize_name(name, validate=True)
    except InvalidName:
        return False
    return True


def is_safe_filename(filename: str) -> bool:
    """
    Whether ``filename`` can be one path segment of a store key and of a
    link this index serves.
    """
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
    ``Hashes({"sha256": d}) == {"sha256": d}``.
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
        for name in HASH_PREFERENCE:
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
    if not is_safe_filename(value):
        raise ValueError(f"unsafe distribution file name: {value!r}")


@attrs.frozen
class ProjectFile:
    """
    One distribution file listed on a project page.

    :ivar url: Absolute upstream URL of the file, without fragment.
    :ivar hashes: Digests of the file (PEP 503 fragment / PEP 691 ``hashes``).
    :ivar yanked: ``False``, ``True``, or the yank reason (PEP 592).
    :ivar core_metadata: ``False``, ``True``, or the digests of the
        ``<url>.metadata`` file (PEP 658/714).
    :ivar size: Size in bytes (PEP 700), when the upstream said.
    :ivar upload_time: ISO 8601 upload time (PEP 700), when the upstream said.
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

    :ivar name: The project name as the page gives it (normalised for JSON).
    :ivar versions: All versions of the project (PEP 700), when known.
    :ivar api_version: The repository API version the page declared.
    :ivar last_serial: The upstream's change serial, when it gave one.
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
        The first listed file called ``filename``, if any.
        """
        return self._files_by_name.get(filename)
