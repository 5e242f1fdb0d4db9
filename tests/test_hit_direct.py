"""
A cheaper hit (issue 16): a stored body goes straight to the client's
socket (``send`` for the head, ``sendfile`` for the body) when Twisted
holds nothing for it, and the ordinary producer path takes over for what
the socket does not take at once.  These tests hold the two paths to the
same bytes, ranges, HEAD, 304 and the send-stall timeout; and a rendered
index page, sent with its head at once, to what Twisted would write.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel, Request

from buildcache.ecosystems.pypi import index as index_module
from buildcache.engine import body as body_module
from buildcache.engine import respond
from buildcache.engine.body import response_head
from tests.pyindex import StaticSimpleIndex
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Running,
    pattern_bytes,
    start_server,
)
from tests.test_faults import raw_client
from tests.test_proxy import RawConnection, raw_connection, raw_request, until
from tests.test_simple_index import PIP_ACCEPT, Harness, fixture_for

SMALL = "/files/small-1.0-r0.apk"
LARGE = "/files/large-1.0-r0.apk"
HUGE = "/files/huge-1.0-r0.apk"
MB = 1024 * 1024
SIZES = {SMALL: 20 * 1024, LARGE: 1 * MB, HUGE: 32 * MB}


async def whole_response(connection: RawConnection, request: bytes, head: bool = False) -> bytes:
    """
    The raw bytes (head and body) of the answer to ``request``, sent on
    ``connection``.
    """
    connection.send(request)
    await connection._until(lambda: b"\r\n\r\n" in connection.buffer)
    head_end = connection.buffer.index(b"\r\n\r\n") + 4
    found = re.search(rb"\r\nContent-Length: (\d+)\r\n", connection.buffer[:head_end])
    length = 0 if head or found is None else int(found.group(1))
    await connection._until(lambda: len(connection.buffer) >= head_end + length)
    raw, connection.buffer = (
        connection.buffer[: head_end + length], connection.buffer[head_end + length :]
    )
    return raw


def without_date(raw: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", raw)


class DirectPathTests(TestCase):
    """
    Stored answers over real TCP, sent directly and the ordinary way.
    """

    timeout = 60

    def setUp(self) -> None:
        upstream = FakeUpstream()
        for path, size in SIZES.items():
            upstream.bodies[path] = GatedBody(
                pattern_bytes(size, path.encode()),
                headers={"ETag": '"v1"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"},
            )
        self.upstream = upstream
        self.running: Running = start_server(self, {}, upstream=upstream)
        #: What send_now returned, per call.
        self.reached: list[tuple[int, int | None]] = []
        real = body_module.send_now

        def spy(
            request: Any, source: Any, start: int, end: int, head: bytes | None = None,
        ) -> int | None:
            reached = real(request, source, start, end, head=head)
            self.reached.append((end, reached))
            return reached

        self.spy = spy
        self.patch(respond, "send_now", spy)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.running.proxy_port}/up{path}"

    async def stored(self, path: str) -> None:
        client = Client()
        first = await client.get(self.url(path))
        self.assertEqual(first.status, 200)
        for _ in range(200):
            again = await client.get(self.url(path))
            if again.header("x-cache") == "HIT":
                return
        self.fail(f"{path} never became a hit")

    def ordinary_only(self) -> None:
        self.patch(respond, "send_now", lambda *args, **kwargs: None)

    async def answers(self, requests: list[tuple[bytes, bool]]) -> list[bytes]:
        connection = await raw_connection(self, self.running.proxy_port)
        return [
            without_date(await whole_response(connection, request, head))
            for request, head in requests
        ]

    def requests(self, path: str) -> list[tuple[bytes, bool]]:
        target = f"/up{path}"
        return [
            (raw_request("GET", target, "box"), False),
            (raw_request("GET", target, "box", [("Range", "bytes=100-4195")]), False),
            (raw_request("GET", target, "box", [("Range", "bytes=-10")]), False),
            (raw_request("HEAD", target, "box"), True),
            (raw_request("GET", target, "box", [("If-None-Match", '"nope"')]), False),
            (raw_request("GET", target, "box", [("Range", "bytes=999999999-")]), False),
        ]

    async def test_same_bytes_both_paths(self) -> None:
        """
        The whole body, two ranges, HEAD, a failed conditional and an
        unsatisfiable range, for a 20 KB and a 1 MB body, on one kept-alive
        connection: byte for byte the same (the Date aside) whether the
        body went straight to the socket or through Twisted; the direct
        path was taken for every GET of a body.
        """
        for path in (SMALL, LARGE):
            await self.stored(path)
            self.reached.clear()
            direct = await self.answers(self.requests(path))
            self.assertTrue(self.reached)
            self.assertTrue(all(reached is not None for _, reached in self.reached))
            self.ordinary_only()
            ordinary = await self.answers(self.requests(path))
            self.patch(respond, "send_now", self.spy)
            self.assertEqual(direct, ordinary)
            whole = pattern_bytes(SIZES[path], path.encode())
            self.assertTrue(direct[0].endswith(b"\r\n\r\n" + whole))
            self.assertIn(b"\r\nX-Cache: HIT\r\n", direct[0])
            self.assertIn(b"HTTP/1.1 206 Partial Content\r\n", direct[1])
            self.assertIn(b"\r\nContent-Range: bytes 100-4195/%d\r\n" % len(whole), direct[1])
            self.assertTrue(direct[1].endswith(b"\r\n\r\n" + whole[100:4196]))
            self.assertTrue(direct[2].endswith(b"\r\n\r\n" + whole[-10:]))
            self.assertTrue(direct[3].startswith(b"HTTP/1.1 200 OK\r\n"))
            self.assertTrue(direct[3].endswith(b"\r\n\r\n"))
            self.assertIn(b"HTTP/1.1 416 ", direct[5])

    async def test_not_modified(self) -> None:
        """
        A conditional that holds is answered 304 with no body on either
        path, and the connection serves the next request.
        """
        await self.stored(SMALL)
        first = await self.answers([(raw_request("GET", f"/up{SMALL}", "box"), False)])
        self.assertIn(b'\r\nETag: "v1"\r\n', first[0])
        asked = [
            (raw_request("GET", f"/up{SMALL}", "box", [("If-None-Match", '"v1"')]), True),
            (raw_request(
                "GET", f"/up{SMALL}", "box",
                [("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT")],
            ), True),
            (raw_request("GET", f"/up{SMALL}", "box"), False),
        ]
        direct = await self.answers(asked)
        self.ordinary_only()
        ordinary = await self.answers(asked)
        self.assertEqual(direct, ordinary)
        self.assertTrue(direct[0].startswith(b"HTTP/1.1 304 "))
        self.assertTrue(direct[1].startswith(b"HTTP/1.1 304 "))
        self.assertTrue(direct[2].endswith(pattern_bytes(SIZES[SMALL], SMALL.encode())))

    async def test_access_line_counts_body_bytes(self) -> None:
        """
        A hit sent directly is logged with its body's size and HIT, as the
        ordinary path logs it.
        """
        await self.stored(LARGE)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await self.answers([(raw_request("GET", f"/up{LARGE}", "box"), False)])
        await until(lambda: any(e.get("log_system") == "access" for e in events))
        line = [e for e in events if e.get("log_system") == "access"][-1]
        self.assertEqual((line["bytes"], line["cache"], line["status"]), (MB, "HIT", 200))

    async def test_full_socket_waited_for_not_filled_through_python(self) -> None:
        """
        A 32 MB body to a client with a small receive buffer fills its
        socket again and again: each time, the sender waits for room and
        sends on from the file with sendfile; no byte of it is read into
        Python to make Twisted wait (the whole body arrives, the stored
        file is never read).
        """
        await self.stored(HUGE)
        reads: list[int] = []
        waits: list[int] = []
        real_read = body_module.StoredBody.read
        real_wait = body_module.DirectSender.wait_for_room

        def read(source: Any, offset: int, count: int) -> bytes:
            reads.append(count)
            return real_read(source, offset, count)

        def wait_for_room(sender: Any) -> bool:
            waits.append(sender.request.sentLength)
            return real_wait(sender)

        self.patch(body_module.StoredBody, "read", read)
        self.patch(body_module.DirectSender, "wait_for_room", wait_for_room)
        reader = await raw_client(self, self.running.proxy_port, f"/up{HUGE}")
        await reader.answered
        self.assertEqual(reader.body_received, 32 * MB)
        self.assertEqual(
            reader.digest.digest(),
            hashlib.sha256(pattern_bytes(32 * MB, HUGE.encode())).digest(),
        )
        self.assertEqual(reads, [])
        self.assertGreaterEqual(len(waits), 32 * MB // body_module.SENDFILE_MAX)

    async def test_stalled_reader_cut(self) -> None:
        """
        A client that stops reading a stored 32 MB body gets the part its
        socket takes at once straight from the file, the rest the ordinary
        way, and is cut once its socket has taken nothing for the send
        timeout; the body is served whole again afterwards.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await self.stored(HUGE)
        self.running.server.proxy_site.send_stall_timeout = 0.5
        self.reached.clear()
        reader = await raw_client(self, self.running.proxy_port, f"/up{HUGE}")
        reader.stall()
        await until(lambda: any(e.get("event") == "client_stalled" for e in events))
        reader.read_again()
        await reader.lost
        self.assertLess(reader.body_received, 32 * MB)
        [(end, reached)] = self.reached
        assert reached is not None
        self.assertLess(reached, end)
        again = await Client().get(self.url(HUGE))
        self.assertEqual((again.status, again.header("x-cache")), (200, "HIT"))
        self.assertEqual(again.body, pattern_bytes(32 * MB, HUGE.encode()))


def request_on(transport: StringTransport) -> Any:
    channel = HTTPChannel()
    channel.makeConnection(transport)
    request = Request(channel)
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    return request


class ResponseHeadTests(SynchronousTestCase):
    """
    :func:`response_head` against what Twisted itself writes.
    """

    def check(self, prepare: Callable[[Request], None]) -> None:
        twisted_transport = StringTransport()
        ours = request_on(StringTransport())
        theirs = request_on(twisted_transport)
        for request in (ours, theirs):
            prepare(request)
        theirs.write(b"")
        self.assertEqual(response_head(ours), twisted_transport.value())

    def test_ordinary(self) -> None:
        def prepare(request: Request) -> None:
            request.setResponseCode(206)
            request.setHeader("content-type", "application/octet-stream")
            request.setHeader("content-length", "10")
            request.setHeader("x-cache", "HIT")
            request.responseHeaders.addRawHeader(b"vary", b"a")
            request.responseHeaders.addRawHeader(b"vary", b"b")

        self.check(prepare)

    def test_not_taken_over_a_string_transport(self) -> None:
        """
        A transport that is not a TCP connection gets no direct sending.
        """
        request = request_on(StringTransport())
        request.setHeader("content-length", "1")
        self.assertIsNone(body_module.send_now(request, None, 0, 1))  # type: ignore[arg-type]
        self.assertFalse(body_module.send_bytes_now(request, b"x"))


class StoredBlockTests(SynchronousTestCase):
    """
    The per-entry header blocks: what Twisted would hold, bounded, and
    never another entry's.
    """

    def test_block_as_twisted_holds_it(self) -> None:
        block = respond._stored_block(
            {"etag": '"x"', "content-type": "a/b", "date": "no", "x-other": "no"}
        )
        self.assertEqual(block, ((b"ETag", b'"x"'), (b"Content-Type", b"a/b")))

    def test_bounded_and_by_mapping(self) -> None:
        kept = [{"content-type": f"a/{n}"} for n in range(respond.BLOCKS_KEPT + 10)]
        for headers in kept:
            respond._stored_block(headers)
            self.assertLessEqual(len(respond._BLOCKS), respond.BLOCKS_KEPT)
        first = {"content-type": "one"}
        self.assertEqual(respond._stored_block(first), ((b"Content-Type", b"one"),))
        # An equal-looking but different mapping (a revalidated entry's
        # new headers) gets its own block.
        second = {"content-type": "two"}
        self.assertEqual(respond._stored_block(second), ((b"Content-Type", b"two"),))
        self.assertEqual(respond._stored_block(first), ((b"Content-Type", b"one"),))


class PageDirectTests(TestCase):
    """
    A rendered index page goes with its head in one ``send``
    (:func:`~buildcache.engine.body.send_bytes_now`), byte for byte what
    Twisted would have written.
    """

    async def test_same_bytes_both_paths(self) -> None:
        harness = Harness(self, [StaticSimpleIndex(fixture_for(self))])
        self.assertEqual((await harness.page("bcdemo-a")).status, 200)
        taken: list[bool] = []
        real = index_module.send_bytes_now

        def spy(request: Any, body: bytes) -> bool:
            taken.append(real(request, body))
            return taken[-1]

        self.patch(index_module, "send_bytes_now", spy)
        target = "/simple/bcdemo-a/"
        requests = [
            (raw_request("GET", target, "box", [("Accept", PIP_ACCEPT)]), False),
            (raw_request("GET", target, "box", [("Accept", "text/html")]), False),
            (raw_request("HEAD", target, "box", [("Accept", PIP_ACCEPT)]), True),
        ]

        async def answers() -> list[bytes]:
            connection = await raw_connection(self, harness.port.getHost().port)
            return [
                without_date(await whole_response(connection, request, head))
                for request, head in requests
            ]

        direct = await answers()
        self.assertEqual(taken, [True, True])
        self.patch(index_module, "send_bytes_now", lambda request, body: False)
        ordinary = await answers()
        self.assertEqual(direct, ordinary)
        self.assertIn(b'"name":"bcdemo-a"', direct[0].replace(b" ", b""))
        self.assertIn(b"<a href=", direct[1])
