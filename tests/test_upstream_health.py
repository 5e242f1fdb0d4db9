"""
The upstream-health table and its metrics labels stay small whatever
hosts clients make the proxy name: rows are keyed by the normalised host,
refused targets make none, and the table keeps the configured upstreams
plus a fixed number of recent others.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.access import upstream_host_key
from buildcache.ops.activity import ERROR_MESSAGE_KEPT, OTHER_UPSTREAMS_KEPT, Activity
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Received,
    pattern_bytes,
    start_server,
)
from tests.test_status import sample

PACKAGE = "/up/files/curl-8.5.0-r0.apk"


class HostKeyTests(SynchronousTestCase):
    """
    :func:`upstream_host_key`: one name per upstream.
    """

    def test_case_and_default_port_folded(self) -> None:
        for url in (
            "http://LoCaLhOsT/x", "http://localhost:80/y", "HTTP://LOCALHOST.:80",
            "https://localhost:443/z",
        ):
            self.assertEqual(upstream_host_key(url), "localhost", url)

    def test_other_ports_kept(self) -> None:
        self.assertEqual(upstream_host_key("http://LocalHost:8080/x"), "localhost:8080")
        self.assertEqual(upstream_host_key("https://example.org:80/"), "example.org:80")
        self.assertEqual(upstream_host_key("http://example.org:443/"), "example.org:443")

    def test_userinfo_never_shown(self) -> None:
        self.assertEqual(
            upstream_host_key("http://user:s3cret@Mirror.Example.org:81/a"),
            "mirror.example.org:81",
        )

    def test_addresses(self) -> None:
        self.assertEqual(upstream_host_key("http://[::1]:3141/simple/"), "[::1]:3141")
        self.assertEqual(upstream_host_key("http://[0:0::1]/"), "[::1]")
        self.assertEqual(upstream_host_key("http://127.0.0.1:80/"), "127.0.0.1")

    def test_unusable(self) -> None:
        for url in ("", "not a url", "http:///x", "http://[::1/x", "http://a:99999/",
                    "http://bad_host!/"):
            self.assertIsNone(upstream_host_key(url), url)


class TableTests(SynchronousTestCase):
    """
    :class:`Activity`'s table on a test clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.activity = Activity(self.clock, frozenset({"mirror.example.org"}))

    def test_one_row_per_normalised_host(self) -> None:
        for port, spelling in enumerate(("LOCALHOST", "localhost", "LocalHost")):
            self.activity.upstream_failed(f"http://{spelling}:80/{port}", "refused")
        self.activity.upstream_succeeded("http://localhost/x", 0.1)
        self.assertEqual(list(self.activity.upstreams), ["localhost"])
        (health,) = self.activity.upstreams.values()
        self.assertEqual((health.errors, health.successes), (3, 1))

    def test_bounded_least_recently_updated_out(self) -> None:
        """
        The configured upstream stays however old; of the others the
        latest :data:`OTHER_UPSTREAMS_KEPT` do, an update counting as use.
        """
        self.activity.upstream_succeeded("https://mirror.example.org/a", 0.1)
        self.activity.upstream_failed("http://kept.example:1/", "timeout")
        for number in range(2, 500):
            self.clock.advance(1)
            self.activity.upstream_failed(f"http://h{number}.example/", "timeout")
            if number % 10 == 0:
                self.activity.stale_served("http://kept.example:1/x")
        hosts = set(self.activity.upstreams)
        self.assertEqual(len(hosts), 1 + OTHER_UPSTREAMS_KEPT)
        self.assertIn("mirror.example.org", hosts)
        self.assertIn("kept.example:1", hosts)
        self.assertIn("h499.example", hosts)
        self.assertNotIn("h2.example", hosts)
        self.assertEqual(self.activity.upstreams["kept.example:1"].stale_served, 49)

    def test_no_row_for_unusable_url(self) -> None:
        self.activity.upstream_failed("http://[::1/x", "cannot request")
        self.activity.upstream_succeeded("", 0.1)
        self.assertEqual(self.activity.upstreams, {})

    def test_error_message_bounded(self) -> None:
        self.activity.upstream_failed("http://h.example/", "x" * 100_000)
        message = self.activity.upstreams["h.example"].last_error_message
        self.assertEqual(len(message or ""), ERROR_MESSAGE_KEPT)


async def gather_in_batches(
    calls: list[Callable[[], Coroutine[Any, Any, Received]]], size: int
) -> list[Received]:
    """Run the calls, ``size`` at a time."""
    results: list[Received] = []
    for start in range(0, len(calls), size):
        results += await gatherResults(
            [Deferred.fromCoroutine(call()) for call in calls[start:start + size]]
        )
    return results


class OverHTTPTests(TestCase):
    """
    The table, the status page and ``/-/metrics`` of a running server after
    traffic through its proxy port.
    """

    timeout = 60

    async def test_refused_targets_make_no_rows(self) -> None:
        """
        2000 proxied requests for ``http://LoCaLhOsT:N/x`` (varying case and
        port), each refused at the connection guard (loopback): every one
        403, no row, no metrics label, and a status page that stays small.
        """
        upstream = FakeUpstream()
        upstream.bodies[PACKAGE.removeprefix("/up")] = GatedBody(pattern_bytes(1000))
        running = start_server(self, upstream=upstream)
        client = Client(running.proxy_port)
        self.addCleanup(client.close)
        served = await client.get(f"http://127.0.0.1:{running.proxy_port}{PACKAGE}")
        self.assertEqual(served.status, 200)
        spellings = ("LoCaLhOsT", "LOCALHOST", "localhost", "lOcAlHoSt")

        def refused(number: int) -> Callable[[], Coroutine[Any, Any, Received]]:
            host = spellings[number % 4]
            return lambda: client.get(f"http://{host}:{2000 + number}/x")

        received = await gather_in_batches([refused(n) for n in range(2000)], 50)
        self.assertEqual({r.status for r in received}, {403})
        activity = running.server.activity
        (configured,) = activity.upstreams
        self.assertTrue(configured.startswith("127.0.0.1:"))
        metrics = await Client().get(f"http://127.0.0.1:{running.proxy_port}/-/metrics")
        self.assertNotIn(b"localhost", metrics.body.lower())
        self.assertLess(len(metrics.body), 20_000)
        page = await Client().get(f"http://127.0.0.1:{running.proxy_port}/")
        self.assertEqual(page.status, 200)
        self.assertNotIn(b"localhost", page.body.lower())
        self.assertLess(len(page.body), 100_000)

    async def test_many_allowed_hosts_kept_at_the_bound(self) -> None:
        """
        300 distinct allowed upstreams (closed ports on 127.0.0.1, listed
        in ``allow_upstream``), each failing: the table and the metrics
        hold the configured upstream and the latest 64.
        """
        upstream = FakeUpstream()
        running = start_server(
            self, {"allow_upstream": ("127.0.0.1",)}, upstream=upstream
        )
        # Below the ephemeral range, so no test listens there: each
        # connection is refused at once.
        ports = list(range(20000, 20300))
        client = Client(running.proxy_port)
        self.addCleanup(client.close)

        def fetch(port: int) -> Callable[[], Coroutine[Any, Any, Received]]:
            return lambda: client.get(f"http://127.0.0.1:{port}/x")

        received = await gather_in_batches([fetch(port) for port in ports], 20)
        self.assertEqual(len(received), 300)
        await client.get(f"http://127.0.0.1:{running.proxy_port}{PACKAGE}")
        activity = running.server.activity
        hosts = set(activity.upstreams)
        self.assertEqual(len(hosts), 1 + OTHER_UPSTREAMS_KEPT)
        configured = f"127.0.0.1:{running.server.config.mirrors[0].url.rsplit(':', 1)[1]}"
        self.assertIn(configured, hosts)
        self.assertIn("127.0.0.1:20299", hosts)
        self.assertNotIn("127.0.0.1:20000", hosts)
        metrics = await Client().get(f"http://127.0.0.1:{running.proxy_port}/-/metrics")
        text = metrics.body.decode()
        labelled = [
            line for line in text.splitlines()
            if line.startswith("buildcache_upstream_errors_total{")
        ]
        self.assertEqual(len(labelled), 1 + OTHER_UPSTREAMS_KEPT)
        self.assertEqual(
            sample(text, "buildcache_upstream_errors_total", host="127.0.0.1:20299"), 1
        )
