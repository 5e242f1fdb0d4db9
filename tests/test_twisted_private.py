"""
The few private Twisted attributes buildcache still reads, pinned: setup.cfg
caps Twisted below its next major version, and these tests fail loudly if a
Twisted in that range no longer has them (a silent ``getattr`` default would
turn a renamed attribute into wrong behaviour).

- ``Request._disconnected``: whether the client has gone
  (``buildcache.engine.respond.client_gone``, ``buildcache.engine.body``).
- ``FileDescriptor._tempDataLen``, ``dataBuffer`` and ``offset``: bytes a
  TCP transport holds unsent (``buildcache.engine.body``, before it hands
  the socket to sendfile).

The front ends' channel reads none: it follows a request's life through
``HTTPChannel``'s public hooks (``allContentReceived``, ``requestDone``)
and a client's progress through its socket (``getHandle``: ``TCP_INFO``,
``SIOCOUTQ``).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.support import reactor


class PrivateAttributeTests(SynchronousTestCase):
    def test_request_disconnected(self) -> None:
        held: list[Request] = []

        class Hold(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> object:
                held.append(request)
                return NOT_DONE_YET

        # The class buildcache.frontends.channel.ProxyChannel extends.
        site = Site(Hold())
        channel = HTTPChannel()
        channel.site = site  # type: ignore[attr-defined]
        channel.requestFactory = site.requestFactory
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: box\r\n\r\n")
        (request,) = held
        self.assertIs(request._disconnected, False)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertIs(request._disconnected, True)

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
