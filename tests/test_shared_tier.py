"""
:class:`buildcache.shared.tier.S3Tier` with an in-memory store and a
memory clock: which requests share, copies from trusted records only,
stale and forged records, the lease and the bounded wait on another
node's, publishing, health, and that no presigned URL reaches a log.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from buildcache.fetch.shared import CopyFault, SharedCopy
from buildcache.shared.leases import Lease, encode_lease
from buildcache.shared.location import S3Location
from buildcache.shared.records import (
    Record,
    blob_name,
    encode_record,
    lease_name,
    record_name,
)
from buildcache.shared.tier import S3Tier
from tests.shared_memory import FileStore, MemoryObjects
from tests.test_shared_units import request, result

BODY = b"the wheel's bytes" * 100
SHA = hashlib.sha256(BODY).hexdigest()
KEY = "pypi:files/a-1.whl"


class TierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.objects = MemoryObjects()
        self.files = FileStore(self.mktemp())
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def tier(self, secret: bytes | None = b"s3cret", **changes: Any) -> S3Tier:
        tier = S3Tier(
            objects=self.objects, location=S3Location("bkt", "p/", "http://127.0.0.1:1"),
            store=self.files, clock=self.clock, node="n1", secret=secret, **changes,
        )
        tier.conditional = True
        return tier

    def put_record(self, secret: bytes | None = b"s3cret", **changes: Any) -> None:
        fields: dict[str, Any] = {
            "key": KEY, "sha256": SHA, "size": len(BODY),
            "headers": {"content-type": "application/zip"}, "source_digest": None,
            "stored_at": 900.0, "node": "n2",
        }
        fields.update(changes)
        self.objects.objects[record_name(KEY)] = encode_record(Record(**fields), secret)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def test_shares(self) -> None:
        signed, unsigned = self.tier(), self.tier(secret=None)
        self.assertTrue(signed.shares(request()))
        self.assertFalse(signed.shares(request(shared=False)))
        # Without a secret only a request with a check of its own.
        self.assertFalse(unsigned.shares(request()))
        self.assertTrue(unsigned.shares(request(expected_sha256=SHA)))

    def test_copy_from_signed_record(self) -> None:
        self.put_record()
        tier = self.tier()
        copy = result(tier.before_upstream(request()))
        self.assertIsInstance(copy, SharedCopy)
        self.assertEqual((copy.name, copy.size, copy.sha256), (blob_name(SHA), len(BODY), SHA))
        self.assertEqual(dict(copy.headers), {"content-type": "application/zip"})
        self.assertIn(blob_name(SHA), copy.url)
        self.assertNotIn("secretsignature", repr(copy))
        # One GET of the record; no lease taken.
        self.assertEqual(self.objects.requests, [("GET", record_name(KEY))])
        tier.copy_served(request(), copy)
        self.assertEqual((tier.status().hits, tier.status().hit_bytes), (1, len(BODY)))

    def test_forged_record_refused(self) -> None:
        self.put_record(secret=b"not ours")
        tier = self.tier()
        got = result(tier.before_upstream(request()))
        # Refused, and this node fetches it upstream under a lease.
        self.assertIsInstance(got, Lease)
        self.assertEqual(tier.status().rejected, 1)
        [event] = self.named("shared_record_rejected")
        self.assertEqual(event["why"], "bad signature")
        # The likeliest cause is named: another secret on one node.
        self.assertIn("--shared-secret-file the same file on every node", event["hint"])
        got.release()

    def test_unsigned_record_with_independent_check(self) -> None:
        self.put_record(secret=None)
        tier = self.tier(secret=None)
        copy = result(tier.before_upstream(request(expected_sha256=SHA)))
        self.assertIsInstance(copy, SharedCopy)
        # Not shared at all without the check: nothing asked.
        self.assertIsNone(result(tier.before_upstream(request())))
        self.assertEqual(self.objects.count("GET"), 1)

    def test_stale_record_not_used_and_republished_over(self) -> None:
        """
        A record for another version is not used, nor deleted (it may be
        the newer one, for nodes whose index is newer); the body fetched
        upstream is published over it.
        """
        self.put_record(source_digest="Q1old")
        tier = self.tier()
        req = request(source_digest="Q1new")
        lease = result(tier.before_upstream(req))
        self.assertIsInstance(lease, Lease)
        self.assertIn(record_name(KEY), self.objects.objects)
        self.assertEqual(len(self.named("shared_record_stale")), 1)
        # The rebuilt body fetched upstream is published in its place.
        new_body = b"rebuilt" * 50
        entry = self.files.add(KEY, new_body, {"content-type": "application/zip"}, "Q1new")
        tier.publish(req, entry, lease)
        new_sha = hashlib.sha256(new_body).hexdigest()
        self.assertEqual(self.objects.objects[blob_name(new_sha)], new_body)
        written = json.loads(self.objects.objects[record_name(KEY)])
        self.assertEqual((written["sha256"], written["source_digest"]), (new_sha, "Q1new"))
        self.assertNotIn(lease_name(KEY), self.objects.objects)
        self.assertEqual(tier.status().uploads, 1)

    def test_publish(self) -> None:
        tier = self.tier()
        lease = result(tier.before_upstream(request()))
        self.assertEqual(
            json.loads(self.objects.objects[lease_name(KEY)])["node"], "n1"
        )
        entry = self.files.add(KEY, BODY, {
            "content-type": "application/zip", "etag": '"x"', "x-private": "no",
        })
        tier.publish(request(), entry, lease)
        self.assertEqual(self.objects.objects[blob_name(SHA)], BODY)
        record = json.loads(self.objects.objects[record_name(KEY)])
        self.assertEqual(record["headers"], {"content-type": "application/zip", "etag": '"x"'})
        self.assertEqual((record["key"], record["sha256"], record["size"]), (KEY, SHA, len(BODY)))
        self.assertRegex(record["mac"], "^[0-9a-f]{64}$")
        self.assertNotIn(lease_name(KEY), self.objects.objects)
        status = tier.status()
        self.assertEqual((status.uploads, status.upload_bytes, status.upload_failures),
                         (1, len(BODY), 0))
        # Another key with the same body: the blob is not sent again.
        other = request(key="pypi:files/copy.whl")
        tier.publish(other, self.files.add("pypi:files/copy.whl", BODY), None)
        self.assertEqual(self.objects.count("PUT", "blobs/"), 1)
        self.assertIn(record_name("pypi:files/copy.whl"), self.objects.objects)

    def test_not_published(self) -> None:
        tier = self.tier()
        lease = result(tier.before_upstream(request()))
        variant = self.files.add(KEY + "#gzip", BODY)
        tier.publish(request(), variant, lease)
        tier.publish(request(), self.files.add(KEY, BODY, {"vary": "accept"}), None)
        self.assertEqual(self.objects.count("PUT", "blobs/"), 0)
        self.assertEqual(self.objects.count("PUT", "records/"), 0)
        # The lease was released all the same.
        self.assertNotIn(lease_name(KEY), self.objects.objects)

    def test_corrupt_copy_replaced(self) -> None:
        self.put_record()
        self.objects.objects[blob_name(SHA)] = b"x" * len(BODY)
        tier = self.tier()
        copy = result(tier.before_upstream(request()))
        tier.copy_failed(request(), copy, "sha256 mismatch", CopyFault.CORRUPT)
        self.assertEqual(tier.status().rejected, 1)
        # Same size as the good one: replaced all the same.
        tier.publish(request(), self.files.add(KEY, BODY), None)
        self.assertEqual(self.objects.objects[blob_name(SHA)], BODY)
        [event] = self.named("shared_blob_to_replace")
        self.assertEqual(event["name"], blob_name(SHA))

    def test_waits_for_the_holder(self) -> None:
        self.objects.objects[lease_name(KEY)] = encode_lease("n2", 1030.0)
        tier = self.tier()
        waiting = tier.before_upstream(request())
        self.assertNoResult(waiting)
        self.clock.advance(0.2)
        self.clock.advance(0.4)
        self.assertNoResult(waiting)
        # n2 publishes.
        self.put_record()
        self.clock.advance(0.8)
        copy = self.successResultOf(waiting)
        self.assertIsInstance(copy, SharedCopy)
        self.assertEqual((tier.status().lease_waits, tier.status().lease_timeouts), (1, 0))
        # Polls of the record: 0.2, 0.6, 1.4 s (once at the start).
        self.assertEqual(self.objects.count("GET", "records/"), 4)

    def test_wait_is_bounded(self) -> None:
        self.objects.objects[lease_name(KEY)] = encode_lease("n2", 5000.0)
        tier = self.tier(wait=5.0)
        waiting = tier.before_upstream(request())
        for _ in range(20):
            self.clock.advance(1)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual((tier.status().lease_waits, tier.status().lease_timeouts), (1, 1))
        # The holder's lease is not touched.
        self.assertEqual(self.objects.count("DELETE"), 0)

    def test_holder_dies(self) -> None:
        self.objects.objects[lease_name(KEY)] = encode_lease("n2", 1003.0)
        tier = self.tier()
        waiting = tier.before_upstream(request())
        for _ in range(5):
            self.clock.advance(1)
        lease = self.successResultOf(waiting)
        assert isinstance(lease, Lease)
        self.assertEqual(json.loads(self.objects.objects[lease_name(KEY)])["node"], "n1")
        lease.release()

    def test_own_lease_from_an_earlier_run(self) -> None:
        self.objects.objects[lease_name(KEY)] = encode_lease("n2", 5000.0)
        tier = self.tier()
        waiting = tier.before_upstream(request())
        # n2 ends; this node (n1) restarted with a lease of its own left.
        self.objects.objects[lease_name(KEY)] = encode_lease("n1", 5000.0)
        self.clock.advance(0.2)
        lease = self.successResultOf(waiting)
        assert isinstance(lease, Lease)
        lease.release()

    def test_holder_gives_up(self) -> None:
        self.objects.objects[lease_name(KEY)] = encode_lease("n2", 5000.0)
        tier = self.tier()
        waiting = tier.before_upstream(request())
        self.clock.advance(0.2)
        # n2's download failed: it deleted its lease.
        del self.objects.objects[lease_name(KEY)]
        self.clock.advance(0.4)
        self.assertIsInstance(self.successResultOf(waiting), Lease)

    def test_no_leases_without_conditional_put(self) -> None:
        tier = self.tier()
        tier.conditional = False
        self.assertIsNone(result(tier.before_upstream(request())))
        self.assertEqual(self.objects.requests, [("GET", record_name(KEY))])

    def test_health(self) -> None:
        tier = self.tier()
        self.objects.failing = "ConnectionRefusedError"
        self.assertIsNone(result(tier.before_upstream(request())))
        status = tier.status()
        self.assertFalse(status.healthy)
        self.assertEqual(status.failing_since, 1000.0)
        self.assertIn("ConnectionRefusedError", status.last_error or "")
        # For 30 s: no request, uploads skipped (counted).
        sent = len(self.objects.requests)
        self.clock.advance(10)
        self.assertIsNone(result(tier.before_upstream(request())))
        tier.publish(request(), self.files.add(KEY, BODY), None)
        self.assertEqual(len(self.objects.requests), sent)
        self.assertEqual(tier.status().upload_failures, 1)
        self.clock.advance(20)
        self.objects.failing = None
        lease = result(tier.before_upstream(request()))
        self.assertIsInstance(lease, Lease)
        self.assertTrue(tier.status().healthy)
        self.assertEqual(len(self.named("shared_store_failing")), 1)
        self.assertEqual(len(self.named("shared_store_recovered")), 1)
        lease.release()

    def test_start_probes_and_stop_releases(self) -> None:
        tier = self.tier()
        tier.conditional = None
        tier.start()
        self.assertIs(tier.conditional, True)
        [event] = self.named("shared_store_conditional")
        self.assertIs(event["honoured"], True)
        lease = result(tier.before_upstream(request()))
        self.assertIsInstance(lease, Lease)
        result(tier.stop())
        self.assertNotIn(lease_name(KEY), self.objects.objects)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Stopped: no more requests.
        sent = len(self.objects.requests)
        self.assertIsNone(result(tier.before_upstream(request())))
        self.assertEqual(len(self.objects.requests), sent)

    def test_probe_retried_when_down(self) -> None:
        self.objects.failing = "HTTP 503"
        tier = self.tier()
        tier.conditional = None
        tier.start()
        self.assertIsNone(tier.conditional)
        self.objects.failing = None
        self.clock.advance(30)
        self.assertIs(tier.conditional, True)
        result(tier.stop())

    def test_no_url_in_events(self) -> None:
        self.put_record()
        tier = self.tier()
        copy = result(tier.before_upstream(request()))
        tier.copy_failed(request(), copy, "cut short", CopyFault.STORE)
        tier.copy_served(request(), copy)
        self.objects.failing = "HTTP 500"
        tier.publish(request(), self.files.add(KEY, BODY), None)
        self.assertTrue(len(self.events) > 0)
        for event in self.events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn("secretsignature", text)
            self.assertNotIn("X-Amz", text)
            self.assertNotIn("s3cret", text)
        self.assertNotIn("s3cret", repr(tier))

    def test_a_disk_hit_is_an_access_of_its_blob(self) -> None:
        """
        A shared file served from a node's own disk counts as a use of its
        blob in the bucket's LRU: an access batch names it.
        """
        from buildcache.shared.access import AccessLog
        from buildcache.store import Entry

        access = AccessLog(self.objects, self.clock, "n1")
        tier = self.tier(access=access)
        tier.used(Entry(KEY, len(BODY), {}, SHA, 1.0, 1.0, 1.0))
        result(access.flush())
        [batch] = [
            json.loads(data) for name, data in self.objects.objects.items()
            if name.startswith("access/n1/")
        ]
        [[sha, record, size, _]] = batch["entries"]
        self.assertEqual((sha, record, size), (SHA, record_name(KEY), len(BODY)))

    def test_only_a_corrupt_copy_is_replaced(self) -> None:
        """
        A copy missing from the store, or one this node's disk refused, is
        not counted against the copy nor re-uploaded over a good blob; a
        store that failed to deliver it marks the store failing.
        """
        self.put_record()
        self.objects.objects[blob_name(SHA)] = BODY
        tier = self.tier()
        copy = result(tier.before_upstream(request()))
        tier.copy_failed(request(), copy, "disk full", CopyFault.LOCAL)
        tier.copy_failed(request(), copy, "404", CopyFault.MISSING)
        self.assertEqual(tier.status().rejected, 0)
        self.assertEqual(self.named("shared_blob_to_replace"), [])
        tier.publish(request(), self.files.add(KEY, BODY), None)
        self.assertEqual(self.objects.count("PUT", "blobs/"), 0)
        self.assertTrue(tier.status().healthy)
        tier.copy_failed(request(), copy, "timed out", CopyFault.STORE)
        self.assertFalse(tier.status().healthy)
