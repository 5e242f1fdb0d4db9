"""
Packages rebuilt under the same file name, and indexes too large to check
against, over HTTP with the real resources on 127.0.0.1.

A private abuild repository may rebuild a package without bumping pkgrel:
same file name, new bytes, a new ``APKINDEX`` entry.  A pip index may
replace a file under its name too (the page then gives another sha256).
Once the new index (page) is fetched, the stored copy is dropped and the
next request fetches the new one; ``buildcache verify`` reports (and
drops) an entry its stored index describes differently.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

import attrs
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from buildcache.ecosystems.apk.check import ApkIndexes
from buildcache.ecosystems.pypi.pages import page_key
from buildcache.engine.keys import PRIVATE_MARK, cache_key
from buildcache.ops.cli import verify
from buildcache.service import proxy_policies
from buildcache.store import INDEX_NAME, OfflineIndex
from tests.apkrepo import BuiltApk, build_apk, build_apkindex
from tests.pyindex import StaticSimpleIndex
from tests.support import Client
from tests.test_proxy import (
    INDEX_PATH,
    PUBLISHED,
    ProxyHarness,
    events_at,
    log_events,
)
from tests.test_simple_index import (
    PIP_ACCEPT,
    TTL,
    WHEEL_A2,
    Harness,
    fixture_for,
    logged,
)


def first_build() -> BuiltApk:
    return build_apk("hello", "1.0-r0", data_size_pad=2_000, pad_seed=1)


def rebuilt() -> BuiltApk:
    # Same name and version, other bytes: what abuild makes without a
    # pkgrel bump.
    return build_apk("hello", "1.0-r0", data_size_pad=3_000, pad_seed=2)


def other() -> BuiltApk:
    return build_apk("world", "2.0-r0", data_size_pad=1_000, pad_seed=3)


class ApkRebuildTests(TestCase):
    timeout = 30

    def start(self) -> tuple[ProxyHarness, str]:
        harness = ProxyHarness.start(self, packages=[first_build(), other()])
        return harness, harness.package_path(first_build().filename)

    async def fill(self, harness: ProxyHarness, path: str) -> None:
        self.assertEqual((await harness.get(INDEX_PATH)).status, 200)
        first = await harness.get(path)
        self.assertEqual(
            (first.status, first.header("x-cache"), first.body),
            (200, "MISS", first_build().content),
        )
        second = await harness.get(path)
        self.assertEqual(second.header("x-cache"), "HIT")

    def rebuild_upstream(self, harness: ProxyHarness, path: str) -> bytes:
        new_index = build_apkindex([rebuilt(), other()])
        harness.replace_file(path, rebuilt().content, PUBLISHED + 100)
        harness.replace_file(INDEX_PATH, new_index, PUBLISHED + 100)
        return new_index

    async def test_rebuilt_package_fetched_after_new_index(self) -> None:
        """
        After ``apk update`` brings the new index, the next request for the
        rebuilt package is a MISS with the new bytes (the old copy was
        dropped once, when the new index was first needed), then a HIT.
        """
        observer = log_events(self)
        harness, path = self.start()
        await self.fill(harness, path)
        new_index = self.rebuild_upstream(harness, path)
        updated = await harness.get(INDEX_PATH, {"cache-control": "no-cache"})
        self.assertEqual((updated.status, updated.body), (200, new_index))

        fresh = await harness.get(path)
        self.assertEqual(
            (fresh.status, fresh.header("x-cache"), fresh.body),
            (200, "MISS", rebuilt().content),
        )
        again = await harness.get(path)
        self.assertEqual(
            (again.status, again.header("x-cache"), again.body),
            (200, "HIT", rebuilt().content),
        )
        self.assertEqual(harness.requests_for(path), 2)
        package_key = cache_key(harness.proxied(path))
        removed = events_at(observer, LogLevel.info, "its index now describes another build")
        self.assertEqual([event["key"] for event in removed], [package_key])
        entry = harness.running.store.peek(package_key)
        self.assertEqual(entry.source_digest, rebuilt().control_checksum)
        # The other package, listed as before, was kept.
        self.assertEqual(
            (await harness.get(harness.package_path(other().filename))).header("x-cache"),
            "MISS",
        )
        self.assertEqual(
            (await harness.get(harness.package_path(other().filename))).header("x-cache"),
            "HIT",
        )

    async def test_same_size_rebuild_of_a_row_from_before_checksums(self) -> None:
        """
        A package stored before control checksums were recorded (NULL, as
        the migration leaves it), rebuilt upstream to the same size: its
        checksum is read from the stored file at the check, which tells
        it apart, and the next request fetches the new build.
        """
        observer = log_events(self)
        before = build_apk("same", "1.0-r0", data_files={"usr/f": b"a" * 1000})
        after = build_apk("same", "1.0-r0", data_files={"usr/f": b"r" * 1000})
        self.assertEqual(before.size, after.size)
        harness = ProxyHarness.start(self, packages=[before, other()])
        path = harness.package_path(before.filename)
        await harness.get(INDEX_PATH)
        self.assertEqual((await harness.get(path)).header("x-cache"), "MISS")
        store = harness.running.store
        package_key = cache_key(harness.proxied(path))
        db = sqlite3.connect(os.path.join(store.directory, INDEX_NAME))
        with db:
            db.execute(
                "UPDATE entries SET source_digest = NULL WHERE key = ?", (package_key,)
            )
        db.close()
        store.flush()
        self.assertIsNone(store.peek(package_key).source_digest)
        harness.replace_file(path, after.content, PUBLISHED + 100)
        harness.replace_file(
            INDEX_PATH, build_apkindex([after, other()]), PUBLISHED + 100
        )
        await harness.get(INDEX_PATH, {"cache-control": "no-cache"})
        fresh = await harness.get(path)
        self.assertEqual((fresh.header("x-cache"), fresh.body), ("MISS", after.content))
        again = await harness.get(path)
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", after.content))
        removed = events_at(observer, LogLevel.info, "its index now describes another build")
        self.assertEqual([event["key"] for event in removed], [package_key])
        self.assertIn(before.control_checksum, removed[0]["reason"])

    async def test_checked_once_per_index_version(self) -> None:
        """
        Hits do not re-check: one check per stored index version.
        """
        observer = log_events(self)
        harness, path = self.start()
        await self.fill(harness, path)
        for _ in range(3):
            self.assertEqual((await harness.get(path)).header("x-cache"), "HIT")
        checks = events_at(observer, LogLevel.info, "Checked stored packages against")
        self.assertEqual(len(checks), 1)

    async def test_verify_reports_package_its_index_disowns(self) -> None:
        """
        A cache whose stored index is newer than a stored package (as left
        by a server before this check existed): ``verify`` reports and
        drops the package, and the next request fetches the new build.
        """
        harness, path = self.start()
        await self.fill(harness, path)
        new_index = self.rebuild_upstream(harness, path)
        store = harness.running.store
        writer = store.writer(cache_key(harness.proxied(INDEX_PATH)))
        writer.write(new_index)
        writer.commit({})
        with OfflineIndex.open(store.directory) as index:
            result = verify(index)
        package_key = cache_key(harness.proxied(path))
        self.assertEqual([row.key for row, _ in result.stale], [package_key])
        self.assertIn(
            f"{first_build().size} bytes stored, the index lists {rebuilt().size}",
            result.stale[0][1],
        )
        self.assertFalse(result.clean)
        fresh = await harness.get(path)
        self.assertEqual((fresh.header("x-cache"), fresh.body), ("MISS", rebuilt().content))

    async def test_verify_judges_private_packages_by_their_own_index(self) -> None:
        """
        A package stored for one client's credentials (``#p=``) is not
        judged against the anonymous index (the server's rule,
        :func:`buildcache.ecosystems.apk.check.vouched_by`): ``verify``
        keeps it while it drops the anonymous copy that index disowns.
        """
        harness, path = self.start()
        await self.fill(harness, path)
        new_index = self.rebuild_upstream(harness, path)
        store = harness.running.store
        package_key = cache_key(harness.proxied(path))
        private_key = f"{package_key}{PRIVATE_MARK}{'ab' * 32}"
        writer = store.writer(private_key)
        writer.write(first_build().content)
        writer.commit({})
        writer = store.writer(cache_key(harness.proxied(INDEX_PATH)))
        writer.write(new_index)
        writer.commit({})
        with OfflineIndex.open(store.directory) as index:
            result = verify(index)
        self.assertEqual([row.key for row, _ in result.stale], [package_key])
        self.assertIsNotNone(store.peek(private_key))

    async def test_oversized_index_is_refused_for_checking(self) -> None:
        """
        An index past the entry bound is served to its client, but not used
        to check packages: a log line says so (once per version), and its
        packages are served without being stored.
        """
        observer = log_events(self)
        harness, path = self.start()
        harness.running.server.proxy.policies = proxy_policies(
            ApkIndexes(harness.running.store, max_entries=1)
        )
        index = await harness.get(INDEX_PATH)
        self.assertEqual((index.status, index.body), (200, harness.index_bytes()))
        for _ in range(2):
            received = await harness.get(path)
            self.assertEqual(
                (received.status, received.header("x-cache"), received.body),
                (200, "MISS", first_build().content),
            )
        self.assertEqual(harness.requests_for(path), 2)
        self.assertNotIn(cache_key(harness.proxied(path)), harness.stored_keys())
        refused = events_at(observer, LogLevel.warn, "Not checking packages against")
        self.assertEqual(
            [event["key"] for event in refused], [cache_key(harness.proxied(INDEX_PATH))]
        )
        self.assertIn("more than 1 packages", refused[0]["error"])


class PipRebuildTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.fixture = fixture_for(self)
        self.harness = Harness(self, [StaticSimpleIndex(self.fixture)])
        self.upstream = self.harness.upstreams[0]
        self.file_key = cache_key(
            f"{self.upstream.base.removesuffix('/simple')}/files/{WHEEL_A2}"
        )
        self.old = self.fixture.content(WHEEL_A2)
        self.new = self.old + b"rebuilt"

    async def fill(self) -> None:
        self.assertEqual((await self.harness.page("bcdemo-a")).status, 200)
        first = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((first.status, first.body), (200, self.old))
        await self.harness.fetcher.when_idle()
        self.assertIsNotNone(self.harness.store.peek(self.file_key))

    def replace_upstream(self) -> None:
        self.fixture.path_for(WHEEL_A2).write_bytes(self.new)
        page = self.upstream.index.projects["bcdemo-a"]
        self.upstream.index.projects["bcdemo-a"] = attrs.evolve(
            page,
            files=tuple(
                attrs.evolve(
                    file, hashes={"sha256": hashlib.sha256(self.new).hexdigest()},
                    size=len(self.new),
                ) if file.filename == WHEEL_A2 else file
                for file in page.files
            ),
        )

    async def test_file_with_new_sha256_dropped_when_page_refetched(self) -> None:
        observer = log_events(self)
        await self.fill()
        self.replace_upstream()
        self.harness.clock.advance(TTL + 1)
        page = await self.harness.page("bcdemo-a")
        self.assertEqual(page.status, 200)
        # Dropped with the page's refetch, before any file request: the
        # proxy port, which shares the entry, cannot serve it either.
        self.assertIsNone(self.harness.store.peek(self.file_key))
        self.assertTrue(logged(observer, LogLevel.info, "now gives another digest"))
        fresh = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((fresh.status, fresh.header("x-cache"), fresh.body), (200, "MISS", self.new))
        await self.harness.fetcher.when_idle()
        again = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", self.new))
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 2)

    async def test_verify_reports_file_its_page_disowns(self) -> None:
        """
        A stored page newer than a stored file (as left by a server before
        this check existed): ``verify`` reports and drops the file.
        """
        await self.fill()
        self.replace_upstream()
        client = Client()
        self.addCleanup(client.close)
        upstream_page = await client.get(
            f"{self.upstream.base}/bcdemo-a/", {"accept": PIP_ACCEPT}
        )
        store = self.harness.store
        writer = store.writer(page_key(self.upstream.base, "bcdemo-a"))
        writer.write(upstream_page.body)
        writer.commit({"content-type": upstream_page.header("content-type") or ""})
        with OfflineIndex.open(store.directory) as index:
            result = verify(index)
        self.assertEqual([row.key for row, _ in result.stale], [self.file_key])
        self.assertIn(hashlib.sha256(self.new).hexdigest(), result.stale[0][1])
        # The server takes in what verify removed at its next flush.
        store.flush()
        self.assertIsNone(store.peek(self.file_key))
