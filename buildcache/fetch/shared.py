"""
What the fetcher asks of a shared tier: an object store that several
buildcache nodes share behind their own disks (:mod:`buildcache.shared`
implements it; nothing here knows S3).

A download whose request is marked :attr:`UpstreamRequest.shared` asks the
tier first (:meth:`SharedTier.before_upstream`).  The tier answers with a
:class:`SharedCopy` to read (a record it trusts named the body's digest),
a :class:`SharedLease` (this node fetches the body upstream for every node
that asks meanwhile), or None (fetch it as if there were no tier).  A copy
is read as a download is, held back from every client until its size and
sha256 (and the request's own checks) pass; one that fails goes upstream
within the same download, so no client ever sees its bytes.  A body
fetched upstream and stored is handed to :meth:`SharedTier.publish`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from attrs import field, frozen
from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from buildcache.fetch.request import UpstreamRequest
    from buildcache.store import Entry

__all__ = ["CopyFault", "SharedCopy", "SharedLease", "SharedTier"]


class CopyFault(enum.Enum):
    """Why a copy was not served (see :meth:`SharedTier.copy_failed`)."""

    #: Its bytes are not what its record says (a digest or size that
    #: fails, a body longer than the record's size): replace it.
    CORRUPT = "corrupt"
    #: The store has no such object (evicted under its record).
    MISSING = "missing"
    #: The store failed to deliver it (unreachable, slow, an error
    #: status, cut short): the store's health, not the copy's.
    STORE = "store"
    #: This node could not keep it (its disk full or refusing): nobody's
    #: fault in the tier.
    LOCAL = "local"


@frozen
class SharedCopy:
    """
    A body in the shared tier, found through a record the tier trusts.
    """

    #: Where it is, for logs and events: the object's name in the store
    #: (never a URL: a presigned one carries a signature).
    name: str
    #: What the fetcher GETs the body from (a presigned URL): never logged.
    url: str = field(repr=False)
    #: The response headers stored and served with the body (the
    #: record's, not the object store's).
    headers: Mapping[str, str] = field(eq=False)
    size: int
    #: Hex sha256 of the body: the body is checked against it.
    sha256: str
    #: Whether ``size`` is vouched for (a signed record, or the request's
    #: own expected size): room for it is then reserved on the disk
    #: before a byte arrives; else the room grows with the bytes read, so
    #: that a record lying about its size cannot evict what is stored.
    size_vouched: bool = True


class SharedLease(Protocol):
    """
    This node's claim on fetching one key upstream for every node (see
    :meth:`SharedTier.before_upstream`), renewed until released.
    """

    def release(self) -> None:
        """
        Stop renewing the lease and delete it: the download ended without
        a body to publish (:meth:`SharedTier.publish` releases it itself).
        """


class SharedTier(Protocol):
    """
    The shared tier as the fetcher sees it.  No method fails: a tier that
    is down or slow is logged and skipped, and the fetcher goes upstream.
    """

    def shares(self, request: UpstreamRequest) -> bool:
        """
        Whether ``request``'s body is read from and written to the tier:
        it is marked shared (immutable, anonymous), and a copy could be
        verified (the request carries an independent check, or the nodes
        share a secret that signs records).
        """

    def before_upstream(
        self, request: UpstreamRequest
    ) -> Deferred[SharedCopy | SharedLease | None]:
        """
        Before ``request`` goes upstream: a copy to read, else a lease
        taken for this node's upstream fetch, else None.  May wait, for a
        bounded time, while another node holds the lease, for its copy to
        appear.
        """

    def head_of(self, request: UpstreamRequest) -> Deferred[SharedCopy | None]:
        """
        For a HEAD that missed the disk: the copy a trusted record names
        (its size and headers answer the HEAD), or None; no lease, no
        wait.
        """

    def copy_served(self, request: UpstreamRequest, copy: SharedCopy) -> None:
        """
        ``copy`` was read whole, checked and stored for ``request``.
        """

    def copy_failed(
        self, request: UpstreamRequest, copy: SharedCopy, why: str, fault: CopyFault
    ) -> None:
        """
        ``copy`` was not served, because ``why`` (``fault`` says whose
        fault): the request goes upstream, and what it fetches replaces
        a CORRUPT copy.
        """

    def publish(
        self, request: UpstreamRequest, entry: Entry, lease: SharedLease | None
    ) -> None:
        """
        The body fetched upstream for ``request`` is stored as ``entry``:
        upload it and its record in the background (when the tier keeps
        it), then release ``lease``.
        """

    def used(self, entry: Entry) -> None:
        """
        ``entry``, of a kind that is shared, answered a client from this
        node's disk: its copy in the tier is in use too (the tier's LRU
        hears of it, or a file every node keeps on disk would look unused
        there).
        """
