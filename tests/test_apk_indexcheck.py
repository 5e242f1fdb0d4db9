"""
Tests for :mod:`buildcache.ecosystems.apk.indexcheck`: what an
``APKINDEX.tar.gz`` must look like before it may replace the stored one.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.apk.index import ApkIndexError
from buildcache.ecosystems.apk.indexcheck import ApkIndexCheck
from tests.apkrepo import build_apk, build_apkindex, gzip_stream


def checked(body: bytes, chunk: int = 1000, **kwargs: int) -> None:
    check = ApkIndexCheck(**kwargs)
    for start in range(0, len(body), chunk):
        check.update(body[start:start + chunk])
    check.finish()


class ApkIndexCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.index = build_apkindex([build_apk("curl", "8.9.1-r0")])

    def test_signed_and_unsigned_indexes_pass(self) -> None:
        for body in (self.index, build_apkindex([build_apk("a", "1-r0")], signed=False)):
            for chunk in (1, 7, 4096, len(body)):
                checked(body, chunk)

    def test_captive_portal_page(self) -> None:
        page = b"<html><body>Please log in to the guest network</body></html>"
        with self.assertRaisesRegex(ApkIndexError, "not gzip"):
            checked(page)

    def test_cut_short(self) -> None:
        for cut in (1, 30, len(self.index) // 2, len(self.index) - 1):
            with self.assertRaises(ApkIndexError):
                checked(self.index[:cut])

    def test_gzip_of_something_else(self) -> None:
        with self.assertRaisesRegex(ApkIndexError, "not a tar"):
            checked(gzip_stream(b"x" * 2000))

    def test_corrupt_stream(self) -> None:
        body = bytearray(self.index)
        body[len(body) // 2] ^= 0xFF
        with self.assertRaises(ApkIndexError):
            checked(bytes(body))

    def test_inflation_bounded(self) -> None:
        """
        A small body that inflates past the bound is refused as it
        streams, with at most one step of inflated bytes in memory.
        """
        bomb = build_apkindex([build_apk("a", "1-r0")], description="x" * 3_000_000)
        self.assertLess(len(bomb), 100_000)
        with self.assertRaisesRegex(ApkIndexError, "inflates to more than"):
            checked(bomb, max_inflated=1_000_000)
        checked(bomb, max_inflated=4_000_000)

    def test_empty(self) -> None:
        with self.assertRaisesRegex(ApkIndexError, "empty"):
            checked(b"")
