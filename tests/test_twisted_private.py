"""
The few private Twisted attributes buildcache still reads, pinned: setup.cfg
caps Twisted below its next major version, and these tests fail loudly if a
Twisted in that range no longer has them (a silent ``getattr`` default would
turn a renamed attribute into wrong behaviour).

- ``HTTPConnectionPool._factory``: the pool's per-connection factory,
  replaced to keep "Starting factory" lines out of the log
  (``buildcache.fetch.connect``).
- ``HTTPChannel._handlingRequest``: whether a request is being answered
  (``buildcache.frontends.tunnel``: request deadlines, draining on stop).
- ``FileDescriptor._tempDataLen``, ``dataBuffer`` and ``offset``: bytes a
  TCP transport holds unsent (``buildcache.engine.body`` for sendfile,
  ``buildcache.frontends.tunnel`` for the send-stall check).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.support import reactor


class PrivateAttributeTests(SynchronousTestCase):
    def test_pool_factory(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.assertTrue(isinstance(pool._factory, type))

    def test_channel_handling_a_request(self) -> None:
        held: list[Request] = []

        class Hold(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> object:
                held.append(request)
                return NOT_DONE_YET

        # The class buildcache.frontends.tunnel.ProxyChannel extends.
        site = Site(Hold())
        channel = HTTPChannel()
        channel.site = site
        channel.requestFactory = site.requestFactory
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: box\r\n\r\n")
        (request,) = held
        self.assertIs(channel._handlingRequest, True)
        channel.connectionLost(Failure(ConnectionDone()))

    def test_channel_handling_request(self) -> None:
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.assertIs(channel._handlingRequest, False)

    def test_unsent_bytes_of_a_transport(self) -> None:
        transport = FileDescriptor(reactor)
        self.assertEqual(
            (transport._tempDataLen, transport.dataBuffer, transport.offset),
            (0, b"", 0),
        )
        transport.connected = True
        transport.startWriting = lambda: None  # type: ignore[method-assign]
        transport.write(b"x" * 10)
        self.assertEqual(
            transport._tempDataLen + len(transport.dataBuffer) - transport.offset, 10
        )
