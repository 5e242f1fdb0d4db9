"""
A cheaper miss (issue 16), no second pass over bytes already hashed: an apk
package is checked as it streams (its size, its control stream against the
index's ``C:``, its data stream against the ``datahash`` the control stream
names), which covers every byte a sha256 of the whole body would; it is
stored without one unless the shared tier names it by one, and ``buildcache
verify`` checks its stored copy as its download was checked.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.engine.keys import cache_key
from buildcache.fetch.request import UpstreamRequest
from buildcache.ops.cli import verify
from buildcache.store import OfflineIndex
from tests.apkrepo import BuiltApk, build_apk
from tests.test_proxy import INDEX_PATH, ProxyHarness


def package() -> BuiltApk:
    return build_apk("hello", "1.0-r0", data_size_pad=300_000, pad_seed=4)


class PackageDigestTests(TestCase):
    timeout = 30
    package = staticmethod(package)

    async def stored(self) -> tuple[ProxyHarness, str]:
        harness = ProxyHarness.start(self, packages=[self.package()])
        path = harness.package_path(self.package().filename)
        self.assertEqual((await harness.get(INDEX_PATH)).status, 200)
        first = await harness.get(path)
        self.assertEqual(
            (first.status, first.header("x-cache"), first.body),
            (200, "MISS", self.package().content),
        )
        return harness, path

    async def test_package_stored_without_a_digest_of_the_whole(self) -> None:
        """
        The package's row records its control checksum and no sha256; the
        index, which no check covers byte for byte, keeps its sha256; the
        package is served whole from the store.
        """
        harness, path = await self.stored()
        store = harness.running.store
        row = store.peek(cache_key(harness.proxied(path)))
        self.assertEqual((row.sha256, row.source_digest), (None, self.package().control_checksum))
        index_row = store.peek(cache_key(harness.proxied(INDEX_PATH)))
        index_path = store.object_path(index_row.key)
        assert index_path is not None
        with open(index_path, "rb") as f:
            self.assertEqual(index_row.sha256, hashlib.sha256(f.read()).hexdigest())
        again = await harness.get(path)
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", self.package().content))

    async def corrupted(self, at: int) -> str:
        """
        The reason ``verify`` gives for the stored package once its byte at
        ``at`` is flipped on disk (it is removed, and fetched again whole).
        """
        harness, path = await self.stored()
        store = harness.running.store
        key = cache_key(harness.proxied(path))
        with OfflineIndex.open(store.directory) as index:
            clean = verify(index)
        self.assertTrue(clean.clean)
        self.assertEqual((clean.bodies.checked, clean.bodies.without_digest), (2, 0))
        stored_path = store.object_path(key)
        assert stored_path is not None
        with open(stored_path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
        with OfflineIndex.open(store.directory) as index:
            result = verify(index)
        self.assertEqual([row.key for row, _ in result.bodies.corrupt], [key])
        store.flush()
        fresh = await harness.get(path)
        self.assertEqual((fresh.header("x-cache"), fresh.body), ("MISS", self.package().content))
        return result.bodies.corrupt[0][1]

    async def test_verify_finds_a_changed_data_stream(self) -> None:
        reason = await self.corrupted(len(self.package().content) - 1000)
        self.assertIn("datahash", reason)

    async def test_verify_finds_a_changed_control_stream(self) -> None:
        built = self.package()
        reason = await self.corrupted(built.signature_length + built.control_length // 2)
        self.assertIn("gzip stream 1", reason)


def without_datahash() -> BuiltApk:
    return build_apk("old", "1.0-r0", data_size_pad=300_000, pad_seed=5, include_datahash=False)


class OlderPackageDigestTests(PackageDigestTests):
    """
    A package whose control stream names no ``datahash`` (older abuild):
    its data stream is inflated whole as it is checked, and gzip's own
    check of every inflated byte finds a change on disk.
    """

    package = staticmethod(without_datahash)

    async def test_verify_finds_a_changed_data_stream(self) -> None:
        reason = await self.corrupted(len(self.package().content) - 1000)
        self.assertIn("gzip stream 2", reason)


def checked_whole(**fields: object) -> UpstreamRequest:
    return UpstreamRequest(
        "k", "http://127.0.0.1/p.apk", verify=lambda headers: None,  # type: ignore[arg-type,return-value]
        verify_covers_body=True, **fields,  # type: ignore[arg-type]
    )


class NeedsDigestTests(SynchronousTestCase):
    def test_when_a_digest_is_taken(self) -> None:
        self.assertFalse(checked_whole().needs_digest(shared=False))
        # The shared tier names bodies by their sha256.
        self.assertTrue(checked_whole().needs_digest(shared=True))
        # A digest to check.
        self.assertTrue(checked_whole(expected_sha256="ab" * 32).needs_digest(shared=False))
        # Any other body: its record, which verify re-hashes.
        self.assertTrue(
            UpstreamRequest("k", "http://127.0.0.1/f").needs_digest(shared=False)
        )

    def test_a_digest_to_check_joins_only_a_download_that_takes_one(self) -> None:
        running = checked_whole()
        joining = checked_whole(expected_sha256="ab" * 32)
        self.assertFalse(joining.may_join(running))
        self.assertTrue(checked_whole().may_join(running))
        self.assertTrue(joining.may_join(checked_whole(expected_sha256="AB" * 32)))
