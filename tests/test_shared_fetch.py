"""
The fetcher's side of the shared tier (:mod:`buildcache.fetch.shared`),
with an in-memory tier: a copy is read, checked and stored as a HIT; a
copy that fails goes upstream in the same download, unseen by clients; a
lease is handed to publish, or released when nothing is published; and
only immutable, anonymous, unconditional fetches ask the tier at all.
"""

from __future__ import annotations

import hashlib
from typing import Any

from attrs import Factory, define, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from buildcache.engine.policy import Expectation, GenericPolicy, Target
from buildcache.fetch.request import UpstreamRequest
from buildcache.fetch.shared import CopyFault, SharedCopy
from buildcache.store import Entry
from tests.test_engine import ORIGIN, POLICY, Harness, Served

BODY = b"package bytes " * 1000
CORRUPT = b"x" * len(BODY)
#: Larger than the tail withheld from a body streamed before its check.
LARGE = b"a large wheel " * 30_000
LARGE_CORRUPT = b"y" * len(LARGE)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@define
class Lease:
    released: int = 0

    def release(self) -> None:
        self.released += 1


@define
class Tier:
    """A shared tier that answers what the test tells it to."""

    answer: SharedCopy | Lease | None = None
    sharing: bool = True
    asked: list[str] = Factory(list)
    served: list[str] = Factory(list)
    failed: list[tuple[str, str]] = Factory(list)
    faults: list[CopyFault] = Factory(list)
    published: list[tuple[str, Entry, Any]] = Factory(list)
    used_entries: list[str] = Factory(list)
    #: When set, before_upstream waits on this.
    waiting: Deferred[None] | None = None

    def shares(self, request: UpstreamRequest) -> bool:
        return self.sharing

    def before_upstream(self, request: UpstreamRequest) -> Deferred[Any]:
        self.asked.append(request.key)
        if self.waiting is not None:
            return self.waiting.addCallback(lambda _: self.answer)
        return succeed(self.answer)

    def head_of(self, request: UpstreamRequest) -> Deferred[SharedCopy | None]:
        self.asked.append(request.key)
        answer = self.answer
        return succeed(answer if isinstance(answer, SharedCopy) else None)

    def copy_served(self, request: UpstreamRequest, copy: SharedCopy) -> None:
        self.served.append(copy.name)

    def copy_failed(
        self, request: UpstreamRequest, copy: SharedCopy, why: str, fault: CopyFault
    ) -> None:
        self.failed.append((copy.name, why))
        self.faults.append(fault)

    def publish(self, request: UpstreamRequest, entry: Entry, lease: Any) -> None:
        self.published.append((request.key, entry, lease))

    def used(self, entry: Entry) -> None:
        self.used_entries.append(entry.key)


def copy_of(body: bytes, path: str = "/bucket/blob", **headers: str) -> SharedCopy:
    return SharedCopy(
        name="blobs/sha256/" + sha256(body), url=ORIGIN + path,
        headers={"content-type": "application/x-test", **headers},
        size=len(body), sha256=sha256(body),
    )


def with_tier(case: SynchronousTestCase) -> tuple[Harness, Tier]:
    """
    The engine's harness with an in-memory tier, its origin serving
    ``/a.pkg``.
    """
    harness = Harness(case.mktemp())
    case.addCleanup(harness.close)
    tier = Tier()
    harness.engine.fetcher.shared = tier
    harness.origin.files["/a.pkg"] = Served(BODY, {"content-type": "text/x-origin"})
    return harness, tier


class SharedFetchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.harness, self.tier = with_tier(self)

    def test_copy_is_a_hit_with_no_upstream_request(self) -> None:
        """
        A copy the tier names is read from the store, checked, stored with
        the record's headers and served as a HIT; the upstream is never
        asked, and the exchange is counted as from the shared tier.
        """
        self.harness.origin.files["/bucket/blob"] = Served(BODY)
        self.tier.answer = copy_of(BODY)
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.status, answer.body), (200, BODY))
        self.assertEqual(answer.header("x-cache"), "HIT")
        self.assertEqual(answer.header("content-type"), "application/x-test")
        self.assertEqual(self.harness.origin.count("/a.pkg"), 0)
        self.assertEqual(self.harness.origin.count("/bucket/blob"), 1)
        self.assertEqual(self.tier.served, [copy_of(BODY).name])
        self.assertEqual(self.tier.published, [])
        [exchange] = self.harness.observer.exchanges
        self.assertEqual((exchange.cache, exchange.shared), ("HIT", True))
        entry = self.harness.store.peek(self.tier.asked[0])
        assert entry is not None
        self.assertEqual(entry.sha256, sha256(BODY))
        self.assertEqual(entry.headers.get("content-type"), "application/x-test")
        # The second request is the disk's: the tier is not asked again.
        again = self.harness.get("/a.pkg")
        self.assertEqual((again.body, again.header("x-cache")), (BODY, "HIT"))
        self.assertEqual(len(self.tier.asked), 1)
        self.assertFalse(self.harness.observer.exchanges[1].shared)
        # ... and the tier hears that its copy is in use.
        self.assertEqual(self.tier.used_entries, [self.tier.asked[0]])

    def test_corrupt_copy_goes_upstream_unseen(self) -> None:
        """
        A copy whose bytes do not match its digest is never served: the
        same download goes upstream, the client gets the upstream's bytes
        as a MISS, and what was fetched is published (to replace it).
        """
        self.harness.origin.files["/bucket/blob"] = Served(CORRUPT)
        self.tier.answer = copy_of(BODY)
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.status, answer.body), (200, BODY))
        self.assertEqual(answer.header("x-cache"), "MISS")
        self.assertEqual(answer.header("content-type"), "text/x-origin")
        self.assertEqual(self.harness.origin.count("/a.pkg"), 1)
        [(name, why)] = self.tier.failed
        self.assertEqual(name, copy_of(BODY).name)
        self.assertIn("sha256", why)
        self.assertEqual(self.tier.faults, [CopyFault.CORRUPT])
        [(key, entry, lease)] = self.tier.published
        self.assertEqual((entry.sha256, lease), (sha256(BODY), None))
        self.assertEqual(self.tier.served, [])

    def test_copy_cut_short_goes_upstream(self) -> None:
        self.harness.origin.files["/bucket/blob"] = Served(BODY, cut_at=1000)
        self.tier.answer = copy_of(BODY)
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.body, answer.header("x-cache")), (BODY, "MISS"))
        self.assertEqual(len(self.tier.failed), 1)
        self.assertEqual(self.harness.origin.count("/a.pkg"), 1)

    def test_missing_copy_goes_upstream(self) -> None:
        self.tier.answer = copy_of(BODY, "/bucket/gone")
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.body, answer.header("x-cache")), (BODY, "MISS"))
        self.assertEqual(self.tier.faults, [CopyFault.MISSING])

    def test_concurrent_clients_share_one_copy_read(self) -> None:
        """
        Clients that ask while the tier is being consulted join the one
        download: one read of the copy, every client a HIT.
        """
        self.harness.origin.files["/bucket/blob"] = Served(BODY)
        self.tier.answer = copy_of(BODY)
        self.tier.waiting = Deferred()
        clients = [self.harness.send("/a.pkg") for _ in range(3)]
        self.harness.settle()
        self.assertEqual([c.transport.value() for c in clients], [b""] * 3)
        self.tier.waiting.callback(None)
        self.harness.settle()
        for client in clients:
            answer = client.answer()
            self.assertEqual((answer.body, answer.header("x-cache")), (BODY, "HIT"))
        self.assertEqual(self.harness.origin.count("/bucket/blob"), 1)
        self.assertEqual(len(self.tier.asked), 1)

    def test_lease_goes_to_publish(self) -> None:
        lease = Lease()
        self.tier.answer = lease
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.body, answer.header("x-cache")), (BODY, "MISS"))
        [(_, entry, published_lease)] = self.tier.published
        self.assertIs(published_lease, lease)
        self.assertEqual(lease.released, 0)
        self.assertEqual(entry.sha256, sha256(BODY))

    def test_lease_released_when_nothing_is_stored(self) -> None:
        lease = Lease()
        self.tier.answer = lease
        answer = self.harness.get("/missing.pkg")
        self.assertEqual(answer.status, 404)
        self.assertEqual(lease.released, 1)
        self.assertEqual(self.tier.published, [])

    def test_lease_released_when_the_upstream_fails(self) -> None:
        lease = Lease()
        self.tier.answer = lease
        self.harness.line.down = True
        answer = self.harness.get("/a.pkg")
        self.assertEqual(answer.status, 502)
        self.assertEqual(lease.released, 1)

    def test_only_immutable_anonymous_files_ask_the_tier(self) -> None:
        """
        A file of another kind, or one asked with credentials, never asks
        the tier nor is published.
        """
        self.harness.origin.files["/a.txt"] = Served(b"text")
        self.harness.get("/a.txt")
        self.harness.get("/a.txt")
        self.harness.get("/a.pkg", {"authorization": "Basic dTpw"})
        self.harness.get("/a.pkg", {"authorization": "Basic dTpw"})
        self.assertEqual(self.tier.asked, [])
        self.assertEqual(self.tier.published, [])
        self.assertEqual(self.tier.used_entries, [])

    def test_a_tier_that_does_not_share_is_not_asked(self) -> None:
        self.tier.sharing = False
        answer = self.harness.get("/a.pkg")
        self.assertEqual(answer.body, BODY)
        self.assertEqual((self.tier.asked, self.tier.published), ([], []))

    def test_copy_bytes_are_not_counted_as_fetched_upstream(self) -> None:
        received: list[tuple[str, int]] = []
        activity = self.harness.engine.fetcher.activity

        class Counting:
            def __getattr__(self, name: str) -> Any:
                if name == "upstream_received":
                    return lambda front_end, n: received.append((front_end, n))
                return getattr(activity, name)

        self.harness.engine.fetcher.activity = Counting()  # type: ignore[assignment]
        self.harness.origin.files["/bucket/blob"] = Served(BODY)
        self.tier.answer = copy_of(BODY)
        self.harness.get("/a.pkg")
        self.assertEqual(received, [])
        self.harness.origin.files["/b.pkg"] = Served(BODY)
        self.tier.answer = None
        self.harness.get("/b.pkg")
        self.assertEqual(sum(n for _, n in received), len(BODY))


@frozen
class StreamedChecked(GenericPolicy):
    """Every file has a digest, and streams before its check (a large wheel)."""

    sha: str = ""

    async def expect(self, target: Target, engine: Any) -> Expectation:
        return Expectation(sha256=self.sha, stream_before_check=True)


class LargeCopyTests(SynchronousTestCase):
    """
    A copy for a request that streams before its check (a large file with
    a digest) streams with its tail withheld, as from upstream.
    """

    def setUp(self) -> None:
        self.harness, self.tier = with_tier(self)
        self.harness.front.policy = StreamedChecked(POLICY.rules, sha256(LARGE))
        self.harness.origin.files["/a.pkg"] = Served(LARGE)

    def test_good_copy_streams(self) -> None:
        self.harness.origin.files["/bucket/blob"] = Served(LARGE)
        self.tier.answer = copy_of(LARGE)
        answer = self.harness.get("/a.pkg")
        self.assertEqual((answer.body, answer.header("x-cache")), (LARGE, "HIT"))
        self.assertEqual(self.harness.origin.count("/a.pkg"), 0)

    def test_corrupt_copy_is_never_whole(self) -> None:
        """
        A corrupt copy already streaming fails its clients' responses
        (never a whole wrong file: the tail was withheld); the next
        request goes upstream.
        """
        self.harness.origin.files["/bucket/blob"] = Served(LARGE_CORRUPT)
        self.tier.answer = copy_of(LARGE)
        client = self.harness.send("/a.pkg")
        self.harness.settle()
        raw = client.transport.value()
        self.assertNotIn(LARGE_CORRUPT, raw)
        # Streamed before its check: all but the withheld tail went out.
        self.assertIn(LARGE_CORRUPT[:100_000], raw)
        answer = client.answer()
        # It streamed (the copy was not held whole), so it could not go
        # upstream: the response is cut short, the upstream not asked.
        self.assertEqual(answer.status, 200)
        self.assertFalse(answer.complete)
        self.assertEqual(self.harness.origin.count("/a.pkg"), 0)
        self.assertEqual(self.tier.faults, [CopyFault.CORRUPT])
        self.tier.answer = None
        again = self.harness.get("/a.pkg")
        self.assertEqual((again.body, again.header("x-cache")), (LARGE, "MISS"))

    def test_store_dying_mid_copy_resumes_upstream(self) -> None:
        """
        The store dropping a large file's copy part-way (its clients
        already streaming) costs no client error: the rest comes from
        upstream with ``Range``, and the whole is checked as one body.
        """
        self.harness.origin.files["/a.pkg"] = Served(LARGE, ranges=True)
        half = len(LARGE) // 2
        self.harness.origin.files["/bucket/blob"] = Served(LARGE, cut_at=half)
        self.tier.answer = copy_of(LARGE)
        answer = self.harness.get("/a.pkg")
        self.assertTrue(answer.complete)
        self.assertEqual(answer.body, LARGE)
        [seen] = [s for s in self.harness.origin.seen if s.path == "/a.pkg"]
        self.assertEqual(seen.headers.get("range"), f"bytes={half}-")
        self.assertEqual(self.tier.faults, [CopyFault.STORE])
        entry = self.harness.store.peek(self.tier.asked[0])
        assert entry is not None
        self.assertEqual(entry.sha256, sha256(LARGE))

    def test_resumed_body_that_fails_is_cut(self) -> None:
        """
        The rest fetched upstream is checked with what the copy gave: an
        upstream whose rest does not make the digest ends the response
        short, and stores nothing.
        """
        self.harness.origin.files["/a.pkg"] = Served(LARGE_CORRUPT, ranges=True)
        self.harness.origin.files["/bucket/blob"] = Served(LARGE, cut_at=len(LARGE) // 2)
        self.tier.answer = copy_of(LARGE)
        answer = self.harness.get("/a.pkg")
        self.assertFalse(answer.complete)
        self.assertIsNone(self.harness.store.peek(self.tier.asked[0]))
