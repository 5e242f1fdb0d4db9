"""
The front ends as operations know them: the one table that lists them.
Adding a front end is adding its row here: the accounts start with zero
totals for each (:mod:`buildcache.ops.activity`), the status page draws a
card and a most-requested list for each, the metrics label by their names,
and ``buildcache stats`` and ``purge`` know the keys its ecosystem makes
of its own (:mod:`buildcache.ops.cli_keys`) and counts its kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attrs import field, frozen

from buildcache.ecosystems.pypi.pages import page_key
from buildcache.ecosystems.pypi.root import root_key
from buildcache.ops import registry_keys

#: The package index's own keys: a project's page, and the root page.
PAGE_PREFIX = page_key("", "").removesuffix("|")
ROOT_PREFIX = root_key("", "").removesuffix("|")


def _index_kind(key: str) -> str:
    return "index"


def _registry_kind(key: str) -> str:
    parsed = registry_keys.parse_key(key)
    return "other" if parsed is None else parsed.kind


@frozen
class FrontEnd:
    """
    One front end: its name, and what ``buildcache stats`` counts of it.
    """

    #: Its name in :class:`buildcache.engine.events.Exchange` records,
    #: stats keys and metric labels.
    name: str
    #: How it is named for people.
    label: str
    #: The kinds of entries ``stats`` counts for it, besides ``index`` and
    #: ``other``, in display order.
    kinds: tuple[str, ...] = ()
    #: The keys its ecosystem makes of its own (not URLs), by prefix, and
    #: the kind of each key (one of :attr:`kinds`, ``index`` or ``other``).
    #: A glob without a scheme never reaches into them (they may hold a
    #: URL).  URL keys go by the ecosystems' path rules.
    own_keys: Mapping[str, Callable[[str], str]] = field(factory=dict)


#: Every front end, in display order.  The proxy and the mirror routes
#: store the same URL keys; the kinds of those are counted once.
FRONT_END_TABLE = (
    FrontEnd("proxy", "apk/apt proxy", ("apk", "deb")),
    FrontEnd("mirror", "mirror routes"),
    FrontEnd(
        "index", "pip index", ("wheel", "sdist"),
        {PAGE_PREFIX: _index_kind, ROOT_PREFIX: _index_kind},
    ),
    FrontEnd(
        "registry", "container registry", (registry_keys.MANIFEST, registry_keys.BLOB),
        {registry_keys.KEY_PREFIX: _registry_kind},
    ),
)
#: Front ends, as they appear in stats and metric labels.
FRONT_ENDS = tuple(front_end.name for front_end in FRONT_END_TABLE)
#: How each front end is named for people.
FRONT_END_LABELS = {front_end.name: front_end.label for front_end in FRONT_END_TABLE}
#: Kinds of entries ``stats`` counts, in display order.
KINDS = (*(kind for front_end in FRONT_END_TABLE for kind in front_end.kinds), "index", "other")
#: Every front end's own keys, by prefix.
OWN_KEYS = {
    prefix: kind_of
    for front_end in FRONT_END_TABLE for prefix, kind_of in front_end.own_keys.items()
}
