"""
The status page, ``/-/stats.json`` and ``/-/metrics``: figures that follow
real traffic through a running server, the page's content and structure,
the traffic chart's geometry, escaping, and credential redaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from html.parser import HTMLParser
from typing import Any

import attrs
import prometheus_client
from attrs import define, field
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.config import Config, Mirror
from buildcache.credentials import UpstreamCredentials, split_userinfo
from buildcache.engine.events import Exchange
from buildcache.ops.activity import BUCKETS, Activity
from buildcache.ops.chart import nice_maximum
from buildcache.ops.human import human_bytes, human_duration, percent
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.snapshot import Snapshot, SnapshotSources, redact_text
from buildcache.ops.status import StatusResource
from buildcache.store import Store
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Received,
    Running,
    listen,
    pattern_bytes,
    reactor,
    start_server,
    url_of,
)

#: Outside an Alpine arch directory, so stored without an APKINDEX check:
#: the figures are under test here, not the check.
PACKAGE = "/up/files/curl-8.5.0-r0.apk"
BODY = pattern_bytes(150_000, b"curl")

VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
     "source", "track", "wbr"}
)


class PageParser(HTMLParser):
    """
    Checks that every element is closed in order, and keeps each element
    with an ``id``: its tag, attributes and text.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, str | None]] = []
        self.problems: list[str] = []
        self.tags: list[str] = []
        self.by_id: dict[str, tuple[str, dict[str, str | None]]] = {}
        self.text_by_id: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        element_id = attributes.get("id")
        if element_id is not None:
            if element_id in self.by_id:
                self.problems.append(f"duplicate id {element_id!r}")
            self.by_id[element_id] = (tag, attributes)
            self.text_by_id[element_id] = []
        if tag not in VOID_ELEMENTS:
            self.open.append((tag, element_id))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_ELEMENTS:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1][0] != tag:
            self.problems.append(
                f"</{tag}> closes {self.open[-1][0] if self.open else 'nothing'}"
            )
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        for _, element_id in self.open:
            if element_id is not None:
                self.text_by_id[element_id].append(data)

    def text(self, element_id: str) -> str:
        return " ".join(" ".join(self.text_by_id[element_id]).split())

    def attribute(self, element_id: str, name: str) -> str:
        value = self.by_id[element_id][1][name]
        assert value is not None
        return value


def parse_page(testcase: SynchronousTestCase, document: bytes) -> PageParser:
    parser = PageParser()
    parser.feed(document.decode("utf-8"))
    parser.close()
    testcase.assertEqual(parser.problems, [])
    testcase.assertEqual(parser.open, [], "elements left open")
    return parser


def step_heights(path: str) -> list[float]:
    """
    The height (0 top .. 1000 baseline) of each bucket of a chart line made
    of ``M x y``, ``V y`` and ``H x`` commands.
    """
    tokens = path.replace("M", " M ").replace("V", " V ").replace("H", " H ").split()
    heights: list[float] = []
    y = 0.0
    x = 0
    index = 0
    while index < len(tokens):
        command = tokens[index]
        if command == "M":
            x, y = int(float(tokens[index + 1])), float(tokens[index + 2])
            index += 3
        elif command == "V":
            y = float(tokens[index + 1])
            index += 2
        elif command == "H":
            target = int(float(tokens[index + 1]))
            heights.extend([y] * (target - x))
            x = target
            index += 2
        else:
            raise AssertionError(f"unexpected path command {command!r} in {path!r}")
    return heights


def sample(text: str, name: str, **labels: str) -> float:
    """
    The value of one sample of a Prometheus text exposition.
    """
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def finished(
    activity: Activity, front_end: str, name: str | None, cache_status: str | None,
    size: int, code: int = 200,
) -> None:
    """
    Report one finished request to ``activity`` as the engine does.
    """
    activity.exchange_finished(Exchange(
        front_end=front_end, client="127.0.0.1", method="GET", url=f"/{name or 'x'}",
        status=code, cache=cache_status, bytes_sent=size, duration=0.0, completed=True,
        name=name,
    ))


@define
class NoDownloads:
    """
    The fetcher as the page sees it, for pages rendered without a server.
    """

    running: int = 0

    def in_flight(self) -> int:
        return self.running


@define
class StatusServer:
    """
    A running buildcache server and its status resource, built from the
    server's parts, on a port of its own.
    """

    running: Running
    activity: Activity
    sources: SnapshotSources
    status_port: int
    client: Client = field(factory=Client)

    def status_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.status_port}{path}"

    async def get(self, path: str) -> Received:
        return await self.client.get(f"http://127.0.0.1:{self.running.proxy_port}{path}")

    async def stats(self) -> dict[str, Any]:
        received = await self.client.get(self.status_url("/-/stats.json"))
        assert received.status == 200, received.body
        stats: dict[str, Any] = json.loads(received.body)
        return stats

    async def metrics_text(self) -> str:
        received = await self.client.get(self.status_url("/-/metrics"))
        assert received.status == 200, received.body
        return received.body.decode("utf-8")

    async def page_html(self) -> bytes:
        received = await self.client.get(self.status_url("/"))
        assert received.status == 200, received.body
        return received.body


def start_status_server(
    testcase: TestCase,
    upstream: FakeUpstream | None = None,
    config_changes: Mapping[str, object] | None = None,
) -> StatusServer:
    running = start_server(testcase, config_changes, upstream)
    server = running.server
    activity = server.activity
    sources = SnapshotSources(server.config, running.store, server.fetcher, activity, reactor)
    port = listen(StatusResource(sources.snapshot))
    testcase.addCleanup(port.stopListening)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    status = StatusServer(running, activity, sources, address.port)
    testcase.addCleanup(lambda: Deferred.fromCoroutine(status.client.close()))
    return status


def package_upstream(**bodies: bytes) -> FakeUpstream:
    upstream = FakeUpstream()
    upstream.bodies[PACKAGE.removeprefix("/up")] = GatedBody(BODY)
    for name, data in bodies.items():
        upstream.bodies[f"/files/{name}"] = GatedBody(data)
    return upstream


class ServedFiguresTests(TestCase):
    """
    The JSON stats and the metrics of a running server change as it
    serves requests.
    """

    async def test_stats_follow_requests(self) -> None:
        """
        After one MISS and one HIT through a mirror route the stats count
        both, the hit ratio is 50%, each byte source counts one body, the
        store holds it, the name leads the table and the upstream is
        healthy.
        """
        status = start_status_server(self, package_upstream())
        before = await status.stats()
        self.assertEqual(before["requests"], 0)
        self.assertIsNone(before["hit_ratio"])
        self.assertEqual(before["store"]["entries"], 0)
        self.assertEqual(before["upstreams"], [])

        first = await status.get(PACKAGE)
        second = await status.get(PACKAGE)
        self.assertEqual(
            (first.header("x-cache"), second.header("x-cache")), ("MISS", "HIT")
        )
        self.assertEqual(second.body, BODY)

        after = await status.stats()
        mirror = after["front_ends"]["mirror"]
        self.assertEqual(mirror["label"], "mirror routes")
        self.assertEqual(mirror["requests"], 2)
        self.assertEqual(mirror["by_status"]["HIT"], 1)
        self.assertEqual(mirror["by_status"]["MISS"], 1)
        self.assertEqual(mirror["hit_ratio"], 0.5)
        self.assertEqual(mirror["bytes_from_cache"], len(BODY))
        self.assertEqual(mirror["bytes_from_upstream"], len(BODY))
        self.assertEqual(after["front_ends"]["proxy"]["requests"], 0)
        self.assertEqual(after["requests"], 2)
        self.assertEqual(after["hit_ratio"], 0.5)
        self.assertEqual(after["bytes_saved"], len(BODY))
        self.assertEqual(after["store"]["entries"], 1)
        # The row counts too (its headers and a fixed overhead).
        rows = after["store"]["bytes_metadata"]
        self.assertGreater(rows, 0)
        self.assertEqual(after["store"]["bytes_stored"], len(BODY) + rows)
        self.assertEqual(
            after["store"]["fill"],
            (len(BODY) + rows) / status.running.server.config.max_size,
        )
        self.assertEqual(
            after["top"]["mirror"], [{"name": "curl-8.5.0-r0.apk", "requests": 2}]
        )
        buckets = after["traffic"]["buckets"]
        self.assertEqual(len(buckets), BUCKETS)
        self.assertEqual(sum(b["from_cache"] for b in buckets), len(BODY))
        self.assertEqual(sum(b["from_upstream"] for b in buckets), len(BODY))
        [health] = after["upstreams"]
        self.assertEqual(health["host"], url_of_upstream(status))
        self.assertEqual((health["successes"], health["errors"]), (1, 0))
        self.assertIsNotNone(health["last_success"])
        self.assertIsNone(health["last_error"])

    async def test_metrics_follow_requests(self) -> None:
        """
        The metrics count requests by front end and cache status, bytes by
        source, the upstream latency and the store, and move on with the
        next request.
        """
        status = start_status_server(self, package_upstream())
        await status.get(PACKAGE)
        await status.get(PACKAGE)
        text = await status.metrics_text()
        self.assertIn(
            'buildcache_requests_total{cache_status="HIT",front_end="mirror"} 1.0', text
        )
        self.assertIn(
            'buildcache_requests_total{cache_status="MISS",front_end="mirror"} 1.0', text
        )
        self.assertEqual(
            sample(text, "buildcache_requests_total", cache_status="HIT", front_end="proxy"),
            0,
        )
        self.assertEqual(
            sample(text, "buildcache_bytes_served_total", front_end="mirror", source="cache"),
            len(BODY),
        )
        self.assertEqual(
            sample(text, "buildcache_bytes_served_total", front_end="mirror",
                   source="upstream"),
            len(BODY),
        )
        self.assertEqual(
            sample(text, "buildcache_upstream_bytes_total", front_end="mirror"), len(BODY)
        )
        self.assertEqual(sample(text, "buildcache_upstream_latency_seconds_count"), 1)
        self.assertEqual(
            sample(text, "buildcache_upstream_latency_seconds_bucket", le="+Inf"), 1
        )
        self.assertEqual(sample(text, "buildcache_store_entries"), 1)
        self.assertEqual(
            sample(text, "buildcache_store_size_bytes"),
            len(BODY) + sample(text, "buildcache_store_metadata_bytes"),
        )
        self.assertEqual(
            sample(text, "buildcache_store_max_size_bytes"),
            status.running.server.config.max_size,
        )
        self.assertEqual(sample(text, "buildcache_evictions_total"), 0)
        self.assertEqual(sample(text, "buildcache_downloads_in_flight"), 0)
        host = url_of_upstream(status)
        self.assertEqual(sample(text, "buildcache_upstream_successes_total", host=host), 1)
        self.assertEqual(sample(text, "buildcache_upstream_errors_total", host=host), 0)

        await status.get(PACKAGE)
        text = await status.metrics_text()
        self.assertIn(
            'buildcache_requests_total{cache_status="HIT",front_end="mirror"} 2.0', text
        )
        self.assertEqual(
            sample(text, "buildcache_bytes_served_total", front_end="mirror", source="cache"),
            2 * len(BODY),
        )
        self.assertEqual(sample(text, "buildcache_upstream_latency_seconds_count"), 1)

    async def test_upstream_failure(self) -> None:
        """
        An upstream answering 503 shows as an error of its host, with the
        reason, and the refused request counts as an error of its front end.
        """
        upstream = package_upstream()
        upstream.status_override = 503
        status = start_status_server(self, upstream)
        received = await status.get(PACKAGE)
        self.assertGreaterEqual(received.status, 500)
        stats = await status.stats()
        [health] = stats["upstreams"]
        self.assertEqual(health["errors"], 1)
        self.assertEqual(health["last_error_message"], "HTTP 503")
        self.assertIsNotNone(health["last_error"])
        self.assertEqual(stats["front_ends"]["mirror"]["errors"], 1)
        text = await status.metrics_text()
        host = url_of_upstream(status)
        self.assertEqual(sample(text, "buildcache_upstream_errors_total", host=host), 1)
        self.assertEqual(
            sample(text, "buildcache_request_errors_total", front_end="mirror"), 1
        )
        page = parse_page(self, await status.page_html())
        self.assertIn("HTTP 503", page.text("upstreams"))

    async def test_download_in_flight(self) -> None:
        """
        A download under way shows in both the stats and the metrics until
        it ends.
        """
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies["/files/slow-1.0-r0.apk"] = GatedBody(
            BODY, before_gate=1000, gate=gate
        )
        status = start_status_server(self, upstream)
        first_bytes: Deferred[None] = Deferred()
        response = Deferred.fromCoroutine(
            status.client.get(
                f"http://127.0.0.1:{status.running.proxy_port}/up/files/slow-1.0-r0.apk",
                first_bytes=first_bytes,
            )
        )
        await first_bytes
        self.assertEqual((await status.stats())["downloads_in_flight"], 1)
        self.assertEqual(
            sample(await status.metrics_text(), "buildcache_downloads_in_flight"), 1
        )
        gate.callback(None)
        received = await response
        self.assertEqual(received.body, BODY)
        self.assertEqual((await status.stats())["downloads_in_flight"], 0)
        self.assertEqual(
            sample(await status.metrics_text(), "buildcache_downloads_in_flight"), 0
        )

    async def test_evictions(self) -> None:
        """
        A store too small for two bodies evicts the older one, and says so.
        """
        status = start_status_server(
            self, package_upstream(**{"other-1.0-r0.apk": pattern_bytes(150_000, b"o")}),
            {"max_size": 200_000},
        )
        await status.get(PACKAGE)
        await status.get("/up/files/other-1.0-r0.apk")
        stats = await status.stats()
        self.assertEqual(stats["store"]["evictions"], 1)
        self.assertGreater(stats["store"]["bytes_evicted"], 150_000)
        self.assertEqual(stats["store"]["entries"], 1)
        self.assertEqual(
            stats["store"]["bytes_stored"], 150_000 + stats["store"]["bytes_metadata"]
        )
        self.assertEqual(stats["store"]["max_size"], 200_000)
        text = await status.metrics_text()
        self.assertEqual(sample(text, "buildcache_evictions_total"), 1)
        self.assertEqual(
            sample(text, "buildcache_evicted_bytes_total"), stats["store"]["bytes_evicted"]
        )
        self.assertEqual(sample(text, "buildcache_store_entries"), 1)
        page = parse_page(self, await status.page_html())
        self.assertIn("Evictions 1", page.text("evictions"))

    async def test_pip_index_counted(self) -> None:
        """
        Project pages served by the pip index count under its own front end
        and name the project in the most-requested table.
        """
        fixture = build_index(self.mktemp())
        index_port = listen(StaticSimpleIndex(fixture))
        self.addCleanup(index_port.stopListening)
        status = start_status_server(
            self, config_changes={"pypi_upstreams": (url_of(index_port, "/simple"),)}
        )
        for _ in range(2):
            received = await status.client.get(
                f"http://127.0.0.1:{status.running.index_port}/simple/bcdemo-a/"
            )
            self.assertEqual(received.status, 200, received.body)
        stats = await status.stats()
        index = stats["front_ends"]["index"]
        self.assertEqual(index["label"], "pip index")
        self.assertEqual(index["requests"], 2)
        self.assertEqual(index["hit_ratio"], 0.5)
        self.assertEqual(stats["top"]["index"], [{"name": "bcdemo-a", "requests": 2}])
        self.assertIn(
            'buildcache_requests_total{cache_status="MISS",front_end="index"} 1.0',
            await status.metrics_text(),
        )

    async def test_page_shows_figures(self) -> None:
        """
        The page carries the served figures, the chart with both series
        off the baseline, and is well-formed.
        """
        status = start_status_server(self, package_upstream())
        await status.get(PACKAGE)
        for _ in range(3):
            await status.get(PACKAGE)
        page = parse_page(self, await status.page_html())
        self.assertEqual(page.text("hit-ratio"), "Hit ratio: 75.0%")
        self.assertIn(human_bytes(3 * len(BODY)), page.text("bytes-saved"))
        self.assertEqual(human_bytes(3 * len(BODY)), "439.5 KiB")
        stored = (await status.stats())["store"]["bytes_stored"]
        self.assertIn(f"{human_bytes(stored)} of 10 GiB", page.text("cache-fill"))
        self.assertIn("curl-8.5.0-r0.apk 4", page.text("top-mirror"))
        self.assertIn("75.0%", page.text("front-end-mirror"))
        self.assertIn(url_of_upstream(status), page.text("upstreams"))
        self.assertEqual(page.by_id["traffic-chart"][0], "svg")
        cache_heights = step_heights(page.attribute("chart-from-cache", "d"))
        upstream_heights = step_heights(page.attribute("chart-from-upstream", "d"))
        self.assertEqual(len(cache_heights), BUCKETS)
        self.assertLess(cache_heights[-1], upstream_heights[-1])
        self.assertLess(upstream_heights[-1], 1000)
        self.assertEqual(set(cache_heights[:-1]), {1000})

    async def test_responses(self) -> None:
        """
        Each path has its content type and is never cached; HEAD sends no
        body; other methods and paths are refused.
        """
        status = start_status_server(self)
        expected = {
            "/": "text/html; charset=utf-8",
            "/-/stats.json": "application/json",
            "/-/metrics": prometheus_client.CONTENT_TYPE_LATEST,
        }
        for path, content_type in expected.items():
            received = await status.client.get(status.status_url(path))
            self.assertEqual(received.status, 200)
            self.assertEqual(received.header("content-type"), content_type)
            self.assertEqual(received.header("cache-control"), "no-store")
            self.assertTrue(received.complete)
            head = await status.client.get(status.status_url(path), method=b"HEAD")
            self.assertEqual((head.status, head.body), (200, b""))
        page = await status.client.get(status.status_url("/"))
        self.assertIn("default-src 'none'", page.header("content-security-policy") or "")
        posted = await status.client.get(status.status_url("/-/metrics"), method=b"POST")
        self.assertEqual(posted.status, 405)
        self.assertEqual(posted.header("allow"), "GET, HEAD")
        missing = await status.client.get(status.status_url("/-/nothing"))
        self.assertEqual(missing.status, 404)


def url_of_upstream(status: StatusServer) -> str:
    [mirror] = status.running.server.config.mirrors
    return mirror.url.removeprefix("http://")


class PageTests(SynchronousTestCase):
    """
    The page and stats of an Activity fed directly, on a controlled clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = Config(
            cache_dir=self.mktemp(),
            mirrors=(Mirror("alpine", "http://127.0.0.1:1/alpine"),),
            pypi_upstreams=("https://127.0.0.1:2/simple",),
            # As the options give them, taken off the URLs.
            upstream_credentials=UpstreamCredentials.build([
                split_userinfo("http://mirror-user:hunter2@127.0.0.1:1/alpine"),
                split_userinfo("https://token:s3cret@127.0.0.1:2/simple"),
            ]),
            netrc_file="/etc/buildcache/netrc",
            allow_upstream=("*.example.org",),
            max_size=1024**3,
        )
        self.store = Store.open(self.config.cache_dir, self.config.max_size, self.clock)
        self.addCleanup(self.store.close)
        self.activity = Activity(self.clock)
        self.fetcher = NoDownloads()
        self.sources = SnapshotSources(
            self.config, self.store, self.fetcher, self.activity, self.clock
        )

    def stats(self) -> Snapshot:
        return self.sources.snapshot()

    def render_html(self) -> bytes:
        return render_page(self.sources.snapshot())

    def test_object_size_limit_shown(self) -> None:
        """
        The configuration block gives --max-object-size (0: the whole size
        limit).
        """
        page = parse_page(self, self.render_html())
        self.assertIn("Largest object stored 1 GiB", page.text("config"))
        self.assertEqual(self.stats()["config"]["max_object_size"], 0)
        self.sources.config = attrs.evolve(self.config, max_object_size=2 * 1024**2)
        page = parse_page(self, self.render_html())
        self.assertIn("Largest object stored 2 MiB", page.text("config"))

    def test_default_upstream_rule_shown(self) -> None:
        """
        Without --allow-upstream the configuration block says the forward
        proxy reaches any public host (it said "none", which reads as
        nothing allowed); with it, the patterns.
        """
        page = parse_page(self, self.render_html())
        self.assertIn("Proxy upstreams allowed *.example.org", page.text("config"))
        self.sources.config = attrs.evolve(self.config, allow_upstream=())
        page = parse_page(self, self.render_html())
        self.assertIn("Proxy upstreams allowed any public host", page.text("config"))

    def test_nothing_served(self) -> None:
        """
        A new server's page says there is no hit ratio yet and draws both
        series flat on the baseline.
        """
        page = parse_page(self, self.render_html())
        self.assertEqual(page.text("hit-ratio"), "Hit ratio: n/a (nothing served yet)")
        self.assertEqual(page.text("requests"), "Requests 0")
        for line in ("chart-from-cache", "chart-from-upstream"):
            self.assertEqual(set(step_heights(page.attribute(line, "d"))), {1000})
        self.assertEqual(page.text("traffic-empty"), "No traffic in the last 24 hours")
        self.assertIn("No upstream contacted yet.", page.text("upstreams"))
        self.assertIn("0 B of 1 GiB", page.text("cache-fill"))

    def test_evictions_and_read_ahead_shown(self) -> None:
        """
        Evictions and read-ahead show as the activity was told of them.
        """
        self.activity.evicted(2, 3 * 1024**2)
        self.activity.read_ahead_started()
        self.activity.read_ahead_started()
        self.activity.read_ahead_claimed()
        page = parse_page(self, self.render_html())
        self.assertEqual(
            page.text("evictions"), "Evictions 2 3 MiB freed to stay under the limit"
        )
        self.assertEqual(page.text("prefetches"), "Read ahead 2 1 asked for since")

    def test_chart_geometry(self) -> None:
        """
        Each series is drawn in its own five-minute bucket, scaled to a
        round maximum that labels the top gridline.
        """
        finished(self.activity, "mirror", "a.apk", "HIT", 4000)
        self.clock.advance(3600)
        # The upstream series is what crossed the line, not what was sent.
        self.activity.upstream_received("mirror", 1000)
        finished(self.activity, "mirror", "b.apk", "MISS", 10)
        document = self.render_html()
        page = parse_page(self, document)
        cache = step_heights(page.attribute("chart-from-cache", "d"))
        upstream = step_heights(page.attribute("chart-from-upstream", "d"))
        # 4000 B rounds up to a 4 KiB scale; the hit was 12 buckets ago.
        self.assertEqual(cache[BUCKETS - 13], round(1000 - 1000 * 4000 / 4096, 1))
        self.assertEqual(upstream[BUCKETS - 1], round(1000 - 1000 * 1000 / 4096, 1))
        self.assertEqual(sum(1 for h in cache if h != 1000), 1)
        self.assertEqual(sum(1 for h in upstream if h != 1000), 1)
        chart = document.decode()
        chart = chart[chart.index('<svg id="traffic-chart"'):chart.index("</svg>\n</section>")]
        for label in ("4 KiB", "2 KiB", "0 B", "now", "From cache", "From upstream"):
            self.assertIn(f">{label}</text>", chart)
        self.assertNotIn("traffic-empty", page.by_id)
        stats = self.stats()
        self.assertEqual(stats["traffic"]["buckets"][BUCKETS - 13]["from_cache"], 4000)
        self.assertEqual(stats["traffic"]["buckets"][BUCKETS - 1]["from_upstream"], 1000)

    def test_front_ends_and_totals(self) -> None:
        """
        Totals add up the front ends; each front end has its own ratio and
        bytes; refusals count as errors but not against the hit ratio.
        """
        # A range of 100 bytes from a 300-byte download (counted as it
        # arrived, once), then the whole file from the cache.
        self.activity.upstream_received("proxy", 300)
        finished(self.activity, "proxy", "libc6_2.36.deb", "MISS", 100)
        finished(self.activity, "proxy", "libc6_2.36.deb", "HIT", 300)
        finished(self.activity, "proxy", None, None, 20, code=403)
        finished(self.activity, "index", "numpy", "REVALIDATED", 50)
        finished(self.activity, "index", "numpy", "STALE", 50)
        stats = self.stats()
        self.assertEqual(stats["requests"], 5)
        self.assertEqual(stats["errors"], 1)
        self.assertEqual(stats["hit_ratio"], 3 / 4)
        self.assertEqual(stats["bytes_from_cache"], 400)
        self.assertEqual(stats["bytes_from_upstream"], 300)
        self.assertEqual(stats["bytes_saved"], 400)
        self.assertEqual(stats["front_ends"]["proxy"]["bytes_from_upstream"], 300)
        self.assertEqual(stats["front_ends"]["proxy"]["hit_ratio"], 0.5)
        self.assertEqual(stats["front_ends"]["index"]["hit_ratio"], 1.0)
        self.assertEqual(stats["front_ends"]["proxy"]["by_status"]["none"], 1)
        self.assertEqual(stats["front_ends"]["mirror"]["hit_ratio"], None)
        page = parse_page(self, self.render_html())
        self.assertEqual(page.text("hit-ratio"), "Hit ratio: 75.0%")
        self.assertIn("apk/apt proxy", page.text("front-end-proxy"))
        self.assertIn("Errors 1", page.text("front-end-proxy"))
        self.assertIn("pip index", page.text("front-end-index"))
        self.assertIn("Revalidated / stale 1 / 1", page.text("front-end-index"))
        self.assertIn("numpy 2", page.text("top-index"))
        self.assertIn("Nothing yet.", page.text("top-mirror"))

    def test_top_names_limited_and_ordered(self) -> None:
        """
        Each front end lists its 15 most requested names, most requested
        first.
        """
        for rank in range(20):
            for _ in range(100 - rank):
                finished(self.activity, "mirror", f"pkg{rank:02d}.apk", "HIT", 1)
        top = self.stats()["top"]["mirror"]
        self.assertEqual(len(top), 15)
        self.assertEqual(top[0], {"name": "pkg00.apk", "requests": 100})
        self.assertEqual(top[-1], {"name": "pkg14.apk", "requests": 86})

    def test_credentials_redacted(self) -> None:
        """
        Credentials in configured URLs and in upstream error messages
        appear on neither the page nor in the stats.
        """
        self.activity.upstream_failed(
            "http://mirror-user:hunter2@127.0.0.1:1/alpine/x",
            "GET http://mirror-user:hunter2@127.0.0.1:1/alpine/x: connection refused",
        )
        for document in (
            self.render_html().decode(), json.dumps(self.stats())
        ):
            for secret in ("hunter2", "s3cret", "mirror-user", "token:"):
                self.assertNotIn(secret, document)
            self.assertIn("http://***@127.0.0.1:1/alpine", document)
            self.assertIn("https://***@127.0.0.1:2/simple", document)
        page = parse_page(self, self.render_html())
        self.assertIn(
            "GET http://***@127.0.0.1:1/alpine/x: connection refused",
            page.text("upstreams"),
        )
        config = page.text("config")
        self.assertIn("*.example.org", config)
        self.assertIn("/etc/buildcache/netrc", config)
        self.assertIn("127.0.0.0/8", config)
        self.assertIn("1 GiB", config)

    def test_text_escaped(self) -> None:
        """
        Names and messages from the network are shown as text, never as
        markup.
        """
        hostile = '<img src=x onerror="alert(1)">'
        finished(self.activity, "index", hostile, "MISS", 1)
        self.activity.upstream_failed("http://127.0.0.1:3/", hostile)
        document = self.render_html()
        page = parse_page(self, document)
        self.assertNotIn("img", page.tags)
        self.assertNotIn(b"<img", document)
        self.assertIn(hostile, page.text("top-index"))
        self.assertIn(hostile, page.text("upstreams"))

    def test_uptime_and_in_flight(self) -> None:
        """
        The header says how long the server has run and how many downloads
        are under way.
        """
        self.clock.advance(3 * 3600 + 12 * 60)
        self.fetcher.running = 2
        stats = self.stats()
        self.assertEqual(stats["uptime_seconds"], 3 * 3600 + 12 * 60)
        self.assertEqual(stats["downloads_in_flight"], 2)
        document = self.render_html().decode()
        self.assertIn("up 3 h 12 min · 2 downloads in flight", document)

    def test_upstream_health_state(self) -> None:
        """
        An upstream whose last word was an error is marked failing until it
        answers again.
        """
        self.activity.upstream_succeeded("http://127.0.0.1:4/a", 0.1)
        self.clock.advance(10)
        self.activity.upstream_failed("http://127.0.0.1:4/a", "timed out")
        self.activity.stale_served("http://127.0.0.1:4/a")
        document = self.render_html().decode()
        self.assertIn('<tr class="failing">', document)
        self.assertIn('data-label="Stale answers served">1</td>', document)
        self.clock.advance(10)
        self.activity.upstream_succeeded("http://127.0.0.1:4/a", 0.1)
        document = self.render_html().decode()
        self.assertIn('<tr class="healthy">', document)
        self.assertNotIn('<tr class="failing">', document)


class MetricsTests(SynchronousTestCase):
    """
    The metrics of a snapshot on their own.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = Store.open(self.mktemp(), 1024**2, self.clock)
        self.addCleanup(self.store.close)
        self.activity = Activity(self.clock)

    def metrics_of(self, activity: Activity) -> tuple[str, str]:
        sources = SnapshotSources(
            Config(cache_dir=self.mktemp()), self.store, NoDownloads(), activity, self.clock
        )
        text, content_type = render_metrics(sources.snapshot())
        return text.decode(), content_type

    def test_private_registries(self) -> None:
        """
        Two servers in one process keep separate metrics, and the global
        registry holds none of them.
        """
        other_activity = Activity(self.clock)
        finished(self.activity, "proxy", "a.apk", "HIT", 10)
        first_text = self.metrics_of(self.activity)[0]
        second_text = self.metrics_of(other_activity)[0]
        self.assertEqual(
            sample(first_text, "buildcache_requests_total", cache_status="HIT",
                   front_end="proxy"), 1,
        )
        self.assertEqual(
            sample(second_text, "buildcache_requests_total", cache_status="HIT",
                   front_end="proxy"), 0,
        )
        self.assertNotIn(
            "buildcache_requests",
            prometheus_client.generate_latest(prometheus_client.REGISTRY).decode(),
        )

    def test_latency_histogram(self) -> None:
        """
        Upstream latencies reported to the activity land in the histogram's
        buckets.
        """
        self.activity.upstream_succeeded("http://127.0.0.1:5/x", 0.2)
        self.activity.upstream_succeeded("http://127.0.0.1:5/y", 3.0)
        decoded, content_type = self.metrics_of(self.activity)
        self.assertEqual(content_type, prometheus_client.CONTENT_TYPE_LATEST)
        name = "buildcache_upstream_latency_seconds"
        self.assertEqual(sample(decoded, f"{name}_bucket", le="0.1"), 0)
        self.assertEqual(sample(decoded, f"{name}_bucket", le="0.25"), 1)
        self.assertEqual(sample(decoded, f"{name}_bucket", le="5.0"), 2)
        self.assertEqual(sample(decoded, f"{name}_bucket", le="+Inf"), 2)
        self.assertEqual(sample(decoded, f"{name}_count"), 2)
        self.assertAlmostEqual(sample(decoded, f"{name}_sum"), 3.2)
        self.assertEqual(
            sample(decoded, "buildcache_upstream_successes_total", host="127.0.0.1:5"), 2
        )
        self.assertEqual(
            sample(decoded,
                   "buildcache_upstream_last_success_timestamp_seconds",
                   host="127.0.0.1:5"),
            self.clock.seconds(),
        )

    def test_read_ahead_and_evictions(self) -> None:
        """
        Read-ahead and evictions are counted from what the activity was
        told, under the metric names the store's counters had.
        """
        self.activity.read_ahead_started()
        self.activity.read_ahead_started()
        self.activity.read_ahead_claimed()
        self.activity.evicted(3, 3000)
        decoded = self.metrics_of(self.activity)[0]
        self.assertEqual(sample(decoded, "buildcache_prefetches_total"), 2)
        self.assertEqual(sample(decoded, "buildcache_prefetch_hits_total"), 1)
        self.assertEqual(sample(decoded, "buildcache_evictions_total"), 3)
        self.assertEqual(sample(decoded, "buildcache_evicted_bytes_total"), 3000)


class FormattingTests(SynchronousTestCase):
    def test_human_bytes(self) -> None:
        self.assertEqual(human_bytes(0), "0 B")
        self.assertEqual(human_bytes(1023), "1023 B")
        self.assertEqual(human_bytes(1536), "1.5 KiB")
        self.assertEqual(human_bytes(10 * 1024**3), "10 GiB")
        self.assertEqual(human_bytes(3 * 1024**5), "3 PiB")

    def test_human_duration(self) -> None:
        self.assertEqual(human_duration(42), "42 s")
        self.assertEqual(human_duration(300), "5 min")
        self.assertEqual(human_duration(3 * 3600 + 12 * 60), "3 h 12 min")
        self.assertEqual(human_duration(2 * 86400 + 4 * 3600), "2 d 4 h")

    def test_redact_text(self) -> None:
        self.assertEqual(
            redact_text("GET https://u:p@127.0.0.1:8/x failed; see http://127.0.0.1/"),
            "GET https://***@127.0.0.1:8/x failed; see http://127.0.0.1/",
        )

    def test_percent(self) -> None:
        self.assertEqual(percent(None), "n/a")
        self.assertEqual(percent(0.0), "0.0%")
        self.assertEqual(percent(0.75), "75.0%")
        self.assertEqual(percent(1.4e-5), "<0.1%")

    def test_chart_scale(self) -> None:
        """
        The chart's maximum is the next round value in the largest unit
        that keeps it at most 1000, so gridline labels stay short.
        """
        self.assertEqual(nice_maximum(0), (4.0, "B"))
        self.assertEqual(nice_maximum(7), (8.0, "B"))
        self.assertEqual(nice_maximum(999), (1000.0, "B"))
        self.assertEqual(nice_maximum(4000), (4096.0, "KiB"))
        self.assertEqual(nice_maximum(450_000), (600 * 1024.0, "KiB"))
        self.assertEqual(nice_maximum(3 * 1024**3 + 1), (4 * 1024.0**3, "GiB"))


class RoutingTests(TestCase):
    async def test_status_on_both_ports(self) -> None:
        """
        The page, the JSON and the metrics answer on the proxy port and on
        the index port, and are not counted in the figures they show.
        """
        from tests.support import Client, start_server

        running = start_server(self)
        client = Client()
        for port in (running.proxy_port, running.index_port):
            page = await client.get(f"http://127.0.0.1:{port}/")
            self.assertEqual(page.status, 200)
            self.assertTrue(page.header("content-type").startswith("text/html"))
            self.assertIn(b'id="hit-ratio"', page.body)
            stats = await client.get(f"http://127.0.0.1:{port}/-/stats.json")
            self.assertEqual(stats.header("content-type"), "application/json")
            metrics = await client.get(f"http://127.0.0.1:{port}/-/metrics")
            self.assertIn(b"buildcache_store_entries", metrics.body)
        self.assertEqual(
            sum(t.requests for t in running.server.activity.totals.values()), 0
        )
