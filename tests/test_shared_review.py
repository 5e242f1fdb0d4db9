"""
Regression tests for the defects the first review of the shared tier
(issue 15) found: each test's docstring names the defect it showed
(``DEFECT``, as found), and the test asserts the fixed behaviour.
"""

from __future__ import annotations

from typing import Any

from attrs import define, evolve, field
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.fetch.shared import SharedCopy
from buildcache.shared.leases import encode_lease
from buildcache.shared.location import S3Location
from buildcache.shared.records import Record, encode_record, record_name
from buildcache.shared.tier import S3Tier
from tests.shared_memory import FileStore, MemoryObjects
from tests.test_engine import ORIGIN, Harness, Served
from tests.test_shared_fetch import BODY, copy_of, sha256, with_tier
from tests.test_shared_units import request, result

OTHER = b"another package " * 1000


class FetcherReviewTests(SynchronousTestCase):
    """The fetcher's reading of a copy, with a tier that names it."""

    def setUp(self) -> None:
        self.harness, self.tier = with_tier(self)
        self.harness.origin.files["/b.pkg"] = Served(OTHER)

    def stored_b(self) -> str:
        """Fetch /b.pkg (no copy in the tier) so that it is on the disk; its key."""
        answer = self.harness.get("/b.pkg")
        self.assertEqual((answer.body, answer.header("x-cache")), (OTHER, "MISS"))
        key = self.tier.asked[-1]
        self.assertIsNotNone(self.harness.store.peek(key))
        return key

    def test_record_size_lie_evicts_the_disk(self) -> None:
        """
        DEFECT (poisoning, size lie): the fetcher reserves room on the
        disk for the size a record *claims* before a byte of the blob is
        read, and that reservation evicts stored entries.  A record that
        claims a near-``--max-size`` size (forgeable by anyone with write
        access when there is no secret: a pip file is shared on its
        page's sha256 alone, which says nothing of the size) empties the
        node's L1, although the copy then fails its size check.
        """
        b_key = self.stored_b()
        self.harness.origin.files["/bucket/blob"] = Served(BODY)
        lie = evolve(copy_of(BODY), size=self.harness.store.max_size - 10_000)
        self.tier.answer = lie
        answer = self.harness.get("/a.pkg")
        self.assertEqual(answer.body, BODY)
        self.assertEqual(len(self.tier.failed), 1)
        # The copy failed, and must have cost nothing on the disk.
        self.assertIsNotNone(self.harness.store.peek(b_key))

    def test_blob_larger_than_its_record_is_read_whole_and_evicts(self) -> None:
        """
        DEFECT (poisoning, swapped blob, even WITH a secret): a blob
        replaced in the bucket by a larger object is read past the size
        its signed record gives: the spool grows (reserving more room,
        evicting stored entries) up to the whole store before the size
        check fails.  The copy must be cut at the record's size (or
        refused when the store's Content-Length disagrees).
        """
        b_key = self.stored_b()
        store = self.harness.store
        store.max_size = 400_000
        padding = b"\0" * (store.max_size - len(BODY) - 5_000)
        self.harness.origin.files["/bucket/blob"] = Served(BODY + padding)
        self.tier.answer = copy_of(BODY)
        answer = self.harness.get("/a.pkg")
        self.assertEqual(answer.body, BODY)
        self.assertEqual(len(self.tier.failed), 1)
        self.assertIsNotNone(store.peek(b_key))

    def test_local_disk_refusal_blames_the_copy(self) -> None:
        """
        DEFECT (restart, copy that goes to memory; low): a copy this
        node's disk cannot hold (over --max-object-size here; a full disk
        alike) is abandoned and reported with ``copy_failed``, which
        counts it as rejected, logs ``shared_blob_to_replace`` and makes
        the next publication of the key re-upload a blob that is fine
        (up to 5 GiB).  Only the copy's own faults (missing, cut short,
        failing its check) should mark it for replacement.
        """
        self.harness.store.max_object_size = 1000
        self.harness.origin.files["/bucket/blob"] = Served(BODY)
        self.tier.answer = copy_of(BODY)
        answer = self.harness.get("/a.pkg")
        self.assertEqual(answer.body, BODY)
        self.assertEqual(self.tier.failed, [])

    def test_hung_blob_get_holds_clients_past_their_timeout(self) -> None:
        """
        DEFECT (slow store): the record look-up is bounded by 2 s, but the
        blob's GET waits for its response head for the fetcher's whole
        idle timeout (30 s), and its body may trickle for as long as it
        likes, while every client is held with no byte (a copy is held
        until checked).  pip gives up after 15 s: the client errs,
        which the issue forbids for a slow store.  A copy read needs a
        deadline of its own (well under --shared-wait), after which the
        download goes upstream.
        """
        self.harness.origin.files["/bucket/blob"] = Served(BODY, hang=True)
        self.tier.answer = copy_of(BODY)
        client = self.harness.send("/a.pkg")
        self.harness.settle()
        self.harness.later(14.0)
        self.assertNotEqual(client.transport.value(), b"", "no byte after 14 s")


def _tier(objects: MemoryObjects, secret: bytes | None, clock: Any, files: FileStore) -> S3Tier:
    tier = S3Tier(
        objects=objects, location=S3Location("bkt", "p/", "http://127.0.0.1:1"),
        store=files, clock=clock, node="n1", secret=secret,
    )
    tier.conditional = True
    return tier


class UnsignedRecordTests(SynchronousTestCase):
    """Records written by someone with write access and no secret."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.objects = MemoryObjects()
        self.files = FileStore(self.mktemp())

    def test_unsigned_record_headers_are_replayed(self) -> None:
        """
        DEFECT (poisoning, header injection, no --shared-secret-file):
        without a secret a record is trusted for its body because the
        request checks the body itself, but the record's headers are
        checked by nothing, and they are served (Content-Type,
        Content-Disposition, Cache-Control, Location, Link,
        Docker-Content-Digest all pass _PASSED_ON) and stored on the
        disk with the body for good.  An attacker with bucket write
        access makes every node serve e.g. ``content-type: text/html``
        and a ``docker-content-digest`` that is not the body's.  Without
        a secret, replay no header from the record (or only what the
        request itself determines).
        """
        body = b"wheel" * 100
        digest = sha256(body)
        forged = {
            "content-type": "text/html",
            "content-disposition": "attachment; filename=evil.sh",
            "cache-control": "public, max-age=31536000",
            "location": "http://127.0.0.1:9/evil",
            "docker-content-digest": "sha256:" + "0" * 64,
        }
        key = "pypi:files/a-1.whl"
        self.objects.objects[record_name(key)] = encode_record(Record(
            key=key, sha256=digest, size=len(body), headers=forged,
            source_digest=None, stored_at=900.0, node="attacker",
        ), None)
        tier = _tier(self.objects, None, self.clock, self.files)
        copy = result(tier.before_upstream(request(key=key, expected_sha256=digest)))
        if isinstance(copy, SharedCopy):
            injected = {k: v for k, v in copy.headers.items() if forged.get(k) == v}
            self.assertEqual(injected, {}, "unsigned record's headers would be served")

    def test_signed_record_sha_is_taken_over_request_digest_case(self) -> None:
        """
        (Sound, kept as a guard) a signed record naming another sha256
        than the request's expected one is stale, not used.
        """
        key = "pypi:files/a-1.whl"
        self.objects.objects[record_name(key)] = encode_record(Record(
            key=key, sha256="1" * 64, size=5, headers={}, source_digest=None,
            stored_at=900.0, node="n2",
        ), b"k")
        tier = _tier(self.objects, b"k", self.clock, self.files)
        got = result(tier.before_upstream(request(key=key, expected_sha256="2" * 64)))
        self.assertNotIsInstance(got, SharedCopy)


@define
class SlowObjects(MemoryObjects):
    """
    The in-memory store, answering each small GET after ``delay``
    seconds of the clock (under the tier's 2 s look-up bound, so the
    store counts as healthy); copies are read from the harness origin.
    """

    delay: float = 0.0
    #: Names asked for, as soon as they are asked.
    seen: list[str] = field(factory=list)

    def get_url(self, name: str) -> str:
        return ORIGIN + "/bucket/" + name

    async def get_small(self, name: str, limit: int, timeout: float | None = None) -> bytes | None:
        self.seen.append(name)
        if self.delay:
            await deferLater(self.clock, self.delay, lambda: None)  # type: ignore[arg-type]
        return await super().get_small(name, limit, timeout)


class RealTierTests(SynchronousTestCase):
    """The engine with the real :class:`S3Tier` over an in-memory store."""

    def setUp(self) -> None:
        self.harness = Harness(self.mktemp())
        self.addCleanup(self.harness.close)
        self.objects = SlowObjects(clock=self.harness.clock)
        self.tier = S3Tier(
            objects=self.objects, location=S3Location("bkt", "p/", "http://127.0.0.1:1"),
            store=self.harness.store, clock=self.harness.clock, node="n1",
            secret=b"0123456789abcdef-secret",
        )
        self.tier.conditional = True
        self.harness.engine.fetcher.shared = self.tier
        self.harness.origin.files["/a.pkg"] = Served(BODY, {"content-type": "text/x-origin"})

    def test_lease_wait_outlasts_the_clients_timeout(self) -> None:
        """
        DEFECT (leases, a wait longer than --shared-wait): the wait on
        another node's lease is measured from after the first record
        look-up, and its deadline check ignores the time of the look-ups
        it makes on every round (record GET + lease GET).  With a store
        that answers each small GET in 1 s (healthy: under the 2 s
        bound) and another node holding the lease, the client has no
        byte until 16.7 s, past the default --shared-wait of 15 s, which
        is also pip's read timeout: pip fails.  Measure the deadline from
        the download's start, count the look-ups in it, and keep the
        default below the clients' timeout (e.g. 10 s).
        """
        self.objects.delay = 1.0
        client = self.harness.send("/a.pkg")
        self.harness.settle()
        asked = [n for n in self.objects.seen if n.startswith("records/")]
        self.assertEqual(len(asked), 1)
        # Another node is fetching it (and renews its lease).
        key_hash = asked[0][len("records/"):-len(".json")]
        lease = f"leases/keys/{key_hash}"
        self.objects.objects[lease] = encode_lease("n2", self.harness.clock.seconds() + 1e6)
        for _ in range(149):
            self.harness.later(0.1)
        self.assertEqual(self.harness.origin.count("/a.pkg"), 1, "not fetched within 14.9 s")
        self.assertNotEqual(client.transport.value(), b"", "no byte within 14.9 s")

    def test_stale_verdict_deletes_a_newer_record(self) -> None:
        """
        DEFECT (records): a node whose own knowledge is older (its index
        page, cached for --index-ttl, still lists the previous sha256)
        judges the *current* signed record STALE and deletes it; every
        node that then misses goes upstream, and two nodes with
        differently aged indexes delete each other's records in turn.
        The request's expectation says only that this record is not for
        *it*; the record should be left (publishing a verified body
        overwrites it anyway).
        """
        key = "pypi:files/a-1.whl"
        self.objects.objects[record_name(key)] = encode_record(Record(
            key=key, sha256="1" * 64, size=5, headers={}, source_digest=None,
            stored_at=self.harness.clock.seconds(), node="n2",
        ), self.tier.secret)
        got = self.tier.before_upstream(request(key=key, expected_sha256="2" * 64))
        self.harness.later(0)
        self.assertTrue(got.called)
        self.assertIn(record_name(key), self.objects.objects)
