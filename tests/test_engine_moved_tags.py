"""
The engine's HEAD revalidation and HEAD-fetches paths after a tag moved, in
memory (tests.test_engine's harness): a HEAD never answered from the old
copy when the new one was not kept, a 304 to the unconditional GET is an
upstream failure (stale), no stored object left open; and the shared
upstream HEADs (a waiter cancelled, a failure for all, credentials apart).
Regression tests of the second review of issue 14.
"""

from __future__ import annotations

from tests.test_engine import (
    TTL,
    EngineTestCase,
    RegistryShape,
    leaked,
    track_opened,
)


class MovedTagTests(EngineTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.h.front.policy = RegistryShape()
        self.tag = self.serve(
            "/t.idx", b"manifest 1", headers={"docker-content-digest": "sha256:1"}
        )
        self.assertEqual(self.h.get("/t.idx").status, 200)
        self.h.later(TTL)

    def methods(self) -> list[str]:
        return [s.method for s in self.h.origin.seen]

    def test_head_after_move_new_version_not_storable(self) -> None:
        """
        The tag moved; its new manifest comes with ``no-store``.  A GET is
        answered with the new manifest (a MISS); a HEAD must be answered
        with the new one's headers too, not the old copy's digest.
        """
        self.tag.body = b"manifest 2"
        self.tag.headers = {
            "docker-content-digest": "sha256:2", "cache-control": "no-store",
        }
        head = self.h.get("/t.idx", method="HEAD")
        self.assertEqual(self.methods(), ["GET", "HEAD", "GET"])
        self.assertEqual(
            (head.status, head.header("docker-content-digest")), (200, "sha256:2"),
            f"HEAD answered {head.header('x-cache')} with the old digest",
        )

    def test_get_after_move_answered_304(self) -> None:
        """
        The HEAD says the tag moved; the (unconditional) GET is answered
        304.  A miss treats that as an upstream error (Unconditional304Tests);
        here a client that asked nothing on condition is sent a 304 with
        no body, and the stored copy is not served stale.
        """
        self.tag.headers = {"docker-content-digest": "sha256:2"}
        self.tag.body = b""
        seen = self.h.origin.seen

        def before() -> None:
            # The HEAD: 200 and the new digest; the GET after it: 304.
            self.tag.status = 304 if seen[-1].method == "GET" else 200

        self.tag.before = before
        answer = self.h.get("/t.idx")
        self.assertEqual(self.methods(), ["GET", "HEAD", "GET"])
        self.assertEqual(
            (answer.status, answer.header("x-cache")), (200, "STALE"),
            f"answered {answer.status} {answer.header('x-cache')} to an unconditional GET",
        )

    def test_no_stored_object_left_open_moved_429(self) -> None:
        self.tag.headers = {"docker-content-digest": "sha256:2"}
        # HEAD passes (200 and the new digest), the GET is limited: the
        # origin answers both with the same status, so use a hook.
        calls: list[str] = []

        def before() -> None:
            calls.append("x")
            self.tag.status = 429 if len(calls) >= 2 else 200

        self.tag.before = before
        opened = track_opened(self, self.h.store)
        for method in ("GET", "HEAD"):
            calls.clear()
            self.tag.status = 200
            answer = self.h.get("/t.idx", method=method)
            self.assertEqual((answer.status, answer.header("x-cache")), (200, "STALE"))
        self.h.settle()
        self.assertEqual(leaked(opened), [])

    def test_no_stored_object_left_open_moved_head(self) -> None:
        self.tag.body = b"manifest 2"
        self.tag.headers = {"docker-content-digest": "sha256:2"}
        opened = track_opened(self, self.h.store)
        answer = self.h.get("/t.idx", method="HEAD")
        self.assertEqual((answer.status, answer.header("docker-content-digest")),
                         (200, "sha256:2"))
        self.h.settle()
        self.assertEqual(leaked(opened), [])


from twisted.internet.defer import CancelledError  # noqa: E402

from buildcache.fetch.fetcher import UpstreamError, UpstreamRequest  # noqa: E402
from tests.test_engine import ORIGIN  # noqa: E402


class SharedHeadTests(EngineTestCase):
    def _request(self, **changes: object) -> UpstreamRequest:
        return UpstreamRequest(key="k", url=ORIGIN + "/a.pkg", **changes)  # type: ignore[arg-type]

    def test_one_waiter_cancelled_others_answered(self) -> None:
        self.serve("/a.pkg", b"package")
        fetcher = self.h.engine.fetcher
        first = fetcher.head(self._request())
        second = fetcher.head(self._request())
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.h.settle()
        self.assertEqual(self.successResultOf(second).status, 200)
        self.assertEqual(fetcher._heads, {})
        self.assertEqual([s.method for s in self.h.origin.seen], ["HEAD"])

    def test_failure_to_every_waiter(self) -> None:
        self.h.line.down = True
        fetcher = self.h.engine.fetcher
        waiters = [fetcher.head(self._request()) for _ in range(3)]
        self.h.settle()
        for waiter in waiters:
            self.failureResultOf(waiter, UpstreamError)
        self.assertEqual(fetcher._heads, {})

    def test_different_credentials_not_shared(self) -> None:
        self.serve("/a.pkg", b"package")
        fetcher = self.h.engine.fetcher
        a = fetcher.head(self._request(operator_credentials=True))
        b = fetcher.head(self._request(operator_credentials=False))
        c = fetcher.head(self._request(headers={"authorization": "Basic x"}))
        self.h.settle()
        for d in (a, b, c):
            self.assertEqual(self.successResultOf(d).status, 200)
        self.assertEqual(len(self.h.origin.seen), 3)
        self.assertEqual(fetcher._heads, {})
