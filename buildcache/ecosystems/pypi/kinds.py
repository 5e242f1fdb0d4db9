"""
Which pip files never change, and which pages do: the path rules of the
Python package ecosystem, for the proxy (a wheel fetched through it) and
the index (whose sdists are immutable too: an index never reuses a file
name, while elsewhere on the web a ``.tar.gz`` is often a "latest").
"""

from __future__ import annotations

from buildcache.engine.freshness import Kind
from buildcache.engine.policy import GenericPolicy, PathRule, kind_by_rules, rule

__all__ = ["FILE_RULES", "INDEX_FILE_RULES", "PAGE_RULES", "RULES", "INDEX_RULES", "PIP_FILES", "kind_of"]

#: Wheels and their PEP 658 metadata: versioned by name everywhere.
FILE_RULES: tuple[PathRule, ...] = (
    rule(r"[^/]\.whl(?:\.metadata)?$", Kind.IMMUTABLE),
)
#: Sdists and legacy distributions, only as served by an index.
INDEX_FILE_RULES: tuple[PathRule, ...] = (
    rule(
        r"[^/]\.(?:tar\.gz|zip|tar\.bz2|tar\.xz|tgz|egg)(?:\.metadata)?$",
        Kind.IMMUTABLE,
    ),
)
#: Simple index (PEP 503/691) pages: the root and the project pages (after
#: the file rows: a file name is never a project page), with devpi's
#: "+simple" spelling.
PAGE_RULES: tuple[PathRule, ...] = (
    rule(r"(?:^|/)\+?simple(?:/[^/]*/?)?$", Kind.INDEX),
)
#: Through the proxy.
RULES = FILE_RULES + PAGE_RULES
#: Files the index front end serves.
INDEX_RULES = FILE_RULES + INDEX_FILE_RULES + PAGE_RULES


def kind_of(url: str, *, served_by_index: bool = False) -> Kind | None:
    """
    The kind of a pip file or page at ``url``, or None when it is neither.
    """
    return kind_by_rules(INDEX_RULES if served_by_index else RULES, url)


#: Pip files and pages fetched through the proxy: generic HTTP with these
#: kinds (the index front end serves them with its own policy).
PIP_FILES = GenericPolicy(RULES)
