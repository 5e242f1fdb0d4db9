"""
The shared tier's small parts: the ``s3://`` location, the records
(signature, read rules) and the download leases (taking, losing a race,
dead holders, renewal, release, the start-up probe), with an in-memory
store and a memory clock.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.fetch.request import UpstreamRequest
from buildcache.shared.leases import (
    Holder,
    Lease,
    decode_lease,
    encode_lease,
    probe_conditional,
    take_lease,
)
from buildcache.shared.location import S3Location, parse_shared_store
from buildcache.shared.records import (
    Record,
    RecordError,
    Verdict,
    blob_name,
    decode_record,
    encode_record,
    judge,
    lease_name,
    record_name,
)
from buildcache.shared.s3 import ObjectStore, object_store
from tests.shared_memory import MemoryObjects

SHA = "ab" * 32
OTHER = "cd" * 32


def result(d: Deferred[Any] | Any) -> Any:
    """The result of a coroutine or Deferred that has already fired."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class LocationTests(SynchronousTestCase):
    def test_parsed(self) -> None:
        self.assertEqual(
            parse_shared_store("s3://cache-bucket/team/a?endpoint=http://127.0.0.1:8333"),
            S3Location("cache-bucket", "team/a/", "http://127.0.0.1:8333"),
        )
        self.assertEqual(
            parse_shared_store(
                "s3://cache-bucket?endpoint=https://s3.example.test/&region=eu-west-1"
            ),
            S3Location("cache-bucket", "", "https://s3.example.test", "eu-west-1"),
        )

    def test_refused(self) -> None:
        for text, words in [
            ("http://bucket/x?endpoint=http://h", "s3://"),
            ("s3://bucket/x", "endpoint"),
            ("s3://bucket/x?endpoint=ftp://h", "http(s)"),
            ("s3://bucket/x?endpoint=http://h/path", "without a path"),
            ("s3://bucket/x?endpoint=http://h&color=red", "color"),
            ("s3://Bad_Bucket/?endpoint=http://h", "bucket name"),
            ("s3://bucket/a//b?endpoint=http://h", "empty or dot"),
            ("s3://bucket/../b?endpoint=http://h", "empty or dot"),
        ]:
            with self.assertRaises(ValueError) as raised:
                parse_shared_store(text)
            self.assertIn(words, str(raised.exception), text)

    def test_credentials_refused_and_masked(self) -> None:
        for text in [
            "s3://AKIDSECRET:hunter2@bucket/p?endpoint=http://h:1",
            "s3://bucket/p?endpoint=http://AKIDSECRET:hunter2@h:1",
        ]:
            with self.assertRaises(ValueError) as raised:
                parse_shared_store(text)
            message = str(raised.exception)
            self.assertIn("credentials", message)
            self.assertNotIn("hunter2", message)
            self.assertNotIn("AKIDSECRET", message)


def request(**changes: Any) -> UpstreamRequest:
    fields: dict[str, Any] = {"key": "pypi:files/a-1.whl", "url": "http://127.0.0.1:1/a-1.whl",
                              "shared": True}
    fields.update(changes)
    return UpstreamRequest(**fields)


def record(**changes: Any) -> Record:
    fields: dict[str, Any] = {
        "key": "pypi:files/a-1.whl", "sha256": SHA, "size": 10,
        "headers": {"content-type": "application/zip"}, "source_digest": None,
        "stored_at": 1000.0, "node": "n1",
    }
    fields.update(changes)
    return Record(**fields)


class RecordTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertRegex(record_name("k"), r"^records/[0-9a-f]{64}\.json$")
        self.assertRegex(lease_name("k"), r"^leases/keys/[0-9a-f]{64}$")
        self.assertEqual(record_name("k")[8:-5], lease_name("k")[12:])
        self.assertEqual(blob_name(SHA), f"blobs/sha256/{SHA}")

    def test_signed_round_trip(self) -> None:
        data = encode_record(record(), b"s3cret")
        fields = json.loads(data)
        self.assertEqual(fields["v"], 1)
        self.assertRegex(fields["mac"], r"^[0-9a-f]{64}$")
        self.assertEqual(decode_record(data, b"s3cret"), record())
        self.assertEqual(decode_record(data, b"s3cret").headers, {"content-type": "application/zip"})

    def test_signature_checked(self) -> None:
        data = encode_record(record(), b"s3cret")
        with self.assertRaisesRegex(RecordError, "bad signature"):
            decode_record(data, b"another")
        forged = json.loads(data)
        forged["sha256"] = OTHER
        with self.assertRaisesRegex(RecordError, "bad signature"):
            decode_record(json.dumps(forged).encode(), b"s3cret")
        with self.assertRaisesRegex(RecordError, "not signed"):
            decode_record(encode_record(record(), None), b"s3cret")
        # Without a secret the MAC is not needed (nor checked).
        self.assertEqual(decode_record(encode_record(record(), None), None), record())

    def test_malformed(self) -> None:
        for data in [b"not json", b"[]", b'{"v":2}', json.dumps({
            "v": 1, "key": "k", "sha256": "short", "size": 1, "headers": {},
            "source_digest": None, "stored_at": 1, "node": "n",
        }).encode(), json.dumps({
            "v": 1, "key": "k", "sha256": SHA, "size": True, "headers": {},
            "source_digest": None, "stored_at": 1, "node": "n",
        }).encode()]:
            with self.assertRaises(RecordError):
                decode_record(data, None)

    def test_judge(self) -> None:
        self.assertIs(judge(record(), request()), Verdict.USE)
        self.assertIs(judge(record(), request(expected_sha256=SHA.upper())), Verdict.USE)
        self.assertIs(judge(record(key="other"), request()), Verdict.REJECT)
        self.assertIs(judge(record(), request(expected_sha256=OTHER)), Verdict.STALE)
        self.assertIs(judge(record(), request(expected_size=11)), Verdict.STALE)
        self.assertIs(judge(record(source_digest="Q1a"), request(source_digest="Q1b")), Verdict.STALE)
        self.assertIs(judge(record(source_digest="Q1a"), request(source_digest="Q1a")), Verdict.USE)
        # The request knows no version: any record of the key does.
        self.assertIs(judge(record(source_digest="Q1a"), request()), Verdict.USE)


class LeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.objects = MemoryObjects()
        self.name = lease_name("k")

    def take(self, node: str) -> Lease | Holder:
        got: Lease | Holder = result(take_lease(self.objects, self.clock, self.name, node))
        return got

    def holder(self) -> Holder | None:
        data = self.objects.objects.get(self.name)
        return None if data is None else decode_lease(data)

    def test_one_node_wins(self) -> None:
        first = self.take("n1")
        self.assertIsInstance(first, Lease)
        self.assertEqual(self.holder(), Holder("n1", 1030.0))
        second = self.take("n2")
        self.assertEqual(second, Holder("n1", 1030.0))
        self.assertEqual(self.holder(), Holder("n1", 1030.0))

    def test_dead_holder(self) -> None:
        self.objects.objects[self.name] = encode_lease("n1", 999.0)
        taken = self.take("n2")
        self.assertIsInstance(taken, Lease)
        self.assertEqual(self.holder(), Holder("n2", 1030.0))
        self.assertEqual(self.objects.count("DELETE", self.name), 1)

    def test_unreadable_or_own(self) -> None:
        self.objects.objects[self.name] = b"garbage"
        self.assertIsInstance(self.take("n2"), Lease)
        # Left by an earlier run of this same node.
        self.objects.objects[self.name] = encode_lease("n2", 5000.0)
        self.assertIsInstance(self.take("n2"), Lease)

    def test_renewed_until_released(self) -> None:
        lease = self.take("n1")
        assert isinstance(lease, Lease)
        self.clock.advance(10)
        self.assertEqual(self.holder(), Holder("n1", 1040.0))
        self.clock.advance(10)
        self.assertEqual(self.holder(), Holder("n1", 1050.0))
        # Still alive for another node long after the first TTL.
        self.clock.advance(15)
        # (Renewed at 1030, run when the clock read 1035.)
        self.assertEqual(self.take("n2"), Holder("n1", 1065.0))
        lease.release()
        self.assertIsNone(self.holder())
        puts = self.objects.count("PUT")
        self.clock.advance(60)
        self.assertEqual(self.objects.count("PUT"), puts)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lost_lease_is_not_deleted(self) -> None:
        lease = self.take("n1")
        assert isinstance(lease, Lease)
        # n1 could not renew (the store was away): n2 took it over.
        self.objects.objects[self.name] = encode_lease("n2", 2000.0)
        self.clock.advance(10)
        self.assertTrue(lease.lost)
        self.assertEqual(self.holder(), Holder("n2", 2000.0))
        lease.release()
        self.assertEqual(self.holder(), Holder("n2", 2000.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_renewal_failure_retried(self) -> None:
        lease = self.take("n1")
        assert isinstance(lease, Lease)
        self.objects.failing = "HTTP 503"
        self.clock.advance(10)
        self.objects.failing = None
        self.assertEqual(self.holder(), Holder("n1", 1030.0))
        self.clock.advance(10)
        self.assertEqual(self.holder(), Holder("n1", 1050.0))
        lease.release()

    def test_a_dead_node_lease_ends_by_itself(self) -> None:
        lease = self.take("n1")
        assert isinstance(lease, Lease)
        # The node dies: nothing renews it any more.
        lease.released = True
        self.clock.advance(10)
        self.assertEqual(self.take("n2"), Holder("n1", 1030.0))
        self.clock.advance(21)
        self.assertIsInstance(self.take("n2"), Lease)
        self.assertEqual(self.holder(), Holder("n2", 1061.0))

    def test_probe(self) -> None:
        self.assertTrue(result(probe_conditional(self.objects, "n1")))
        self.assertNotIn("probe/n1", self.objects.objects)
        self.assertFalse(result(probe_conditional(MemoryObjects(conditional=False), "n1")))


class CredentialsTests(SynchronousTestCase):
    """
    The AWS credentials are read once, from the standard chain (here the
    environment), and shown nowhere.
    """

    def setUp(self) -> None:
        from tests.test_shared_s3 import with_credentials

        with_credentials(self)
        os.environ["AWS_ACCESS_KEY_ID"] = "AKIDFIRSTKEY"
        os.environ["AWS_SECRET_ACCESS_KEY"] = "first-secret-value"

    def objects(self) -> ObjectStore:
        from twisted.web.client import Agent

        from buildcache.fetch.client import upstream_client

        clock = MemoryReactorClock()
        return object_store(
            S3Location("bkt", "p/", "http://127.0.0.1:1"),
            upstream_client(Agent(clock)), clock,
        )

    def test_resolved_once(self) -> None:
        objects = self.objects()
        os.environ["AWS_ACCESS_KEY_ID"] = "AKIDSECONDKEY"
        url = objects.get_url("blobs/sha256/" + SHA)
        self.assertIn("X-Amz-Credential=AKIDFIRSTKEY", url)
        self.assertIn("/bkt/p/blobs/sha256/" + SHA, url)
        self.assertIn("X-Amz-Signature=", url)

    def test_not_shown(self) -> None:
        objects = self.objects()
        for text in (repr(objects), str(objects)):
            self.assertNotIn("AKIDFIRSTKEY", text)
            self.assertNotIn("first-secret-value", text)

    def test_unsigned_without_credentials(self) -> None:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            del os.environ[name]
        url = self.objects().get_url("records/x.json")
        self.assertNotIn("X-Amz-Signature", url)
        self.assertTrue(url.endswith("/bkt/p/records/x.json"), url)
