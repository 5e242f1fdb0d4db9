"""
The engine's rules a policy cannot get around, and its hooks that narrow
a hit, through the harness of :mod:`tests.test_engine`: the ``answers``
hit predicate (and ApkPolicy's), twin adoption under the client's key,
a private request's ``Cache-Control``, which statuses serve stale, the
upstream backoff, and the freshness rows not driven elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.apk.check import ApkIndexes
from buildcache.ecosystems.apk.policy import ApkPolicy
from buildcache.engine.backoff import UpstreamBackoff
from buildcache.engine.core import Engine
from buildcache.engine.fields import format_http_date
from buildcache.engine.freshness import Kind, private_cache_control, stale_status
from buildcache.engine.keys import cache_key
from buildcache.engine.policy import NO_EXPECTATION, Expectation, GenericPolicy, Target
from buildcache.store import Entry, Store
from tests.apkrepo import build_apk, build_apkindex
from tests.support import HeldRunner
from tests.test_engine import FORWARDED, ORIGIN, POLICY, TTL, EngineTestCase

ALICE = {"authorization": "Bearer alice"}


def target(path: str, headers: Mapping[str, str] | None = None, origin: str = ORIGIN) -> Target:
    headers = dict(headers or {})
    return Target(
        url=origin + path, front_end="proxy", headers=headers,
        upstream_headers={k: headers[k] for k in FORWARDED if k in headers},
    )


@define
class Rejecting(GenericPolicy):
    """``POLICY`` whose ``answers`` rejects the entries of some sizes."""

    rules: Any = POLICY.rules
    rejected_sizes: tuple[int, ...] = ()

    def answers(self, target: Target, entry: Entry) -> bool:
        return entry.size not in self.rejected_sizes


class AnswersTests(EngineTestCase):
    """
    ``Policy.answers``: an entry it rejects is no hit, for ``resolve``
    (fetched as a miss) and for ``fresh_hit`` (None).
    """

    def test_rejected_entry_is_fetched_again(self) -> None:
        self.serve("/a.pkg", b"bad")
        self.assertAnswer(self.h.get("/a.pkg"), 200, "MISS", b"bad")
        self.h.front.policy = Rejecting(rejected_sizes=(3,))
        self.assertIsNone(self.h.engine.fresh_hit(target("/a.pkg"), self.h.front.policy))
        self.serve("/a.pkg", b"good one")
        self.assertAnswer(self.h.get("/a.pkg"), 200, "MISS", b"good one")
        self.assertAnswer(self.h.get("/a.pkg"), 200, "HIT", b"good one")
        hit = self.h.engine.fresh_hit(target("/a.pkg"), self.h.front.policy)
        assert hit is not None
        hit.close()
        self.assertEqual(self.h.origin.count("/a.pkg"), 2)

    def test_rejected_stale_entry_is_fetched_unconditionally(self) -> None:
        self.serve("/i.idx", b"old", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL)
        self.h.front.policy = Rejecting(rejected_sizes=(3,))
        self.assertAnswer(self.h.get("/i.idx"), 200, "MISS", b"old")
        self.assertIsNone(self.h.origin.seen[-1].headers.get("if-none-match"))


class ApkAnswersTests(SynchronousTestCase):
    """
    ``ApkPolicy.answers`` compares a stored package's recorded source
    digest with the entry of the index held in memory, reading nothing.
    """

    def test_package_the_held_index_lists_otherwise(self) -> None:
        runner = HeldRunner()
        store = Store.open(self.mktemp(), 1 << 24, cast(Any, Clock()), run_blocking=runner)
        store.spare_temp_files = 0
        self.addCleanup(store.close)
        apk = build_apk("zlib", "1.3.1-r1", signed=False)
        base = "http://mirror.test/alpine/v3.20/main/x86_64"
        index = store.writer(cache_key(f"{base}/APKINDEX.tar.gz"))
        index.write(build_apkindex([apk]))
        index.commit({})
        package_url = f"{base}/{apk.filename}"
        writer = store.writer(cache_key(package_url))
        writer.write(apk.content)
        writer.commit({})
        indexes = ApkIndexes(store)
        policy = ApkPolicy(indexes=indexes)
        package = Target(url=package_url, front_end="proxy")

        def entry() -> Entry:
            found = store.peek(cache_key(package_url))
            assert found is not None
            return found

        store.set_source_digest(entry(), "Q1" + "A" * 27 + "=")
        # Nothing held in memory: it answers (the writer drops disowned ones).
        self.assertTrue(policy.answers(package, entry()))
        loading = Deferred.fromCoroutine(indexes.entry_for(package_url, cache_key))
        runner.run_all()
        facts = self.successResultOf(loading)
        assert facts is not None
        self.assertFalse(policy.answers(package, entry()))
        self.assertEqual(runner.calls, [], "answers read a file")
        store.set_source_digest(entry(), facts.control_checksum)
        self.assertTrue(policy.answers(package, entry()))
        # The stored index replaced (by anything, parsed or not): the one
        # held in memory no longer speaks for the package, even once its
        # answer was remembered.
        store.set_source_digest(entry(), "Q1" + "A" * 27 + "=")
        self.assertFalse(policy.answers(package, entry()))
        replaced = store.writer(cache_key(f"{base}/APKINDEX.tar.gz"))
        replaced.write(b"not an index")
        replaced.commit({})
        self.assertTrue(policy.answers(package, entry()))
        self.assertEqual(runner.calls, [], "answers read a file")


@define
class VouchesAll(GenericPolicy):
    """Vouches for any twin (as a digest that matched would)."""

    rules: Any = POLICY.rules

    async def vouches_for(
        self, target: Target, engine: Engine, twin: Entry, expected: Expectation
    ) -> bool:
        return True


class AdoptTests(EngineTestCase):
    """
    :meth:`Engine.adopt`: the engine, not the policy, chooses the key a
    twin is taken over under: the client's own family.
    """

    def adopt(self, wanted: Target) -> Any:
        return self.successResultOf(Deferred.fromCoroutine(
            self.h.engine.adopt(wanted, VouchesAll(), NO_EXPECTATION)
        ))

    def test_credentialed_client_never_gets_an_anonymous_twin(self) -> None:
        self.serve("/a.pkg", b"anonymous copy")
        self.h.get("/a.pkg")
        https = target("/a.pkg", ALICE, origin=ORIGIN.replace("http://", "https://"))
        self.assertIsNone(self.adopt(https))
        self.assertIsNotNone(self.h.store.peek(cache_key(ORIGIN + "/a.pkg")))

    def test_anonymous_twin_adopted_under_the_https_key(self) -> None:
        self.serve("/a.pkg", b"anonymous copy")
        self.h.get("/a.pkg")
        https = target("/a.pkg", origin=ORIGIN.replace("http://", "https://"))
        adopted = self.adopt(https)
        assert adopted is not None
        self.addCleanup(adopted.close)
        self.assertEqual(adopted.entry.key, https.key)
        self.assertIsNone(self.h.store.peek(cache_key(ORIGIN + "/a.pkg")))

    def test_private_twin_adopted_in_its_own_family(self) -> None:
        self.serve("/a.pkg", b"alice's copy", headers={"cache-control": "public"})
        self.h.get("/a.pkg", ALICE)
        https = target("/a.pkg", ALICE, origin=ORIGIN.replace("http://", "https://"))
        self.assertIsNone(self.adopt(target(
            "/a.pkg", {"authorization": "Bearer bob"},
            origin=ORIGIN.replace("http://", "https://"),
        )))
        adopted = self.adopt(https)
        assert adopted is not None
        self.addCleanup(adopted.close)
        self.assertEqual(adopted.entry.key, self.h.engine.family(https))


@define
class Immutable(GenericPolicy):
    """Tells clients everything is immutable (as FilePolicy does)."""

    rules: Any = POLICY.rules
    value: str = "max-age=31536000, immutable"

    def cache_control(
        self, kind: Kind, ttl: float, response_headers: Mapping[str, str] | None,
        status: int,
    ) -> str | None:
        return self.value


class PrivateCacheControlTests(EngineTestCase):
    """
    A private request's client is never promised a longer life than the
    response's own, whatever the policy's ``cache_control`` says.
    """

    def test_policy_promise_capped_for_a_private_request(self) -> None:
        self.h.front.policy = Immutable()
        self.serve("/a.pkg", b"p", headers={"cache-control": "public, max-age=100"})
        for cache in ("MISS", "HIT"):
            answer = self.h.get("/a.pkg", ALICE)
            self.assertAnswer(answer, 200, cache)
            self.assertEqual(answer.header("cache-control"), "public, max-age=100")
        anonymous = self.h.get("/a.pkg")
        self.assertEqual(anonymous.header("cache-control"), "max-age=31536000, immutable")

    def test_shorter_policy_promise_kept(self) -> None:
        self.h.front.policy = Immutable(value="max-age=10")
        self.serve("/a.pkg", b"p", headers={"cache-control": "public, max-age=100"})
        self.assertEqual(self.h.get("/a.pkg", ALICE).header("cache-control"), "max-age=10")

    def test_rule(self) -> None:
        own = {"cache-control": "max-age=100"}
        self.assertEqual(private_cache_control("max-age=100", own, 200, 0.0), "max-age=100")
        self.assertEqual(private_cache_control("max-age=101", own, 200, 0.0), "max-age=100")
        self.assertEqual(private_cache_control("no-cache", own, 200, 0.0), "no-cache")
        self.assertEqual(private_cache_control("public", own, 200, 0.0), "max-age=100")
        self.assertIsNone(private_cache_control("max-age=5", {}, 200, 0.0))
        self.assertEqual(private_cache_control(None, own, 200, 0.0), "max-age=100")


@define
class StaleOnAnything(GenericPolicy):
    """A policy that would serve stale for any status."""

    rules: Any = POLICY.rules

    def stale_on(self, status: int) -> bool:
        return True


class StaleStatusTests(EngineTestCase):
    """
    A policy's ``stale_on`` is heeded for error statuses but 404 and 410:
    a success, a redirect or "gone" is never hidden by a stored copy.
    """

    def revalidation_answered(self, status: int) -> Any:
        served = self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL)
        served.status, served.etag, served.body = status, None, b"answer"
        answer = self.h.get("/i.idx")
        self.h.engine.backoff.succeeded(ORIGIN)
        return answer

    def test_statuses(self) -> None:
        self.h.front.policy = StaleOnAnything()
        for status, cache in (
            (503, "STALE"), (429, "STALE"), (403, "STALE"),
            (404, "MISS"), (410, "MISS"), (302, "MISS"), (200, "MISS"),
        ):
            self.h.store.remove(cache_key(ORIGIN + "/i.idx"))
            answer = self.revalidation_answered(status)
            self.assertEqual(
                (answer.status, answer.header("x-cache")),
                (200 if cache == "STALE" else status, cache), status,
            )

    def test_rule(self) -> None:
        self.assertEqual(
            [s for s in (200, 304, 302, 400, 404, 410, 429, 500, 503) if stale_status(s, True)],
            [400, 429, 500, 503],
        )
        self.assertFalse(stale_status(503, False))

    def test_429_revalidation_served_stale(self) -> None:
        """A registry's policy adds 429 (its rate limit) to the 5xx."""

        @define
        class RateLimited(GenericPolicy):
            rules: Any = POLICY.rules

            def stale_on(self, status: int) -> bool:
                return status == 429 or super().stale_on(status)

        self.h.front.policy = RateLimited()
        self.assertAnswer(self.revalidation_answered(429), 200, "STALE", b"index")
        self.h.front.policy = POLICY
        self.h.store.remove(cache_key(ORIGIN + "/i.idx"))
        self.assertAnswer(self.revalidation_answered(429), 429, "MISS")


class BackoffTests(EngineTestCase):
    """
    After an upstream host fails a revalidation, its other stale entries
    are served stale at once, without asking it, for
    ``Engine.upstream_backoff`` seconds; an answer from it clears that.
    """

    def setUp(self) -> None:
        super().setUp()
        for path in ("/a.idx", "/b.idx"):
            self.serve(path, b"index " + path.encode(), etag='"1"')
            self.h.get(path)
        self.h.later(TTL)

    def asked(self) -> int:
        return len(self.h.origin.seen)

    def test_failing_host_not_asked_again_for_a_while(self) -> None:
        self.h.line.down = True
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE")
        self.h.line.down = False
        asked = self.asked()
        self.assertAnswer(self.h.get("/b.idx"), 200, "STALE", b"index /b.idx")
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE", b"index /a.idx")
        self.assertEqual(self.asked(), asked)
        self.h.later(self.h.engine.upstream_backoff)
        self.assertAnswer(self.h.get("/b.idx"), 200, "REVALIDATED")
        self.assertAnswer(self.h.get("/a.idx"), 200, "REVALIDATED")

    def test_stale_status_starts_it(self) -> None:
        self.h.origin.files["/a.idx"].status = 503
        self.h.origin.files["/a.idx"].etag = None
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE")
        asked = self.asked()
        self.assertAnswer(self.h.get("/b.idx"), 200, "STALE")
        self.assertEqual(self.asked(), asked)

    def test_an_answer_from_the_host_clears_it(self) -> None:
        self.h.line.down = True
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE")
        self.h.line.down = False
        self.serve("/new.pkg", b"new")
        self.assertAnswer(self.h.get("/new.pkg"), 200, "MISS")
        self.assertAnswer(self.h.get("/b.idx"), 200, "REVALIDATED")

    def test_an_error_answer_does_not_clear_it(self) -> None:
        self.h.line.down = True
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE")
        self.h.line.down = False
        self.serve("/busy.pkg", b"busy", status=503)
        self.assertEqual(self.h.get("/busy.pkg").status, 503)
        self.assertAnswer(self.h.get("/b.idx"), 200, "STALE")

    def test_other_hosts_still_asked(self) -> None:
        self.h.engine.backoff.failed("http://elsewhere.test/x")
        self.assertAnswer(self.h.get("/a.idx"), 200, "REVALIDATED")

    def test_private_entry_that_forbids_stale_still_asks(self) -> None:
        self.serve(
            "/p.idx", b"mine", etag='"1"',
            headers={"cache-control": "public, must-revalidate, max-age=10"},
        )
        self.h.get("/p.idx", ALICE)
        self.h.later(20)
        self.h.line.down = True
        self.assertAnswer(self.h.get("/a.idx"), 200, "STALE")
        self.h.line.down = False
        self.assertAnswer(self.h.get("/p.idx", ALICE), 200, "REVALIDATED")

    def test_table_is_bounded(self) -> None:
        clock = Clock()
        backoff = UpstreamBackoff(clock, 30.0, kept=3)
        for n in range(5):
            backoff.failed(f"http://h{n}.test/x")
        self.assertEqual(
            [backoff.failing(f"http://h{n}.test/y") for n in range(5)],
            [False, False, True, True, True],
        )
        clock.advance(30)
        self.assertFalse(backoff.failing("http://h4.test/y"))

    def test_one_host_by_the_health_tables_name(self) -> None:
        """
        Hosts are named as the upstream-health table names them: case and
        a default port do not make another host; another port does.
        """
        backoff = UpstreamBackoff(Clock(), 30.0)
        backoff.failed("HTTP://Mirror.Test:80/a?b")
        self.assertTrue(backoff.failing("http://mirror.test/other"))
        self.assertFalse(backoff.failing("http://mirror.test:8080/other"))
        backoff.succeeded("http://MIRROR.test/x")
        self.assertFalse(backoff.failing("http://mirror.test/other"))

    def test_off(self) -> None:
        backoff = UpstreamBackoff(Clock(), 0.0)
        backoff.failed("http://h.test/x")
        self.assertFalse(backoff.failing("http://h.test/x"))


class FreshnessRowTests(EngineTestCase):
    """
    The rows of the freshness decision for plain HTTP responses, through
    the whole flow (the clock starts at 0; ``Date`` is set by the origin).
    """

    def dated(self, **headers: str) -> dict[str, str]:
        return {"date": format_http_date(self.h.clock.seconds()), **headers}

    def test_response_no_cache_revalidates_every_time(self) -> None:
        self.serve("/r", b"r", etag='"1"', headers={"cache-control": "no-cache, max-age=600"})
        self.h.get("/r")
        self.assertAnswer(self.h.get("/r"), 200, "REVALIDATED")
        self.assertEqual(self.h.origin.count("/r"), 2)

    def test_expires(self) -> None:
        self.h.clock.advance(1000)
        self.serve("/r", b"r", etag='"1"', headers=self.dated(
            expires=format_http_date(self.h.clock.seconds() + 100)
        ))
        self.h.get("/r")
        self.h.later(99)
        self.assertAnswer(self.h.get("/r"), 200, "HIT")
        self.h.later(1)
        self.assertAnswer(self.h.get("/r"), 200, "REVALIDATED")

    def test_heuristic_from_last_modified(self) -> None:
        """Fresh for a tenth of its age at the time it was sent."""
        self.h.clock.advance(100_000)
        self.serve("/r", b"r", etag='"1"', headers=self.dated(**{
            "last-modified": format_http_date(self.h.clock.seconds() - 1000)
        }))
        self.h.get("/r")
        self.h.later(99)
        self.assertAnswer(self.h.get("/r"), 200, "HIT")
        self.h.later(1)
        self.assertAnswer(self.h.get("/r"), 200, "REVALIDATED")

    def test_client_min_fresh(self) -> None:
        self.serve("/r", b"r", etag='"1"', headers={"cache-control": "max-age=100"})
        self.h.get("/r")
        self.h.later(50)
        self.assertAnswer(self.h.get("/r", {"cache-control": "min-fresh=10"}), 200, "HIT")
        self.assertAnswer(
            self.h.get("/r", {"cache-control": "min-fresh=60"}), 200, "REVALIDATED"
        )

    def test_pragma_no_cache(self) -> None:
        self.serve("/r", b"r", etag='"1"', headers={"cache-control": "max-age=100"})
        self.h.get("/r")
        self.assertAnswer(self.h.get("/r", {"pragma": "no-cache"}), 200, "REVALIDATED")
        self.assertAnswer(self.h.get("/r"), 200, "HIT")
