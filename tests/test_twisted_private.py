"""
The one private Twisted attribute buildcache still reads, pinned: setup.cfg
caps Twisted below its next major version, and this test fails loudly if a
Twisted in that range no longer has it (a silent ``getattr`` default would
turn a renamed attribute into wrong behaviour).

- ``FileDescriptor._tempDataLen``, ``dataBuffer`` and ``offset``: bytes a
  TCP transport holds unsent (``buildcache.engine.body``, before it hands
  the socket to sendfile: bytes still in Twisted's buffer must go first,
  and no public API tells how many there are).

And one behaviour of a public method it leans on: a write turn
(``doWrite``) that finds the buffer empty resumes a streaming producer
marked paused (``producerPaused``).  A sendfile that finds the socket full
waits for room that way (``DirectSender.wait_for_room``), with no byte
given to Twisted to make it wait.

The others are gone: the channel follows a request's life through
``HTTPChannel``'s public hooks (``allContentReceived``, ``requestDone``)
and a client's progress through its socket (``getHandle``: ``TCP_INFO``,
``SIOCOUTQ``); whether a client left is told by ``notifyFinish()``; the
pool's client factories are quietened through ``Factory.noisy``.
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

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

    def test_empty_write_turn_resumes_a_paused_producer(self) -> None:
        transport = FileDescriptor(reactor)
        transport.connected = True
        writing: list[bool] = []
        transport.startWriting = lambda: writing.append(True)  # type: ignore[method-assign]
        transport.stopWriting = lambda: writing.append(False)  # type: ignore[method-assign]
        transport.writeSomeData = lambda data: 0  # type: ignore[method-assign]
        producer = _Producer()
        transport.registerProducer(producer, True)
        transport.producerPaused = True
        transport.startWriting()
        transport.doWrite()
        self.assertEqual((writing, producer.resumed, transport.producerPaused), ([True, False], 1, False))


@implementer(IPushProducer)
class _Producer:
    resumed = 0

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass
