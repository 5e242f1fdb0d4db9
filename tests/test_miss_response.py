"""
A cheaper miss (issue 16): a client's response ends as soon as the body
is whole and checked; the fsync, the rename (the store's
``run_blocking``, held here) and the row's commit come after it, and
until they are done a later request finds no entry (it joins the download,
whose body is whole) rather than a partial file.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from buildcache.engine.body import BodySender
from buildcache.fetch.fetcher import Fetcher, upstream_client
from buildcache.fetch.request import UpstreamRequest
from buildcache.store import COMMIT_DELAY, INDEX_NAME, Store
from tests.support import HeldRunner
from tests.test_download import ScriptedAgent

KEY = "http://origin.test/pkg.apk"


class Client(DummyRequest):
    """A request whose producer is only noted (DummyRequest pulls a
    streaming producer in a loop)."""

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
BODY = b"package bytes " * 1000


class ResponseBeforeStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = HeldRunner()
        self.store = Store.open(
            self.mktemp(), 1 << 30, self.clock, run_blocking=self.runner,
            commit_delay=COMMIT_DELAY,
        )
        self.store.spare_temp_files = 0
        self.addCleanup(self.store.close)
        self.agent = ScriptedAgent()
        self.fetcher = Fetcher(self.store, upstream_client(self.agent), self.clock)
        self.fsyncs: list[int] = []

        def counting_fsync(fd: int) -> None:
            self.fsyncs.append(fd)
            os.fsync(fd)

        self.store.sync_file = counting_fsync

    def committed_keys(self) -> list[str]:
        with sqlite3.connect(os.path.join(self.store.directory, INDEX_NAME)) as other:
            return [row[0] for row in other.execute("SELECT key FROM entries")]

    def test_response_ends_before_fsync_and_commit(self) -> None:
        request = UpstreamRequest(
            key=KEY, url=KEY, expected_sha256=hashlib.sha256(BODY).hexdigest()
        )
        answered = self.fetcher.fetch(request)
        (sent,) = self.agent.sent
        response = sent.answer(200, {}, length=len(BODY))
        response.send(BODY[:5000])
        response.send(BODY[5000:])
        # Checked before it is served (its digest is expected): answered
        # once whole.
        self.assertNoResult(answered)
        response.finish()
        answer = self.successResultOf(answered)
        assert answer.body is not None
        client = Client([b"pkg.apk"])
        BodySender(cast(Any, client), answer.body, 0, len(BODY)).start()
        # The client has the whole body and its response has ended ...
        self.assertEqual(b"".join(client.written), BODY)
        self.assertEqual(client.finished, 1)
        # ... while the fsync and rename wait for the store's thread.
        self.assertEqual(self.fsyncs, [])
        self.assertEqual(len(self.runner.calls), 1)
        self.assertIsNone(self.store.peek(KEY))
        # A request now joins the download (no partial stored file).
        self.assertTrue(self.fetcher.downloading(KEY))
        joined = self.successResultOf(self.fetcher.fetch(request))
        # Nothing was waited for upstream for it: a hit (see the engine).
        self.assertEqual((answer.already_whole, joined.already_whole), (False, True))
        assert joined.body is not None
        self.assertEqual(joined.body.read(0, len(BODY) + 1), BODY)
        self.assertTrue(joined.body.finished())
        joined.body.close()
        self.runner.run_all()
        self.assertEqual(len(self.fsyncs), 1)
        stored = self.store.lookup(KEY)
        assert stored is not None
        self.assertEqual(os.pread(stored.fd, len(BODY) + 1, 0), BODY)
        stored.close()
        # The row is committed with the next batch.
        self.assertEqual(self.committed_keys(), [])
        self.clock.advance(COMMIT_DELAY)
        self.assertEqual(self.committed_keys(), [KEY])
        self.successResultOf(self.fetcher.when_idle())

    def test_streamed_response_ends_before_fsync(self) -> None:
        """
        A body streamed as it arrives (nothing expected of it) too: its
        client's response ends with the last byte, before the fsync.
        """
        answered = self.fetcher.fetch(UpstreamRequest(key=KEY, url=KEY))
        (sent,) = self.agent.sent
        response = sent.answer(200, {}, length=len(BODY))
        answer = self.successResultOf(answered)
        assert answer.body is not None
        client = Client([b"pkg.apk"])
        BodySender(cast(Any, client), answer.body, 0, len(BODY)).start()
        response.send(BODY[:5000])
        self.assertEqual(client.finished, 0)
        response.send(BODY[5000:])
        response.finish()
        self.assertEqual(b"".join(client.written), BODY)
        self.assertEqual(client.finished, 1)
        self.assertEqual((self.fsyncs, len(self.runner.calls)), ([], 1))
        self.assertIsNone(self.store.peek(KEY))
        self.runner.run_all()
        self.assertIsNotNone(self.store.peek(KEY))
        self.successResultOf(self.fetcher.when_idle())
