"""
What a cache key is, for people: its kind (``stats``), and whether it
belongs to what ``purge`` was asked to remove.  Keys are the front ends'
business, so this knowledge comes from the ecosystems (their path rules,
``packaging``'s file-name parsers, the registry's key layout in
:mod:`buildcache.ops.registry_keys`), not the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from urllib.parse import unquote

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)

from buildcache.ecosystems.apk.policy import RULES as APK_RULES
from buildcache.ecosystems.apt.policy import RULES as APT_RULES
from buildcache.ecosystems.pypi.kinds import FILE_RULES, INDEX_FILE_RULES
from buildcache.ecosystems.pypi.model import normalize_project_name
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import kind_by_rules
from buildcache.ops import registry_keys
from buildcache.ops.front_ends import KINDS, OWN_KEYS, PAGE_PREFIX, ROOT_PREFIX
from buildcache.ops.registry_keys import ImageName, parse_key

__all__ = [
    "KINDS",
    "OWN_KEYS",
    "PAGE_PREFIX",
    "ROOT_PREFIX",
    "distribution_kind",
    "distribution_project",
    "entry_kind",
    "key_filename",
    "key_matcher",
    "key_url",
]

_OWN_PREFIXES = tuple(OWN_KEYS)

#: A ``.metadata`` file (PEP 658) is counted with the indexes.
_METADATA_SUFFIX = ".metadata"
#: apt files the path rules leave to HTTP or call immutable that ``stats``
#: still sorts: ``.ddeb`` and packages outside ``pool/`` are packages,
#: ``dists/.../by-hash/`` files are suite metadata.
_DEB_SUFFIXES = (".deb", ".udeb", ".ddeb")
_DISTS = "/dists/"
#: The pip file rows of both front ends: wheels, sdists, eggs.
_PIP_FILE_RULES = FILE_RULES + INDEX_FILE_RULES
_OTHER_SDIST_SUFFIXES = (".tar.bz2", ".tar.xz", ".tgz")


def key_url(key: str) -> str:
    """
    The URL part of a key (``scheme://host/path?query``), without what
    names a private entry or a variant of it (``#p=...``, ``#v=...``).
    """
    return key.partition("#")[0]


def key_filename(key: str) -> str:
    """
    The last path segment of a URL key (``scheme://host/path?query``),
    decoded.
    """
    path = key_url(key).partition("?")[0]
    return unquote(path.rpartition("/")[2])


def entry_kind(key: str) -> str:
    """
    The kind of a cache key, one of :data:`KINDS`: ``index`` covers
    everything that changes upstream (simple pages, ``APKINDEX.tar.gz``,
    apt's ``dists/`` files, a registry's tag lists and referrers) and
    PEP 658 metadata files.  The front ends' own keys go by
    :data:`buildcache.ops.front_ends.OWN_KEYS`, URLs by the ecosystems'
    path rules, with
    :func:`distribution_kind` for pip's files.
    """
    for prefix, kind_of in OWN_KEYS.items():
        if key.startswith(prefix):
            return kind_of(key)
    url = key_url(key)
    apk = kind_by_rules(APK_RULES, url)
    if apk is not None:
        return "index" if apk is Kind.INDEX else "apk"
    if kind_by_rules(APT_RULES, url) is Kind.INDEX:
        return "index"
    filename = key_filename(key)
    if filename.endswith(_DEB_SUFFIXES):
        return "deb"
    if _DISTS in url.partition("?")[0] or filename.endswith(_METADATA_SUFFIX):
        return "index"
    if kind_by_rules(_PIP_FILE_RULES, url) is not None:
        kind = distribution_kind(filename)
        if kind is not None:
            return kind[0]
    return "other"


def distribution_kind(filename: str) -> tuple[str, str] | None:
    """
    ``("wheel", project)`` or ``("sdist", project)`` for a Python
    distribution file (or its ``.metadata`` file), with the normalised
    project name, as ``packaging`` parses the name; None when
    ``filename`` is not one.  An egg counts as a wheel (its name ends at
    its first hyphen, which ``packaging`` does not parse).
    """
    name = filename.removesuffix(_METADATA_SUFFIX)
    try:
        if name.endswith(".whl"):
            return "wheel", str(parse_wheel_filename(name)[0])
        if name.endswith(".egg"):
            project, separator, _ = name.partition("-")
            return ("wheel", normalize_project_name(project)) if separator and project else None
        if name.endswith(_OTHER_SDIST_SUFFIXES):
            # packaging reads ``.tar.gz`` and ``.zip`` only; the other
            # suffixes the index rules accept name a project the same way.
            name = name.rsplit(".t", 1)[0] + ".tar.gz"
        return "sdist", str(parse_sdist_filename(name)[0])
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None


def distribution_project(filename: str) -> str | None:
    """
    The normalised project name of a Python distribution file (or of its
    ``.metadata`` file), or None when ``filename`` is not one (see
    :func:`distribution_kind`).
    """
    kind = distribution_kind(filename)
    return None if kind is None else kind[1]


def key_matcher(
    patterns: Sequence[str], projects: Sequence[str], images: Sequence[ImageName] = ()
) -> Callable[[str], bool]:
    """
    A predicate on cache keys for ``purge``.

    A pattern is an ``fnmatch`` glob over the URL of a key
    (``scheme://host/path?query``; its private entries and variants go
    with it), or over the whole of an ecosystem's own key
    (``simple-page|…``, ``oci:…``); a pattern without ``scheme://``
    matches either scheme, as keys had none before.  A project (any
    spelling) matches its simple-index pages and every distribution file
    whose name belongs to it.  An image matches the registry's keys of its
    repository, or of its tag or digest
    (:meth:`buildcache.ops.registry_keys.ImageName.names`).
    """
    globs = list(patterns)
    names = {normalize_project_name(project) for project in projects}

    def matches(key: str) -> bool:
        if key.startswith(_OWN_PREFIXES):
            # The ecosystems' own keys (``simple-page|https://…|name``) may
            # hold a URL inside, which a glob without a scheme must not
            # reach into.
            url = schemeless = key
        else:
            url = key_url(key)
            schemeless = url.partition("://")[2]
        if any(
            fnmatchcase(url, glob) or ("://" not in glob and fnmatchcase(schemeless, glob))
            for glob in globs
        ):
            return True
        if images and key.startswith(registry_keys.KEY_PREFIX):
            parsed = parse_key(key)
            return parsed is not None and any(image.names(parsed) for image in images)
        if not names:
            return False
        if key.startswith(PAGE_PREFIX):
            return key.rpartition("|")[2] in names
        if key.startswith(ROOT_PREFIX):
            return False
        return distribution_project(key_filename(key)) in names

    return matches

