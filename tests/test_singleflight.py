"""
Single flight and streaming through the running proxy: one upstream
request for many concurrent clients, bytes delivered as they arrive, and
failures that no client can mistake for a complete file.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from buildcache.store import in_thread_pool
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    pattern_bytes,
    reactor,
    start_server,
)

MB = 1024 * 1024


class SingleFlightTests(TestCase):
    async def _concurrent(self, clients: int, size: int) -> None:
        data = pattern_bytes(size, b"sf")
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies["/big.bin"] = GatedBody(
            data, before_gate=MB, gate=gate, headers={"cache-control": "max-age=3600"}
        )
        # As in the server: the fsync and rename run in the reactor's
        # thread pool while clients are being answered.
        running = start_server(
            self, upstream=upstream,
            run_blocking=in_thread_pool(reactor, reactor.getThreadPool()),
        )
        url = f"http://127.0.0.1:{running.proxy_port}/up/big.bin"
        firsts = [Deferred() for _ in range(clients)]
        client = Client()
        results = [
            Deferred.fromCoroutine(client.get(url, first_bytes=first))
            for first in firsts
        ]
        # Every client has bytes while the upstream is still held at the
        # gate, i.e. before it has finished sending.
        await gatherResults(firsts)
        self.assertEqual(upstream.sent_everything, {})
        gate.callback(None)
        received = await gatherResults(results)
        expected = hashlib.sha256(data).hexdigest()
        self.assertEqual(upstream.requests["/big.bin"], 1)
        for r in received:
            self.assertEqual((r.status, r.complete, len(r.body)), (200, True, size))
            self.assertEqual(r.sha256, expected)
        self.assertEqual(
            sorted(r.header("x-cache") for r in received), ["MISS"] * clients
        )
        # Once the download has been committed, the next request is a hit.
        await running.server.fetcher.when_idle()
        again = await client.get(url)
        self.assertEqual(again.header("x-cache"), "HIT")
        self.assertEqual(again.sha256, expected)
        self.assertEqual(upstream.requests["/big.bin"], 1)
        self.assertEqual(running.store.stats().entries, 1)

    async def test_twenty_clients_one_upstream_request(self) -> None:
        """
        20 concurrent clients of one missing 20 MB object: exactly one
        upstream request, 20 identical complete bodies, first bytes before
        the upstream finished.
        """
        await self._concurrent(20, 20 * MB)

    async def test_upstream_closes_half_way(self) -> None:
        """
        An upstream that closes at 50% leaves no entry and every client
        (waiting or streaming) sees an incomplete response.
        """
        size = 4 * MB
        upstream = FakeUpstream()
        upstream.bodies["/half.bin"] = GatedBody(
            pattern_bytes(size, b"half"), cut_at=size // 2
        )
        running = start_server(self, upstream=upstream)
        url = f"http://127.0.0.1:{running.proxy_port}/up/half.bin"
        client = Client()
        received = await gatherResults(
            [Deferred.fromCoroutine(client.get(url)) for _ in range(5)]
        )
        self.assertEqual(upstream.requests["/half.bin"], 1)
        for r in received:
            # Either the failure arrived before the headers (502) or during
            # the body (short read); never a complete 200.
            self.assertFalse(r.status == 200 and r.complete, r)
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])
        objects = os.path.join(running.store.directory, "objects")
        self.assertEqual(
            [f for _, _, files in os.walk(objects) for f in files], []
        )

    async def test_streaming_client_sees_error(self) -> None:
        """
        A client already streaming when the upstream dies gets a response
        its HTTP library reports as incomplete.
        """
        size = 2 * MB
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        body = GatedBody(pattern_bytes(size, b"s"), before_gate=MB, gate=gate)
        upstream.bodies["/s.bin"] = body
        running = start_server(self, upstream=upstream)
        url = f"http://127.0.0.1:{running.proxy_port}/up/s.bin"
        first: Deferred[None] = Deferred()
        result = Deferred.fromCoroutine(Client().get(url, first_bytes=first))
        await first
        # Cut the upstream connection while the gate holds the rest.
        upstream.active[0].channel.transport.abortConnection()
        received = await result
        self.assertEqual(received.status, 200)
        self.assertFalse(received.complete)
        self.assertLess(len(received.body), size)
        self.assertEqual(running.store.stats().entries, 0)



class JoinTests(TestCase):
    timeout = 10

    async def test_credentials_are_not_shared(self) -> None:
        """
        A client without credentials asking while another client's
        authenticated download of the same URL runs gets its own upstream
        request, never the other's answer.  (Joined, the second request
        would never reach the upstream, and the test times out.)
        """
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies["/private.bin"] = GatedBody(
            pattern_bytes(200_000, b"p"), before_gate=1000, gate=gate
        )
        second_arrived: Deferred[None] = Deferred()
        render = upstream.render

        def counting_render(request: Any) -> object:
            result = render(request)
            if upstream.requests["/private.bin"] == 2:
                second_arrived.callback(None)
            return result

        upstream.render = counting_render  # type: ignore[method-assign]
        running = start_server(self, upstream=upstream)
        url = f"http://127.0.0.1:{running.proxy_port}/up/private.bin"
        client = Client()
        first: Deferred[None] = Deferred()
        with_credentials = Deferred.fromCoroutine(
            client.get(url, {"authorization": "Basic dXNlcjpwYXNz"}, first_bytes=first)
        )
        await first
        without = Deferred.fromCoroutine(client.get(url))
        await second_arrived
        gate.callback(None)
        received = await gatherResults([with_credentials, without])
        self.assertEqual([r.status for r in received], [200, 200])
        self.assertEqual(
            [h.getRawHeaders("authorization") for h in upstream.seen_headers],
            [["Basic dXNlcjpwYXNz"], None],
        )
