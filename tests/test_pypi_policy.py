"""
Tests for the pip index's engine policies (:mod:`buildcache.ecosystems.pypi.policy`,
with its :class:`~buildcache.ecosystems.pypi.policy.FilePolicy`), its in-memory
:class:`~buildcache.ecosystems.pypi.lru.LRU`, and the engine's lookup of a
target without variants, which the index's pages and root rely on.  A real
store in a temporary directory, a fake clock, no network: nothing here
reaches the fetcher.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import MEDIA_TYPE_JSON, SimplePageError
from buildcache.ecosystems.pypi.policy import (
    CLIENT_REVALIDATION_FLOOR,
    FilePolicy,
    IndexPolicy,
    PagePolicy,
    answer_status,
)
from buildcache.engine.core import Engine
from buildcache.engine.exchanges import CacheStatus
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import Expectation, Target
from buildcache.store import Store

BODY = b"wheel bytes"
DIGEST = hashlib.sha256(BODY).hexdigest()
URL = "https://127.0.0.1:9/files/demo-1.0-py3-none-any.whl"


class LRUTests(TestCase):
    def test_bounded_by_entries(self) -> None:
        lru: LRU[str, int] = LRU(2, 100)
        lru.put("a", 1, 1)
        lru.put("b", 2, 1)
        self.assertEqual(lru.get("a"), 1)  # "b" is now the oldest
        lru.put("c", 3, 1)
        self.assertEqual((lru.get("a"), lru.get("b"), lru.get("c")), (1, None, 3))

    def test_bounded_by_bytes(self) -> None:
        lru: LRU[str, int] = LRU(10, 10)
        lru.put("a", 1, 6)
        lru.put("b", 2, 6)
        self.assertEqual((len(lru), lru.get("a"), lru.get("b")), (1, None, 2))

    def test_too_large_is_not_kept(self) -> None:
        lru: LRU[str, int] = LRU(10, 10)
        lru.put("a", 1, 11)
        self.assertEqual((len(lru), lru.get("a")), (0, None))

    def test_replacing_counts_the_new_size(self) -> None:
        lru: LRU[str, int] = LRU(10, 10)
        lru.put("a", 1, 8)
        lru.put("a", 2, 2)
        lru.put("b", 3, 8)
        self.assertEqual((lru.get("a"), lru.get("b")), (2, 3))


class _NoFetcher:
    """Nothing here misses: a fetch would be a bug."""

    def used(self, entry: object) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fetcher was asked for {name}")


class _Base(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = Store.open(self.mktemp(), 1 << 20, self.clock)
        self.addCleanup(self.store.close)
        self.engine = Engine(self.store, cast(Any, _NoFetcher()), self.clock, index_ttl=600.0)

    def put(self, key: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        writer = self.store.writer(key)
        writer.write(body)
        writer.commit(headers or {})

    def run_async(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)


class IndexPolicyTests(_Base):
    def test_only_200_stored(self) -> None:
        policy = IndexPolicy()
        self.assertEqual(
            [policy.storable(Kind.INDEX, status, {}, {}) for status in (200, 203, 404, 500)],
            [True, False, False, False],
        )

    def test_kind_is_the_class_kind(self) -> None:
        target = Target(URL, "index")
        self.assertEqual(IndexPolicy().kind(target), Kind.INDEX)
        self.assertEqual(PagePolicy().kind(target), Kind.INDEX)
        self.assertEqual(FilePolicy().kind(target), Kind.IMMUTABLE)

    def test_page_ttl_is_the_index_ttl(self) -> None:
        self.assertEqual(PagePolicy(index_ttl=42.0).ttl(Kind.INDEX, 600.0), 42.0)


class PageCheckTests(_Base):
    def check(self, body: bytes, content_type: str) -> tuple[Any, LRU[Any, Any]]:
        models: LRU[tuple[str, str], Any] = LRU(4, 1 << 20)
        policy = PagePolicy(models=models)
        target = Target("http://127.0.0.1:9/simple/demo/", "index", key="simple-page|u|demo")
        expected = self.run_async(Deferred.fromCoroutine(policy.expect(target, self.engine)))
        assert expected.verify is not None
        checker = expected.verify({"content-type": content_type})
        checker.update(body)
        return checker, models

    def test_good_page_parsed_once(self) -> None:
        body = json.dumps({
            "meta": {"api-version": "1.0"}, "name": "demo",
            "files": [{"filename": "demo-1.0.tar.gz", "url": "demo-1.0.tar.gz", "hashes": {}}],
        }).encode()
        checker, models = self.check(body, MEDIA_TYPE_JSON)
        checker.finish()
        page = models.get(("simple-page|u|demo", hashlib.sha256(body).hexdigest()))
        assert page is not None
        self.assertEqual([f.filename for f in page.files], ["demo-1.0.tar.gz"])

    def test_captive_portal_refused(self) -> None:
        checker, models = self.check(b"<html>please log in", "application/octet-stream")
        self.assertRaises(SimplePageError, checker.finish)
        self.assertEqual(len(models), 0)


class FilePolicyTests(_Base):
    def target(self, url: str = URL) -> Target:
        return Target(url, "index", upstream_headers={"user-agent": "test"})

    def test_other_digest_dropped_before_lookup(self) -> None:
        target = self.target()
        self.put(target.key, b"other bytes")
        policy = FilePolicy(expected=Expectation(sha256=DIGEST))
        self.run_async(Deferred.fromCoroutine(policy.before_lookup(target, self.engine)))
        self.assertIsNone(self.store.peek(target.key))

    def test_matching_digest_kept(self) -> None:
        target = self.target()
        self.put(target.key, BODY)
        policy = FilePolicy(expected=Expectation(sha256=DIGEST))
        self.run_async(Deferred.fromCoroutine(policy.before_lookup(target, self.engine)))
        resolved = self.run_async(Deferred.fromCoroutine(self.engine.resolve(target, policy)))
        self.addCleanup(resolved.close)
        self.assertEqual(resolved.cache, CacheStatus.HIT)

    def test_http_twin_adopted_when_the_digest_vouches(self) -> None:
        target = self.target()
        twin = self.target(URL.replace("https://", "http://", 1))
        self.put(twin.key, BODY)
        vouched = Expectation(sha256=DIGEST)
        adopted = self.run_async(Deferred.fromCoroutine(
            self.engine.adopt(target, FilePolicy(expected=vouched), vouched)
        ))
        assert adopted is not None
        self.addCleanup(adopted.close)
        self.assertEqual(adopted.entry.sha256, DIGEST)
        self.assertIsNone(self.store.peek(twin.key))

    def test_http_twin_of_another_digest_left(self) -> None:
        target = self.target()
        twin = self.target(URL.replace("https://", "http://", 1))
        self.put(twin.key, b"other bytes")
        vouched = Expectation(sha256=DIGEST)
        adopted = self.run_async(Deferred.fromCoroutine(
            self.engine.adopt(target, FilePolicy(expected=vouched), vouched)
        ))
        self.assertIsNone(adopted)
        self.assertIsNotNone(self.store.peek(twin.key))


class FileHitTests(_Base):
    """
    :meth:`FilePolicy.answers`, the pure hit predicate: only the bytes the
    page vouches for answer, on the hit path alone too (a worker's
    ``fresh_hit`` runs no ``before_lookup``).
    """

    def target(self) -> Target:
        return Target(URL, "index", upstream_headers={"user-agent": "test"})

    def test_answers_only_the_page_digest(self) -> None:
        target = self.target()
        self.put(target.key, BODY)
        entry = self.store.peek(target.key)
        assert entry is not None
        self.assertTrue(FilePolicy(expected=Expectation(sha256=DIGEST)).answers(target, entry))
        self.assertTrue(FilePolicy().answers(target, entry))
        other = hashlib.sha256(b"rebuilt wheel").hexdigest()
        self.assertFalse(FilePolicy(expected=Expectation(sha256=other)).answers(target, entry))

    def test_fresh_hit_never_serves_a_replaced_wheel(self) -> None:
        target = self.target()
        self.put(target.key, BODY)
        rebuilt = hashlib.sha256(b"rebuilt wheel").hexdigest()
        self.assertIsNone(
            self.engine.fresh_hit(target, FilePolicy(expected=Expectation(sha256=rebuilt)))
        )
        hit = self.engine.fresh_hit(target, FilePolicy(expected=Expectation(sha256=DIGEST)))
        assert hit is not None
        self.addCleanup(hit.close)
        self.assertEqual(hit.cache, CacheStatus.HIT)
        # The copy is left for the process that fetches to replace.
        self.assertIsNotNone(self.store.peek(target.key))


class PageFreshnessTests(_Base):
    """
    :class:`PagePolicy`'s part of a page's freshness: the headers the
    engine judges it by, and the statuses it is served stale for.
    """

    def test_pips_max_age_is_dropped(self) -> None:
        policy = PagePolicy()
        self.assertEqual(policy.judged({"cache-control": "max-age=0"}), {})
        self.assertEqual(policy.judged({}), {})

    def test_refresh_becomes_the_floor(self) -> None:
        policy = PagePolicy()
        floor = {"cache-control": f"max-age={CLIENT_REVALIDATION_FLOOR:g}"}
        self.assertEqual(policy.judged({"cache-control": "no-cache"}), floor)
        self.assertEqual(policy.judged({"pragma": "no-cache"}), floor)

    def test_stale_on_errors_but_not_found(self) -> None:
        policy = PagePolicy()
        self.assertEqual(
            [policy.stale_on(s) for s in (200, 304, 403, 404, 410, 429, 500, 503)],
            [False, False, True, False, False, True, True, True],
        )


class AnswerStatusTests(TestCase):
    def test_one_rule(self) -> None:
        self.assertEqual(
            [answer_status(s) for s in (404, 410, 403, 429, 500, 503, 301)],
            [404, 404, 502, 502, 502, 502, 502],
        )


class UnvariedLookupTests(_Base):
    """
    The index asks for its pages and root always with the same headers
    (``variants=False``): the one entry under the key answers, even when
    the upstream said ``Vary: Accept``.
    """

    def test_varying_entry_answers_a_target_without_variants(self) -> None:
        target = Target(
            "http://127.0.0.1:9/simple/demo/", "index", key="simple-page|u|demo",
            upstream_headers={"accept": "application/json"}, variants=False,
        )
        self.put(target.key, b"{}", {"vary": "Accept"})
        self.assertIsNotNone(self.engine.find(target))
        resolved = self.run_async(Deferred.fromCoroutine(
            self.engine.resolve(target, PagePolicy(index_ttl=600.0))
        ))
        self.addCleanup(resolved.close)
        self.assertEqual(resolved.cache, CacheStatus.HIT)
