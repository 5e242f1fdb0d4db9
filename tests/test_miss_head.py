"""
A cheaper miss (issue 16): an upstream response whose head and first body
bytes arrive in one read reaches Twisted's client parser as the head
alone, then the body, so the parser does not copy the body once per
header line.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from buildcache.fetch.headlimit import HeadMeter, _HeadLimitedFactory


class Recorder(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


def wrapped() -> tuple[Recorder, Any]:
    recorder = Recorder()
    factory = _HeadLimitedFactory(Factory.forProtocol(lambda: recorder))
    wrapper = factory.buildProtocol(None)
    assert wrapper is not None
    wrapper.makeConnection(StringTransport())
    return recorder, wrapper


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: \"x\"\r\n\r\n"


class HeadThenBodyTests(SynchronousTestCase):
    def test_head_and_body_delivered_apart(self) -> None:
        recorder, wrapper = wrapped()
        wrapper.write(b"GET / HTTP/1.1\r\n\r\n")
        body = b"b" * 100_000
        wrapper.dataReceived(HEAD + body)
        self.assertEqual(recorder.chunks, [HEAD, body])
        # Later reads of the body go through whole.
        wrapper.dataReceived(b"c" * 10)
        self.assertEqual(recorder.chunks[-1], b"c" * 10)

    def test_head_alone_or_body_alone_not_split(self) -> None:
        recorder, wrapper = wrapped()
        wrapper.write(b"GET / HTTP/1.1\r\n\r\n")
        wrapper.dataReceived(HEAD)
        wrapper.dataReceived(b"b" * 50)
        self.assertEqual(recorder.chunks, [HEAD, b"b" * 50])

    def test_interim_head_kept_with_final_head(self) -> None:
        recorder, wrapper = wrapped()
        wrapper.write(b"GET / HTTP/1.1\r\n\r\n")
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        wrapper.dataReceived(interim + HEAD + b"body")
        self.assertEqual(recorder.chunks, [interim + HEAD, b"body"])

    def test_meter_says_where_the_head_ended(self) -> None:
        meter = HeadMeter(limit=1000)
        meter.request_sent()
        meter.received(HEAD[:10])
        self.assertIsNone(meter.head_end)
        meter.received(HEAD[10:] + b"xyz")
        self.assertEqual(meter.head_end, len(HEAD) - 10)
        meter.received(b"more")
        self.assertIsNone(meter.head_end)
