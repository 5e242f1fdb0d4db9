"""
The shared tier against a real S3 store (SeaweedFS, :mod:`tests.seaweed_parts`)
under real fetchers: two nodes with their own disks and one bucket, an
origin on 127.0.0.1 that counts requests.  Node B serves what node A
fetched without asking the origin; of two nodes asking at once one
fetches; a corrupt blob is caught by its digest, never served, replaced;
no presigned URL reaches a log event.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from attrs import define
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from buildcache.fetch.client import upstream_client
from buildcache.fetch.fetcher import Fetcher
from buildcache.fetch.reader import DownloadBody
from buildcache.fetch.request import UpstreamAnswer, UpstreamRequest
from buildcache.shared import S3Location, S3Tier, make_tier
from buildcache.shared.records import blob_name, record_name
from buildcache.store import Store
from tests.seaweed_parts import SeaweedCase
from tests.support import FakeUpstream, GatedBody, listen, pattern_bytes, url_of
from tests.test_shared_s3 import with_credentials

reactor: Any = _reactor

BODY = pattern_bytes(2 * 1024 * 1024 + 5, b"wheel")
SHA = hashlib.sha256(BODY).hexdigest()
PATH = "/files/pkg-1.0-py3-none-any.whl"
KEY = "pypi:files/pkg-1.0-py3-none-any.whl"
SECRET = b"shared between the nodes"


def read_all(body: DownloadBody) -> bytes:
    data = body.read(0, body.available())
    body.close()
    return data


@define
class Node:
    store: Store
    fetcher: Fetcher
    tier: S3Tier


class SharedStoreTests(SeaweedCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        with_credentials(self)
        self.bucket_name = self.bucket()
        self.location = S3Location(self.bucket_name, "cache/", self.store.endpoint)
        self.origin = FakeUpstream()
        self.origin.bodies[PATH] = GatedBody(BODY, headers={"content-type": "application/zip"})
        port = listen(self.origin)
        self.addCleanup(port.stopListening)
        self.url = url_of(port, PATH)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def node(self, name: str, wait: float = 15.0) -> Node:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        http = upstream_client(Agent(reactor, pool=pool))
        store = Store.open(self.mktemp(), 1 << 30, reactor)
        self.addCleanup(store.close)
        tier = make_tier(
            self.location, secret=SECRET, max_size=None, wait=wait, http=http,
            store=store, clock=reactor, node=name,
        )
        fetcher = Fetcher(store, http, reactor, shared=tier)
        self.addCleanup(tier.stop)
        return Node(store, fetcher, tier)

    def request(self) -> UpstreamRequest:
        return UpstreamRequest(key=KEY, url=self.url, shared=True)

    async def fetch(self, node: Node) -> UpstreamAnswer:
        answer = await node.fetcher.fetch(self.request())
        assert answer.body is not None
        await node.fetcher.when_idle()
        await node.tier.when_idle()
        return answer

    async def started(self, *nodes: Node) -> None:
        for node in nodes:
            node.tier.start()
        # The probe: a few requests; wait for its answer.
        while any(node.tier.conditional is None for node in nodes):
            await Deferred.fromCoroutine(_tick())

    def test_second_node_served_from_the_bucket(self) -> Deferred[None]:
        a, b = self.node("node-a"), self.node("node-b")

        async def go() -> None:
            await self.started(a, b)
            self.assertIs(a.tier.conditional, True)
            first = await self.fetch(a)
            assert first.body is not None
            self.assertFalse(first.shared)
            self.assertEqual(read_all(first.body), BODY)
            self.assertEqual(self.origin.requests[PATH], 1)
            # In the bucket: the blob and a signed record.
            blob = self.store.get_object(self.bucket_name, "cache/" + blob_name(SHA))
            self.assertEqual(blob, BODY)
            raw = self.store.get_object(self.bucket_name, "cache/" + record_name(KEY))
            assert raw is not None
            record = json.loads(raw)
            self.assertEqual((record["sha256"], record["node"]), (SHA, "node-a"))
            self.assertEqual(record["headers"]["content-type"], "application/zip")
            self.assertIn("mac", record)
            self.assertEqual(a.tier.status().uploads, 1)
            self.assertEqual(
                self.store.list_keys(self.bucket_name, "cache/leases/"), []
            )

            second = await self.fetch(b)
            assert second.body is not None
            self.assertTrue(second.shared)
            self.assertEqual(read_all(second.body), BODY)
            self.assertEqual(self.origin.requests[PATH], 1)
            entry = b.store.peek(KEY)
            assert entry is not None
            self.assertEqual((entry.sha256, entry.headers["content-type"]), (SHA, "application/zip"))
            self.assertEqual((b.tier.status().hits, b.tier.status().hit_bytes), (1, len(BODY)))
            self.no_url_logged()

        return Deferred.fromCoroutine(go())

    def test_one_download_across_nodes(self) -> Deferred[None]:
        a, b = self.node("node-a"), self.node("node-b")
        gate: Deferred[None] = Deferred()
        self.origin.bodies[PATH] = GatedBody(
            BODY, headers={"content-type": "application/zip"}, before_gate=1000, gate=gate
        )

        async def go() -> None:
            await self.started(a, b)
            fetching_a = Deferred.fromCoroutine(self.fetch(a))
            # a holds the lease (the origin has its request) before b asks.
            while self.origin.requests[PATH] == 0:
                await Deferred.fromCoroutine(_tick())
            fetching_b = Deferred.fromCoroutine(self.fetch(b))
            while b.tier.status().lease_waits == 0:
                await Deferred.fromCoroutine(_tick())
            gate.callback(None)
            answers = await gatherResults([fetching_a, fetching_b])
            self.assertEqual([answer.shared for answer in answers], [False, True])
            for answer in answers:
                assert answer.body is not None
                self.assertEqual(read_all(answer.body), BODY)
            self.assertEqual(self.origin.requests[PATH], 1)
            self.assertEqual(b.tier.status().lease_timeouts, 0)

        return Deferred.fromCoroutine(go())

    def test_corrupt_blob_caught_and_replaced(self) -> Deferred[None]:
        a, b = self.node("node-a"), self.node("node-b")

        async def go() -> None:
            await self.started(a, b)
            first = await self.fetch(a)
            assert first.body is not None
            read_all(first.body)
            # Someone with write access flips the blob's bytes (same size).
            corrupt = bytes(x ^ 0xFF for x in BODY[:100]) + BODY[100:]
            self.store.put_object(self.bucket_name, "cache/" + blob_name(SHA), corrupt)
            second = await self.fetch(b)
            assert second.body is not None
            # Served from the origin, whole and right; never the corrupt copy.
            self.assertFalse(second.shared)
            self.assertEqual(read_all(second.body), BODY)
            self.assertEqual(self.origin.requests[PATH], 2)
            self.assertEqual(b.tier.status().rejected, 1)
            self.assertEqual(
                len([e for e in self.events if e.get("event") == "shared_copy_failed"]), 1
            )
            # ... and replaced in the bucket.
            blob = self.store.get_object(self.bucket_name, "cache/" + blob_name(SHA))
            self.assertEqual(blob, BODY)
            self.assertEqual(b.tier.status().uploads, 1)
            self.no_url_logged()

        return Deferred.fromCoroutine(go())

    def test_store_killed_mid_upload(self) -> Deferred[None]:
        a, b = self.node("node-a"), self.node("node-b")
        real_pread = os.pread
        killed: list[int] = []

        def pread(fd: int, count: int, offset: int) -> bytes:
            # The store dies once the upload is under way.
            if offset >= 512 * 1024 and not killed:
                killed.append(offset)
                self.store.kill_now()
            return real_pread(fd, count, offset)

        async def go() -> None:
            await self.started(a, b)
            self.patch(os, "pread", pread)
            first = await self.fetch(a)
            assert first.body is not None
            # The client got it all from the origin, no error.
            self.assertEqual(read_all(first.body), BODY)
            self.assertEqual(len(killed), 1)
            status = a.tier.status()
            self.assertEqual((status.uploads, status.upload_failures), (0, 1))
            self.assertFalse(status.healthy)
            self.assertEqual(
                len([e for e in self.events if e.get("event") == "shared_store_failing"]), 1
            )
            # Down: node b is served from the origin at once.
            second = await self.fetch(b)
            assert second.body is not None
            self.assertEqual(read_all(second.body), BODY)
            self.assertEqual(self.origin.requests[PATH], 2)
            self.assertFalse(b.tier.status().healthy)
            await self.store.start()
            # No record of a blob that never arrived whole.
            self.assertIsNone(
                self.store.get_object(self.bucket_name, "cache/" + record_name(KEY))
            )
            self.no_url_logged()

        return Deferred.fromCoroutine(go())

    def test_slow_store_costs_a_miss(self) -> Deferred[None]:
        # A store that takes the connection and never answers.
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        self.location = S3Location(
            "bucket", "", f"http://127.0.0.1:{silent.getHost().port}"
        )
        a = self.node("node-a")
        a.tier.conditional = True

        async def go() -> None:
            answer = await self.fetch(a)
            assert answer.body is not None
            self.assertEqual(read_all(answer.body), BODY)
            status = a.tier.status()
            self.assertFalse(status.healthy)
            self.assertIn("timed out", status.last_error or "")
            # Skipped while unhealthy, publication included.
            self.assertEqual(status.upload_failures, 1)

        return Deferred.fromCoroutine(go())

    def no_url_logged(self) -> None:
        self.assertTrue(len(self.events) > 0)
        for event in self.events:
            text = formatEvent(event) + repr(event)
            for secret in ("X-Amz-Signature", "X-Amz-Credential", "buildcache-test-key",
                           "buildcache-test-secret", SECRET.decode()):
                self.assertNotIn(secret, text)


async def _tick() -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.05, lambda: None)
