"""
The registry front end in operations: its requests, hits and bytes on the
status page, in ``/-/stats.json`` and in the metrics (from Exchange
records, as the engine reports them, and through a real server); the
front ends' one table; the images stored by tag, read from the store's
keys; the registry port's configuration shown without secrets.
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.config import Config, Registry
from buildcache.credentials import Credentials
from buildcache.ops import images as images_module
from buildcache.ops.activity import Activity
from buildcache.ops.combine import combine
from buildcache.ops.front_ends import FRONT_END_TABLE, FRONT_ENDS
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.registry_keys import parse_key
from buildcache.ops.snapshot import Snapshot, SnapshotSources
from buildcache.store import Store
from tests.oci_origin import ALL_MANIFESTS, OciOrigin, start_origin
from tests.support import Client, pattern_bytes, reactor, start_server
from tests.test_admin import run
from tests.test_cli_registry import APP, APP_MANIFEST, STORED, store_bodies
from tests.test_status import NoDownloads, finished, parse_page, sample


def exchange(
    activity: Activity, name: str | None, cache_status: str | None, size: int,
    code: int = 200,
) -> None:
    finished(activity, "registry", name, cache_status, size, code)


class FiguresTests(SynchronousTestCase):
    """
    The registry's requests, fed to an Activity as the engine reports
    them, in the snapshot, on the page and in the metrics.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = Config(cache_dir=self.mktemp(), max_size=1 << 30)
        self.store = Store.open(self.config.cache_dir, self.config.max_size, self.clock)
        self.addCleanup(self.store.close)
        self.activity = Activity(self.clock)
        self.sources = SnapshotSources(
            self.config, self.store, NoDownloads(), self.activity, self.clock
        )

    def feed(self) -> None:
        self.activity.upstream_received("registry", 5000)
        exchange(self.activity, "docker.io/library/alpine", "MISS", 5000)
        exchange(self.activity, "docker.io/library/alpine", "HIT", 5000)
        exchange(self.activity, "docker.io/library/alpine", "STALE", 300)
        exchange(self.activity, "127.0.0.1:5001/team/app", "HIT", 700)
        exchange(self.activity, "docker.io/library/nope", None, 90, code=404)
        finished(self.activity, "proxy", "curl.apk", "HIT", 11)

    def test_every_front_end_from_the_table(self) -> None:
        """
        The accounts, the snapshot's front ends and most-requested lists,
        the page's cards and the metrics all come from the one table, the
        registry among them, with zero figures before any request.
        """
        self.assertIn("registry", FRONT_ENDS)
        snapshot = self.sources.snapshot()
        self.assertEqual(list(snapshot["front_ends"]), list(FRONT_ENDS))
        self.assertEqual(list(snapshot["top"]), list(FRONT_ENDS))
        page = parse_page(self, render_page(snapshot))
        text = render_metrics(snapshot)[0].decode()
        for front_end in FRONT_END_TABLE:
            self.assertEqual(snapshot["front_ends"][front_end.name]["label"], front_end.label)
            self.assertIn(front_end.label, page.text(f"front-end-{front_end.name}"))
            self.assertIn("Nothing yet.", page.text(f"top-{front_end.name}"))
            self.assertEqual(
                sample(text, "buildcache_request_errors_total", front_end=front_end.name), 0
            )

    def test_stats(self) -> None:
        """
        ``/-/stats.json`` counts the registry's requests by cache status,
        its bytes saved and fetched, its errors and its repositories, and
        adds them into the totals.
        """
        self.feed()
        snapshot = self.sources.snapshot()
        registry = snapshot["front_ends"]["registry"]
        self.assertEqual(registry["label"], "container registry")
        self.assertEqual(registry["requests"], 5)
        self.assertEqual(
            {status: registry["by_status"][status] for status in ("HIT", "MISS", "STALE", "none")},
            {"HIT": 2, "MISS": 1, "STALE": 1, "none": 1},
        )
        self.assertEqual(registry["errors"], 1)
        self.assertEqual(registry["bytes_saved"], 6000)
        self.assertEqual(registry["bytes_from_upstream"], 5000)
        self.assertEqual(registry["bytes_sent_on_miss"], 5000)
        self.assertEqual(registry["hit_ratio"], 3 / 4)
        self.assertEqual(snapshot["requests"], 6)
        self.assertEqual(snapshot["bytes_saved"], 6011)
        # The failed request's repository is not among the most requested.
        self.assertEqual(snapshot["top"]["registry"], [
            {"name": "docker.io/library/alpine", "requests": 3},
            {"name": "127.0.0.1:5001/team/app", "requests": 1},
        ])
        self.assertEqual(json.loads(json.dumps(snapshot)), snapshot)

    def test_page(self) -> None:
        """
        The page has a card for the registry and its most requested
        repositories.
        """
        self.feed()
        page = parse_page(self, render_page(self.sources.snapshot()))
        card = page.text("front-end-registry")
        self.assertIn("container registry", card)
        self.assertIn("Hit ratio 75.0%", card)
        self.assertIn("Bytes saved 5.9 KiB", card)
        self.assertIn("Requests 5", card)
        self.assertIn("HIT / MISS 2 / 1", card)
        self.assertIn("Errors 1", card)
        self.assertEqual(
            page.text("top-registry"),
            "container registry docker.io/library/alpine 3 127.0.0.1:5001/team/app 1",
        )

    def test_metrics(self) -> None:
        """
        The metrics label the registry's requests and bytes by its name.
        """
        self.feed()
        text = render_metrics(self.sources.snapshot())[0].decode()
        for status, count in (("HIT", 2), ("MISS", 1), ("STALE", 1), ("none", 1)):
            self.assertEqual(
                sample(text, "buildcache_requests_total", front_end="registry",
                       cache_status=status),
                count,
            )
        self.assertEqual(
            sample(text, "buildcache_bytes_served_total", front_end="registry",
                   source="cache"),
            6000,
        )
        self.assertEqual(
            sample(text, "buildcache_upstream_bytes_total", front_end="registry"), 5000
        )
        self.assertEqual(
            sample(text, "buildcache_request_errors_total", front_end="registry"), 1
        )

    def test_configuration_without_secrets(self) -> None:
        """
        The configuration block names the registry port, its registries
        (one sent credentials is marked ``***@``) and the credentials
        files; no user name or password shows in the page, the stats or
        the metrics.
        """
        self.sources.config = Config(
            cache_dir=self.config.cache_dir,
            registry_endpoint="tcp:5000:interface=127.0.0.1",
            registries=(
                Registry("docker.io", "http://127.0.0.1:1"),
                Registry("127.0.0.1:5001", "http://127.0.0.1:2",
                         Credentials("robot-user", "hunter2-pw")),
            ),
            registry_auth_files=("/etc/buildcache/registry-auth",),
        )
        snapshot = self.sources.snapshot()
        self.assertEqual(snapshot["config"]["registries"], [
            {"name": "docker.io", "url": "http://127.0.0.1:1"},
            {"name": "127.0.0.1:5001", "url": "http://***@127.0.0.1:2"},
        ])
        rendered = render_page(snapshot)
        page = parse_page(self, rendered)
        config = page.text("config")
        self.assertIn("Registry port tcp:5000:interface=127.0.0.1", config)
        self.assertIn(
            "Registries docker.io → http://127.0.0.1:1 127.0.0.1:5001 → http://***@127.0.0.1:2",
            config,
        )
        self.assertIn("/etc/buildcache/registry-auth", config)
        for document in (
            rendered.decode(), json.dumps(snapshot), render_metrics(snapshot)[0].decode()
        ):
            for secret in ("robot-user", "hunter2-pw"):
                self.assertNotIn(secret, document)
        self.sources.config = self.config
        self.assertIn("Registry port off", parse_page(self, render_page(
            self.sources.snapshot())).text("config"))

    def test_processes_combined(self) -> None:
        """
        Two processes' registry figures add up; the images stored (one
        store) are the first's.
        """
        worker = Activity(self.clock)
        exchange(self.activity, "docker.io/library/alpine", "HIT", 10)
        exchange(worker, "docker.io/library/alpine", "HIT", 20)
        worker_sources = SnapshotSources(
            self.config, self.store, None, worker, self.clock
        )
        combined = combine([self.sources.snapshot(), worker_sources.snapshot()])
        self.assertEqual(combined["front_ends"]["registry"]["requests"], 2)
        self.assertEqual(combined["front_ends"]["registry"]["bytes_saved"], 30)
        self.assertEqual(
            combined["top"]["registry"], [{"name": "docker.io/library/alpine", "requests": 2}]
        )
        self.assertEqual(combined["registry"], self.sources.snapshot()["registry"])


class StoredImagesTests(SynchronousTestCase):
    """
    The images stored by tag, read from a store's keys.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = Config(cache_dir=os.path.abspath(self.mktemp()), max_size=1 << 30)
        store_bodies(self.config.cache_dir, STORED, self.clock)
        self.store = Store.open(self.config.cache_dir, self.config.max_size, self.clock)
        self.addCleanup(self.store.close)
        self.sources = SnapshotSources(
            self.config, self.store, NoDownloads(), Activity(self.clock), self.clock
        )

    def snapshot(self) -> Snapshot:
        return self.sources.snapshot()

    def test_tags_by_repository(self) -> None:
        """
        Each repository with its tags stored (a tag stored for several
        clients' Accept counts once); digests, blobs, lists and other
        front ends' keys are no tags.
        """
        registry = self.snapshot()["registry"]
        self.assertEqual(registry, {
            "repositories": 4,
            "tags": 5,
            "complete": True,
            "listed": [
                {"name": "127.0.0.1:5001/library/alpine", "tags": ["3.19"], "more_tags": 0},
                {"name": "127.0.0.1:5001/team/app", "tags": ["v1"], "more_tags": 0},
                {"name": "docker.io/library/alpine", "tags": ["3.19", "latest"],
                 "more_tags": 0},
                {"name": "docker.io/library/alpine/extra", "tags": ["3.19"],
                 "more_tags": 0},
            ],
        })
        page = parse_page(self, render_page(self.snapshot()))
        self.assertEqual(page.text("registry-summary"), "4 repositories, 5 tags")
        self.assertIn("docker.io/library/alpine 3.19 latest", page.text("registry-images"))
        text = render_metrics(self.snapshot())[0].decode()
        self.assertEqual(sample(text, "buildcache_registry_repositories"), 4)
        self.assertEqual(sample(text, "buildcache_registry_tags"), 5)

    def test_follows_the_store(self) -> None:
        """
        A tag stored, or purged, since the last snapshot shows in the
        next one (the reading is reused only while the store is the same).
        """
        self.assertEqual(self.snapshot()["registry"]["tags"], 5)
        writer = self.store.writer(f"{APP}/manifests/v2")
        writer.write(APP_MANIFEST)
        writer.commit({})
        self.assertEqual(
            self.snapshot()["registry"]["listed"][1],
            {"name": "127.0.0.1:5001/team/app", "tags": ["v1", "v2"], "more_tags": 0},
        )
        self.assertEqual(run("purge", "--image", "alpine", "--cache-dir",
                             self.config.cache_dir)[0], 0)
        # The writing store learns of another process's removals at its
        # next flush (a timer in the server).
        self.store.flush()
        names = [image["name"] for image in self.snapshot()["registry"]["listed"]]
        self.assertNotIn("docker.io/library/alpine", names)

    def test_bounded(self) -> None:
        """
        The listing holds at most so many repositories and tags of each,
        saying how many more; past the keys read it says the counts are
        lower bounds.
        """
        self.patch(images_module, "REPOSITORIES_LISTED", 2)
        self.patch(images_module, "TAGS_LISTED", 1)
        registry = self.snapshot()["registry"]
        self.assertEqual((registry["repositories"], registry["tags"]), (4, 5))
        self.assertEqual(
            [(image["name"], image["tags"], image["more_tags"])
             for image in registry["listed"]],
            [("127.0.0.1:5001/library/alpine", ["3.19"], 0),
             ("127.0.0.1:5001/team/app", ["v1"], 0)],
        )
        self.patch(images_module, "REPOSITORIES_LISTED", 3)
        self.clock.advance(images_module.TAGS_REREAD_SECONDS)
        registry = self.snapshot()["registry"]
        self.assertEqual(registry["listed"][2]["tags"], ["3.19"])
        self.assertEqual(registry["listed"][2]["more_tags"], 1)
        page = parse_page(self, render_page(self.snapshot()))
        self.assertIn("and 1 more", page.text("registry-images"))
        self.assertIn("and 1 more repositories", page.text("registry-images"))

        self.patch(images_module, "TAG_KEYS_READ", 3)
        self.clock.advance(images_module.TAGS_REREAD_SECONDS)
        registry = self.snapshot()["registry"]
        self.assertFalse(registry["complete"])
        # The first three keys in key order.
        self.assertEqual((registry["repositories"], registry["tags"]), (3, 3))
        page = parse_page(self, render_page(self.snapshot()))
        self.assertEqual(
            page.text("registry-summary"),
            "at least 3 repositories, 3 tags (more are stored than one reading lists)",
        )

    def test_keys_matching(self) -> None:
        """
        The store lists keys under a prefix by glob, without those of the
        excluding glob, in key order, at most so many.
        """
        tags = self.store.keys_matching("oci:", "*/manifests/*", 10, exclude="*/manifests/*:*")
        self.assertEqual(tags, sorted(
            key for key in STORED
            if (parsed := parse_key(key)) is not None and parsed.tag is not None
        ))
        self.assertEqual(len(tags), 6)
        self.assertEqual(self.store.keys_matching("oci:", "*/manifests/*", 2,
                                                  exclude="*/manifests/*:*"), tags[:2])
        self.assertEqual(
            self.store.keys_matching(f"{APP}/", "*", 10),
            sorted(key for key in STORED if key.startswith(f"{APP}/")),
        )
        self.assertEqual(self.store.keys_matching("simple-page|", "*oci:*", 10), [])

    def test_nothing_stored(self) -> None:
        config = Config(cache_dir=self.mktemp())
        store = Store.open(config.cache_dir, 1 << 20, self.clock)
        self.addCleanup(store.close)
        snapshot = SnapshotSources(
            config, store, None, Activity(self.clock), self.clock
        ).snapshot()
        self.assertEqual(
            snapshot["registry"],
            {"repositories": 0, "tags": 0, "complete": True, "listed": []},
        )
        page = parse_page(self, render_page(snapshot))
        self.assertEqual(
            page.text("registry-images"),
            "Container images stored by tag No image stored by tag yet.",
        )

    def test_names_escaped(self) -> None:
        """
        Tags and names go through HTML escaping (keys are written by the
        front end, but the page trusts nothing).
        """
        rendered = render_page({
            **self.snapshot(),
            "registry": {
                "repositories": 1, "tags": 1, "complete": True,
                "listed": [{"name": "r/<b>", "tags": ["<i>"], "more_tags": 0}],
            },
        }).decode()
        self.assertNotIn("<b>", rendered)
        self.assertNotIn("<i>", rendered)
        self.assertIn("r/&lt;b&gt;", rendered)


class ServedTests(TestCase):
    """
    A real server's registry port in front of an origin, and its status
    figures and a purge of what it stored.
    """

    async def test_pulls_counted_listed_and_purged(self) -> None:
        origin = OciOrigin()
        origin_url = start_origin(self, origin)
        image = origin.push_image("team/app", "t1", [pattern_bytes(50_000, b"l1")])
        running = start_server(self, {
            "registries": (
                Registry("docker.io", origin_url), Registry("127.0.0.1:5001", origin_url),
            ),
        })
        port = reactor.listenTCP(0, running.server.registry_site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = Client()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        registry = f"http://127.0.0.1:{address.port}"
        manifest = f"{registry}/v2/team/app/manifests/t1?ns=127.0.0.1:5001"
        blob = f"{registry}/v2/team/app/blobs/{image.layers[0]}?ns=127.0.0.1:5001"
        for url in (manifest, manifest, blob, blob):
            got = await client.get(url, {"accept": ALL_MANIFESTS})
            self.assertEqual(got.status, 200)
        missing = await client.get(f"{registry}/v2/team/app/manifests/nope?ns=127.0.0.1:5001")
        self.assertEqual(missing.status, 404)

        status = f"http://127.0.0.1:{running.proxy_port}"
        stats = json.loads((await client.get(f"{status}/-/stats.json")).body)
        figures = stats["front_ends"]["registry"]
        self.assertEqual(figures["requests"], 5)
        # The unknown tag is answered with the spec's error, no X-Cache.
        self.assertEqual(
            {status: figures["by_status"][status] for status in ("MISS", "HIT", "none")},
            {"MISS": 2, "HIT": 2, "none": 1},
        )
        self.assertEqual(figures["errors"], 1)
        self.assertEqual(figures["bytes_saved"], len(image.manifest) + 50_000)
        self.assertEqual(
            stats["top"]["registry"], [{"name": "127.0.0.1:5001/team/app", "requests": 4}]
        )
        self.assertEqual(stats["registry"]["listed"], [
            {"name": "127.0.0.1:5001/team/app", "tags": ["t1"], "more_tags": 0},
        ])
        metrics = (await client.get(f"{status}/-/metrics")).body.decode()
        self.assertEqual(
            sample(metrics, "buildcache_requests_total", front_end="registry",
                   cache_status="HIT"),
            2,
        )
        page = parse_page(self, (await client.get(f"{status}/")).body)
        self.assertIn("127.0.0.1:5001/team/app t1", page.text("registry-images"))

        # The tag purged beside the running server: the next pull of it
        # goes upstream again, the blob is still a hit.
        code, out, _ = run(
            "purge", "--image", "127.0.0.1:5001/team/app:t1",
            "--cache-dir", running.server.config.cache_dir,
        )
        self.assertEqual(code, 0)
        self.assertIn("Removed 1 entry,", out)
        running.store.flush()
        again = await client.get(manifest, {"accept": ALL_MANIFESTS})
        self.assertEqual((again.status, again.header("x-cache")), (200, "MISS"))
        self.assertEqual(origin.requests[("GET", "/v2/team/app/manifests/t1")], 2)
        self.assertEqual((await client.get(blob)).header("x-cache"), "HIT")
