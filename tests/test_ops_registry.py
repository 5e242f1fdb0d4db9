"""
The registry front end in operations: its requests, hits and bytes on the
status page, in ``/-/stats.json`` and in the metrics (from Exchange
records, as the engine reports them); the images stored by tag, read from
the store's keys; ``buildcache purge --image`` removing exactly a
repository's or a tag's rows and files; ``stats`` and ``verify`` on
registry keys; and the key and image-name parsing underneath.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import Config
from buildcache.ecosystems.oci.names import parse_request
from buildcache.ops import images as images_module
from buildcache.ops.activity import Activity
from buildcache.ops.cli_keys import entry_kind, key_matcher
from buildcache.ops.combine import combine
from buildcache.ops.front_ends import FRONT_END_TABLE, FRONT_ENDS
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.registry_keys import (
    ImageName,
    RegistryKey,
    digest_mismatch,
    parse_image,
    parse_key,
    stored_tags,
)
from buildcache.ops.snapshot import Snapshot, SnapshotSources
from buildcache.store import Store
from tests.test_admin import object_files, run, stored_keys
from tests.test_status import NoDownloads, finished, parse_page, sample


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


LAYER = b"layer of alpine"
CONFIG_BLOB = b'{"architecture":"amd64"}'
INDEX = b'{"mediaType":"application/vnd.oci.image.index.v1+json"}'
MANIFEST = b'{"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
APP_MANIFEST = b'{"app":1}'

ALPINE = "oci:docker.io/library/alpine"
#: A repository whose name starts with alpine's and one path component more.
NESTED = "oci:docker.io/library/alpine/extra"
#: The same repository name on another registry.
OTHER_REGISTRY = "oci:127.0.0.1:5001/library/alpine"
APP = "oci:127.0.0.1:5001/team/app"
ACCEPT = ";accept=docker-manifest,oci-manifest"

#: Key to body: every kind of registry key, and the other front ends'.
STORED: dict[str, bytes] = {
    f"{ALPINE}/manifests/3.19": INDEX,
    f"{ALPINE}/manifests/3.19{ACCEPT}": MANIFEST,
    f"{ALPINE}/manifests/latest": INDEX,
    f"{ALPINE}/manifests/{digest_of(INDEX)}": INDEX,
    f"{ALPINE}/manifests/{digest_of(MANIFEST)}": MANIFEST,
    f"{ALPINE}/blobs/{digest_of(LAYER)}": LAYER,
    f"{ALPINE}/blobs/{digest_of(CONFIG_BLOB)}": CONFIG_BLOB,
    f"{ALPINE}/tags/list": b'{"tags":["3.19","latest"]}',
    f"{ALPINE}/tags/list?n=10": b'{"tags":["3.19"]}',
    f"{ALPINE}/referrers/{digest_of(INDEX)}?artifactType=application/vnd.x": b"{}",
    f"{NESTED}/manifests/3.19": MANIFEST,
    f"{NESTED}/blobs/{digest_of(LAYER)}": LAYER,
    f"{OTHER_REGISTRY}/manifests/3.19": MANIFEST,
    f"{OTHER_REGISTRY}/blobs/{digest_of(LAYER)}": LAYER,
    f"{APP}/manifests/v1": APP_MANIFEST,
    f"{APP}/manifests/{digest_of(APP_MANIFEST)}": APP_MANIFEST,
    "https://mirror.test/alpine/v3.19/main/x86_64/curl-8.5.0-r0.apk": b"apk",
    "http://deb.test/debian/pool/main/c/curl/curl_7.88.1-10_amd64.deb": b"deb",
    "simple-page|http://127.0.0.1:9000/simple|alpine": b"<html></html>",
    "http://docker.io/library/alpine/manifests/3.19": b"a URL, not a registry key",
}
ALPINE_KEYS = {key for key in STORED if key.startswith(f"{ALPINE}/")} - {
    key for key in STORED if key.startswith(f"{NESTED}/")
}


def store_bodies(directory: str, bodies: Mapping[str, bytes], clock: Clock | None = None) -> None:
    """
    Store each body under its key through a real store.
    """
    store = Store.open(directory, 1 << 30, cast(IReactorTime, clock or Clock()))
    try:
        for key, body in bodies.items():
            writer = store.writer(key)
            writer.write(body)
            writer.commit({"content-type": "application/octet-stream"})
    finally:
        store.close()


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


class PurgeTests(SynchronousTestCase):
    """
    ``buildcache purge --image`` on a cache holding registry, http and
    simple-page keys.
    """

    def setUp(self) -> None:
        self.cache_dir = os.path.abspath(self.mktemp())
        store_bodies(self.cache_dir, STORED)
        self.files = len(object_files(self.cache_dir))
        self.assertEqual(self.files, len(STORED))

    def assert_left(self, removed: set[str]) -> None:
        """
        Exactly ``removed`` lost their rows and their files.
        """
        self.assertEqual(stored_keys(self.cache_dir), set(STORED) - removed)
        self.assertEqual(len(object_files(self.cache_dir)), self.files - len(removed))

    def test_repository(self) -> None:
        """
        A repository goes with all its manifests (by tag, by digest, every
        Accept variant), blobs, tag lists and referrers; a repository one
        component longer, the same name on another registry, URL keys that
        look alike and the other front ends' keys stay.
        """
        code, out, err = run(
            "purge", "--image", "docker.io/library/alpine", "--cache-dir", self.cache_dir
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(ALPINE_KEYS), 10)
        self.assert_left(ALPINE_KEYS)
        self.assertIn(f"Removed {len(ALPINE_KEYS)} entries", out)
        for key in ALPINE_KEYS:
            self.assertIn(f"removed {key}  ", out)

    def test_one_word_name(self) -> None:
        """
        A name without a registry is docker.io's, with ``library/``.
        """
        code, _, _ = run("purge", "--image", "alpine", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left(ALPINE_KEYS)

    def test_tag(self) -> None:
        """
        A tag removes its manifests for every client's Accept and nothing
        else: not the digests it pointed at, nor its other tags, nor the
        same tag of other repositories.
        """
        code, out, _ = run("purge", "--image", "alpine:3.19", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({f"{ALPINE}/manifests/3.19", f"{ALPINE}/manifests/3.19{ACCEPT}"})
        self.assertIn("Removed 2 entries", out)

    def test_digest_and_several(self) -> None:
        digest = digest_of(APP_MANIFEST)
        code, _, _ = run(
            "purge", "--image", f"127.0.0.1:5001/team/app@{digest}",
            "--image", "127.0.0.1:5001/library/alpine:3.19", "--cache-dir", self.cache_dir,
        )
        self.assertEqual(code, 0)
        self.assert_left({f"{APP}/manifests/{digest}", f"{OTHER_REGISTRY}/manifests/3.19"})

    def test_dry_run(self) -> None:
        code, out, _ = run(
            "purge", "--dry-run", "--image", "alpine:latest", "--cache-dir", self.cache_dir
        )
        self.assertEqual(code, 0)
        self.assert_left(set())
        self.assertIn(f"would remove {ALPINE}/manifests/latest", out)
        self.assertIn("Would remove 1 entries", out)

    def test_not_an_image(self) -> None:
        """
        A name docker would refuse is refused before anything is removed.
        """
        for bad in ("Alpine", "alpine:bad:tag", "alpine@md5", "alpine:1@sha256:ab", ""):
            code, _, err = run("purge", "--image", bad, "--cache-dir", self.cache_dir)
            self.assertEqual(code, 2, bad)
            self.assertIn(f"--image {bad!r}", err)
        code, _, err = run("purge", "--image", "docker.io/library/*", "--cache-dir",
                           self.cache_dir)
        self.assertEqual(code, 2)
        self.assertIn("for a glob give a PATTERN over the keys", err)
        self.assert_left(set())

    def test_globs_over_registry_keys(self) -> None:
        """
        A glob over the whole registry key works; a glob without a scheme,
        meant for URLs, does not reach into registry keys.
        """
        code, _, _ = run("purge", "docker.io/*", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({"http://docker.io/library/alpine/manifests/3.19"})
        code, _, _ = run("purge", "oci:127.0.0.1:5001/*", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({
            "http://docker.io/library/alpine/manifests/3.19",
            *(key for key in STORED if key.startswith(("oci:127.0.0.1:5001/"))),
        })

    def test_needs_something(self) -> None:
        code, _, err = run("purge", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 2)
        self.assertIn("--image IMAGE", err)
        self.assert_left(set())


class StatsAndVerifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = os.path.abspath(self.mktemp())
        store_bodies(self.cache_dir, STORED)

    def test_stats_kinds(self) -> None:
        """
        ``stats`` counts the registry's manifests and blobs as their own
        kinds (the front ends' kinds, from their table, in order), its
        lists with the indexes.
        """
        code, out, _ = run("stats", "--json", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        kinds = {kind: total["entries"] for kind, total in json.loads(out)["kinds"].items()}
        self.assertEqual(
            list(kinds),
            [kind for front_end in FRONT_END_TABLE for kind in front_end.kinds]
            + ["index", "other"],
        )
        self.assertEqual(kinds, {
            "apk": 1, "deb": 1, "wheel": 0, "sdist": 0, "manifest": 9, "blob": 4,
            "index": 4, "other": 1,
        })
        self.assertIn("manifest         9", run("stats", "--cache-dir", self.cache_dir)[1])

    def test_verify_digests(self) -> None:
        """
        A blob or manifest whose body is not the digest its key names is
        removed (exit 1); sound ones stay.
        """
        self.assertEqual(run("verify", "--cache-dir", self.cache_dir)[0], 0)
        wrong = f"{ALPINE}/blobs/{digest_of(b'another layer')}"
        store_bodies(self.cache_dir, {wrong: LAYER})
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 1)
        self.assertIn(
            f"disagrees with its index, removed: {wrong} (sha256"
            f" {hashlib.sha256(LAYER).hexdigest()} stored under the digest", out,
        )
        self.assertIn("1 disagreeing with their index", out)
        self.assertEqual(stored_keys(self.cache_dir), set(STORED))


class KeysTests(SynchronousTestCase):
    def test_parse_key(self) -> None:
        digest = "sha256:" + "a" * 64
        cases = {
            f"{ALPINE}/manifests/3.19": RegistryKey(
                "docker.io", "library/alpine", "manifests", "3.19"),
            f"{ALPINE}/manifests/3.19{ACCEPT}": RegistryKey(
                "docker.io", "library/alpine", "manifests", "3.19"),
            f"{APP}/blobs/{digest}": RegistryKey("127.0.0.1:5001", "team/app", "blobs", digest),
            "oci:r.test/foo/tags/tags/list": RegistryKey("r.test", "foo/tags", "tags", None),
            "oci:r.test/foo/tags/list?n=10&last=x": RegistryKey("r.test", "foo", "tags", None),
            f"oci:r.test/a/referrers/{digest}?artifactType=application/vnd.x":
                RegistryKey("r.test", "a", "referrers", digest),
            f"oci:r.test/a/manifests/v1/manifests/{digest}":
                RegistryKey("r.test", "a/manifests/v1", "manifests", digest),
            "oci:r.test/a/manifests/v1#p=" + "0" * 32:
                RegistryKey("r.test", "a", "manifests", "v1"),
            "oci:r.test/a": None,
            "oci:r.test/a/blobs/": None,
            "https://r.test/v2/a/manifests/v1": None,
        }
        self.assertEqual({key: parse_key(key) for key in cases}, cases)
        by_digest = parse_key(f"{ALPINE}/manifests/{digest}")
        variant = parse_key(f"{ALPINE}/manifests/3.19{ACCEPT}")
        assert by_digest is not None and variant is not None
        self.assertEqual((by_digest.tag, variant.tag), (None, "3.19"))

    def test_keys_of_the_front_end(self) -> None:
        """
        The keys the registry front end makes read back as the request
        they were made for.
        """
        registries = {"docker.io": "http://127.0.0.1:1", "127.0.0.1:5001": "http://127.0.0.1:2"}
        digest = "sha256:" + "b" * 64
        for path, query in (
            ("/v2/alpine/manifests/3.19", ""),
            (f"/v2/library/alpine/manifests/{digest}", ""),
            (f"/v2/team/app/blobs/{digest}", "ns=127.0.0.1:5001"),
            ("/v2/127.0.0.1:5001/team/app/tags/list", "n=10&last=v1"),
            (f"/v2/a/referrers/{digest}", "artifactType=application/vnd.dev.cosign"),
            ("/v2/foo/tags/tags/list", ""),
            ("/v2/team/manifests/manifests/v1", "ns=127.0.0.1:5001"),
        ):
            request = parse_request(path, query, registries)
            for key in (request.key(), request.key(ACCEPT)):
                parsed = parse_key(key)
                assert parsed is not None, key
                self.assertEqual(
                    (parsed.image, parsed.section, parsed.ref),
                    (request.name, request.endpoint.value, request.reference),
                )

    def test_parse_image(self) -> None:
        cases = {
            "alpine": ImageName("docker.io", "library/alpine"),
            "alpine:3.19": ImageName("docker.io", "library/alpine", "3.19"),
            "docker.io/bitnami/redis": ImageName("docker.io", "bitnami/redis"),
            "index.docker.io/alpine": ImageName("docker.io", "library/alpine"),
            "127.0.0.1:5001/team/app:v1": ImageName("127.0.0.1:5001", "team/app", "v1"),
            "localhost/x@sha256:ab": ImageName("localhost", "x", None, "sha256:ab"),
            "ghcr.io/a/b/c": ImageName("ghcr.io", "a/b/c"),
        }
        self.assertEqual({text: parse_image(text) for text in cases}, cases)
        self.assertEqual(str(parse_image("alpine:3.19")), "docker.io/library/alpine:3.19")
        for bad in ("Alpine", "a:b:c", "", "x/", "x@sha256", "x:1@sha256:ab", "x:-y"):
            with self.assertRaises(ValueError, msg=bad):
                parse_image(bad)

    def test_kinds_and_matching(self) -> None:
        self.assertEqual(
            {entry_kind(key) for key in STORED if key.startswith(f"{ALPINE}/blobs/")}, {"blob"}
        )
        self.assertEqual(entry_kind(f"{ALPINE}/manifests/3.19{ACCEPT}"), "manifest")
        self.assertEqual(entry_kind(f"{ALPINE}/tags/list"), "index")
        self.assertEqual(entry_kind("oci:r.test/not-a-key-shape"), "other")
        matches = key_matcher([], [], [parse_image("alpine:latest")])
        self.assertEqual({key for key in STORED if matches(key)}, {f"{ALPINE}/manifests/latest"})

    def test_stored_tags(self) -> None:
        self.assertEqual(
            [(repository.name, repository.tags) for repository in stored_tags(STORED)],
            [("127.0.0.1:5001/library/alpine", ("3.19",)),
             ("127.0.0.1:5001/team/app", ("v1",)),
             ("docker.io/library/alpine", ("3.19", "latest")),
             ("docker.io/library/alpine/extra", ("3.19",))],
        )

    def test_digest_mismatch(self) -> None:
        right = hashlib.sha256(LAYER).hexdigest()
        self.assertIsNone(digest_mismatch(f"{ALPINE}/blobs/sha256:{right}", right))
        self.assertIsNone(digest_mismatch(f"{ALPINE}/blobs/sha256:{right.upper()}", right))
        self.assertIsNone(digest_mismatch(f"{ALPINE}/manifests/latest", right))
        self.assertIsNone(digest_mismatch(f"{ALPINE}/blobs/sha256:{right}", None))
        self.assertIsNone(digest_mismatch(f"{ALPINE}/blobs/sha512:{'0' * 128}", right))
        self.assertIsNotNone(digest_mismatch(f"{ALPINE}/blobs/sha256:{'0' * 64}", right))
