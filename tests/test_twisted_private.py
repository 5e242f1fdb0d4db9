"""
The one private Twisted attribute buildcache still reads, pinned: setup.cfg
caps Twisted below its next major version, and this test fails loudly if a
Twisted in that range no longer has it (a silent ``getattr`` default would
turn a renamed attribute into wrong behaviour).

- ``FileDescriptor._tempDataLen``, ``dataBuffer`` and ``offset``: bytes a
  TCP transport holds unsent (``buildcache.engine.body``, before it hands
  the socket to sendfile: bytes still in Twisted's buffer must go first,
  and no public API tells how many there are).

The others are gone: the channel follows a request's life through
``HTTPChannel``'s public hooks (``allContentReceived``, ``requestDone``)
and a client's progress through its socket (``getHandle``: ``TCP_INFO``,
``SIOCOUTQ``); whether a client left is told by ``notifyFinish()``; the
pool's client factories are quietened through ``Factory.noisy``.
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from tests.support import reactor


class PrivateAttributeTests(SynchronousTestCase):
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
