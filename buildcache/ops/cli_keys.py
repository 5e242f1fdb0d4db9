"""
What a cache key is, for people: its kind (``stats``), and whether it
belongs to what ``purge`` was asked to remove.  Keys are the front ends'
business, so this knowledge comes from the ecosystems, not the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from urllib.parse import unquote

from buildcache.ecosystems.pypi.model import normalize_project_name
from buildcache.ecosystems.pypi.pages import page_key
from buildcache.ecosystems.pypi.root import root_key

#: Kinds of entries ``stats`` counts, in display order.
KINDS = ("apk", "deb", "wheel", "sdist", "index", "other")
#: The package index's own keys: a project's page, and the root page.
PAGE_PREFIX = page_key("", "").removesuffix("|")
ROOT_PREFIX = root_key("", "").removesuffix("|")

_SDIST_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar")
_DEB_SUFFIXES = (".deb", ".udeb", ".ddeb")
_METADATA_SUFFIX = ".metadata"


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
    apt's ``dists/`` files) and PEP 658 metadata files.
    """
    if key.startswith((PAGE_PREFIX, ROOT_PREFIX)):
        return "index"
    filename = key_filename(key)
    if filename == "APKINDEX.tar.gz":
        return "index"
    if filename.endswith(".apk"):
        return "apk"
    if filename.endswith(_DEB_SUFFIXES):
        return "deb"
    if "/dists/" in key_url(key).partition("?")[0] or filename.endswith(_METADATA_SUFFIX):
        return "index"
    if filename.endswith((".whl", ".egg")):
        return "wheel"
    if filename.endswith(_SDIST_SUFFIXES) and distribution_project(filename):
        return "sdist"
    return "other"


def distribution_project(filename: str) -> str | None:
    """
    The normalised project name of a Python distribution file (or of its
    ``.metadata`` file), or None when ``filename`` is not one.

    A wheel's (or egg's) name ends at its first hyphen; an sdist's version
    follows its last hyphen, since old sdists keep the project's hyphens
    (``python-dateutil-2.8.2.tar.gz``).
    """
    name = filename.removesuffix(_METADATA_SUFFIX)
    if name.endswith((".whl", ".egg")):
        project, separator, _ = name.partition("-")
    else:
        suffix = next((s for s in _SDIST_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            return None
        project, separator, _ = name[: -len(suffix)].rpartition("-")
    if not separator or not project:
        return None
    return normalize_project_name(project)


def key_matcher(
    patterns: Sequence[str], projects: Sequence[str]
) -> Callable[[str], bool]:
    """
    A predicate on cache keys for ``purge``.

    A pattern is an ``fnmatch`` glob over the URL of a key
    (``scheme://host/path?query``; its private entries and variants go
    with it); a pattern without ``scheme://`` matches either scheme, as
    keys had none before.  A project (any spelling) matches its
    simple-index pages and every distribution file whose name belongs to
    it.
    """
    globs = list(patterns)
    names = {normalize_project_name(project) for project in projects}

    def matches(key: str) -> bool:
        if key.startswith((PAGE_PREFIX, ROOT_PREFIX)):
            # The index's own keys (``simple-page|https://…|name``) hold a
            # URL inside, which a glob without a scheme must not reach into.
            url = schemeless = key
        else:
            url = key_url(key)
            schemeless = url.partition("://")[2]
        if any(
            fnmatchcase(url, glob) or ("://" not in glob and fnmatchcase(schemeless, glob))
            for glob in globs
        ):
            return True
        if not names:
            return False
        if key.startswith(PAGE_PREFIX):
            return key.rpartition("|")[2] in names
        if key.startswith(ROOT_PREFIX):
            return False
        return distribution_project(key_filename(key)) in names

    return matches

