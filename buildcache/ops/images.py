"""
The registry front end's images stored by tag, for the snapshot (the
status page, ``/-/stats.json``, the metrics): which repositories have
manifests stored under which tags, read from the store's keys
(:mod:`buildcache.ops.registry_keys`), bounded, and read again only when
the store changed.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

from attrs import define
from twisted.internet.interfaces import IReactorTime

from buildcache.ops.registry_keys import KEY_PREFIX, stored_tags
from buildcache.store import StoreStats

#: The keys of manifests stored by tag read at a time (a key is some
#: hundred bytes): past them the listing says it is incomplete.
TAG_KEYS_READ = 5000
#: Repositories, and tags of each, listed.
REPOSITORIES_LISTED = 50
TAGS_LISTED = 20
#: Seconds a reading is reused while the store's totals stay the same
#: (metrics scrapes come often; tags are stored rarely).
TAGS_REREAD_SECONDS = 30.0
#: The store keys of manifests by tag: a tag has no ":", a digest has.
_TAG_KEYS = (KEY_PREFIX, "*/manifests/*", "*/manifests/*:*")


class StoredImage(TypedDict):
    """
    One repository of which manifests are stored by tag.
    """

    #: ``<registry>/<repository>``.
    name: str
    #: The first :data:`TAGS_LISTED`, in order.
    tags: list[str]
    #: Tags stored beyond those listed.
    more_tags: int


class RegistryStored(TypedDict):
    """
    The registry front end's images stored by tag, read from the store's
    keys (a manifest stored under a tag, for any client's ``Accept``).
    """

    repositories: int
    tags: int
    #: False when more manifests by tag are stored than were read
    #: (:data:`TAG_KEYS_READ`): the counts are then lower bounds.
    complete: bool
    #: The first :data:`REPOSITORIES_LISTED` repositories, by name.
    listed: list[StoredImage]


class TagKeys(Protocol):
    """
    The store, as the listing reads it.
    """

    def keys_matching(
        self, prefix: str, pattern: str, limit: int, exclude: str | None = None
    ) -> list[str]:
        """
        See :meth:`buildcache.store.StoreReader.keys_matching`.
        """


def registry_stored(tag_keys: list[str], complete: bool) -> RegistryStored:
    """
    The images stored by tag, of the keys of manifests by tag read
    (:func:`buildcache.ops.registry_keys.stored_tags`), listed within
    :data:`REPOSITORIES_LISTED` and :data:`TAGS_LISTED`.
    """
    repositories = stored_tags(tag_keys)
    return {
        "repositories": len(repositories),
        "tags": sum(len(repository.tags) for repository in repositories),
        "complete": complete,
        "listed": [
            {
                "name": repository.name,
                "tags": list(repository.tags[:TAGS_LISTED]),
                "more_tags": max(0, len(repository.tags) - TAGS_LISTED),
            }
            for repository in repositories[:REPOSITORIES_LISTED]
        ],
    }


@define
class StoredImages:
    """
    Reads the images stored by tag from one store, keeping the last
    reading.
    """

    store: TagKeys
    clock: IReactorTime
    #: The store's totals and the time of the last reading, and what it
    #: found.
    _last: tuple[tuple[int, int], float, RegistryStored] | None = None

    def read(self, sizes: StoreStats) -> RegistryStored:
        """
        The images stored now; ``sizes`` are the store's totals now.
        """
        # Read again when the store changed (a new tag is a new row: the
        # totals move) or the last reading is old (a row replaced by one
        # of the same size); the same for every scrape in between.
        totals = (sizes.entries, sizes.bytes_stored)
        now = self.clock.seconds()
        last = self._last
        if last is not None and last[0] == totals and 0 <= now - last[1] < TAGS_REREAD_SECONDS:
            return last[2]
        prefix, pattern, digests = _TAG_KEYS
        keys = self.store.keys_matching(prefix, pattern, TAG_KEYS_READ, exclude=digests)
        stored = registry_stored(keys, complete=len(keys) < TAG_KEYS_READ)
        self._last = (totals, now, stored)
        return stored
