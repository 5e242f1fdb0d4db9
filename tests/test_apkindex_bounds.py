"""
The compact form of a parsed ``APKINDEX`` and its bounds
(:func:`buildcache.ecosystems.apk.index.parse_compact_apkindex`), the parsed-index cache
bounded in bytes (:class:`buildcache.ecosystems.apk.check.ApkIndexes`), the rule that
says a stored package no longer matches its index
(:func:`buildcache.ecosystems.apk.index.stale_reason`), its pip counterpart
(:func:`buildcache.ecosystems.pypi.index.disowned_files`), and the store calls they
use.
"""

from __future__ import annotations

import io
import os
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.apk.check import ApkIndexes, read_control_checksum
from buildcache.ecosystems.apk.index import (
    ApkFacts,
    ApkIndexError,
    ApkIndexTooLarge,
    CompactApkIndex,
    parse_apkindex,
    parse_compact_apkindex,
    stale_reason,
)
from buildcache.ecosystems.pypi.model import ProjectFile, ProjectPage
from buildcache.ecosystems.pypi.pages import disowned_files, page_digests
from buildcache.engine.keys import cache_key
from buildcache.store import Entry, Store
from tests.apkrepo import build_apk, build_apkindex, gzip_tar, index_block
from tests.support import HeldRunner

BASE = "http://mirror.test/alpine/v3.20/main/x86_64"


def synthetic_index(entries: int) -> bytes:
    blocks = "".join(
        f"C:Q1YLd2JxG9/LvuLOv+OLzFgc3lh3k=\nP:p{i}\nV:1-r0\nS:{100 + i}\n\n"
        for i in range(entries)
    )
    return gzip_tar({"APKINDEX": blocks.encode()})


class CompactIndexTests(SynchronousTestCase):
    def test_same_facts_as_the_full_parse(self) -> None:
        built = [
            build_apk(f"pkg{i}", f"1.{i}-r0", data_size_pad=10 * i, pad_seed=i)
            for i in range(5)
        ]
        content = build_apkindex(built, description="v3.20.3")
        full = parse_apkindex(io.BytesIO(content))
        compact = parse_compact_apkindex(io.BytesIO(content))
        self.assertEqual(len(compact), 5)
        self.assertEqual(compact.description, "v3.20.3")
        for filename, entry in full.items():
            self.assertEqual(compact.get(filename), entry.facts)
            self.assertIn(filename, compact)
        self.assertIsNone(compact.get("absent-1.0-r0.apk"))

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.text(alphabet="abcdefgh-+._", min_size=1, max_size=12),
                st.integers(min_value=0, max_value=2**40),
                st.binary(min_size=20, max_size=20),
            ),
            max_size=40,
        )
    )
    def test_lookup_matches_a_dict(self, triples: list[tuple[str, int, bytes]]) -> None:
        """
        Whatever the names, the compact form answers as a dict of the
        first entry per name would.
        """
        expected: dict[str, ApkFacts] = {}
        for name, size, sha1 in triples:
            expected.setdefault(name, ApkFacts(name, size, sha1))
        compact = CompactApkIndex.build(iter(triples))
        for name, facts in expected.items():
            self.assertEqual(compact.get(name), facts)
        self.assertIsNone(compact.get("not-there-at-all.apk"))

    def test_first_entry_of_a_name_wins(self) -> None:
        compact = CompactApkIndex.build(
            iter([("a.apk", 1, b"1" * 20), ("b.apk", 2, b"2" * 20), ("a.apk", 3, b"3" * 20)])
        )
        self.assertEqual(compact.get("a.apk"), ApkFacts("a.apk", 1, b"1" * 20))

    def test_bytes_per_entry(self) -> None:
        """
        36 bytes a package (and a constant): what the cache bound counts.
        """
        compact = parse_compact_apkindex(io.BytesIO(synthetic_index(10_000)))
        self.assertEqual(len(compact), 10_000)
        self.assertEqual(compact.nbytes, 36 * 10_000 + 200)

    def test_entry_bound(self) -> None:
        content = synthetic_index(11)
        self.assertEqual(len(parse_compact_apkindex(io.BytesIO(content), max_entries=11)), 11)
        with self.assertRaises(ApkIndexTooLarge) as caught:
            parse_compact_apkindex(io.BytesIO(content), max_entries=10)
        self.assertIn("more than 10 packages", str(caught.exception))

    def test_inflated_bound(self) -> None:
        content = synthetic_index(100)
        with self.assertRaises(ApkIndexTooLarge) as caught:
            parse_compact_apkindex(io.BytesIO(content), max_index_bytes=2000)
        self.assertIn("more than 2000 bytes", str(caught.exception))

    def test_malformed_entries_still_refused(self) -> None:
        content = gzip_tar({"APKINDEX": b"P:x\nV:1-r0\nS:1\n\n"})
        with self.assertRaises(ApkIndexError) as caught:
            parse_compact_apkindex(io.BytesIO(content))
        self.assertIn("has no C: field", str(caught.exception))

    def test_crlf(self) -> None:
        apk = build_apk("hello", "1.0-r0")
        text = index_block(apk).replace("\n", "\r\n")
        compact = parse_compact_apkindex(io.BytesIO(gzip_tar({"APKINDEX": text.encode()})))
        self.assertEqual(compact.get(apk.filename), ApkFacts(apk.filename, apk.size, apk.control_sha1))


class StaleReasonTests(SynchronousTestCase):
    facts = ApkFacts("a-1-r0.apk", 100, b"\x01" * 20)

    def test_same(self) -> None:
        self.assertIsNone(stale_reason(self.facts, 100, self.facts.control_checksum))

    def test_unknown_checksum_same_size(self) -> None:
        self.assertIsNone(stale_reason(self.facts, 100, None))

    def test_other_size(self) -> None:
        self.assertEqual(
            stale_reason(self.facts, 99, None), "99 bytes stored, the index lists 100"
        )

    def test_other_checksum(self) -> None:
        other = ApkFacts("a-1-r0.apk", 100, b"\x02" * 20).control_checksum
        reason = stale_reason(self.facts, 100, other)
        assert reason is not None
        self.assertIn(other, reason)
        self.assertIn(self.facts.control_checksum, reason)


class ControlChecksumTests(SynchronousTestCase):
    def test_read_from_a_stored_package(self) -> None:
        for signed in (True, False):
            apk = build_apk("hello", "1.0-r0", data_size_pad=200_000, signed=signed)
            path = self.mktemp()
            with open(path, "wb") as f:
                f.write(apk.content)
            self.assertEqual(read_control_checksum(path, apk.size), apk.control_checksum)

    def test_not_a_package(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"<html>not a package</html>")
        self.assertIsNone(read_control_checksum(path, 26))
        self.assertIsNone(read_control_checksum(self.mktemp(), 26))


class IndexCacheTests(SynchronousTestCase):
    """
    :class:`ApkIndexes` keeps parsed indexes up to a number of bytes, and
    parses a refused version only once.
    """

    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.store = Store.open(
            self.mktemp(), 1 << 26, cast(Any, Clock()), run_blocking=self.runner
        )
        self.store.spare_temp_files = 0
        self.addCleanup(self.store.close)

    def put_index(self, directory: str, content: bytes) -> None:
        writer = self.store.writer(cache_key(f"{directory}/APKINDEX.tar.gz"))
        writer.write(content)
        writer.commit({})

    def look_up(self, indexes: ApkIndexes, url: str) -> ApkFacts | None:
        found = Deferred.fromCoroutine(indexes.entry_for(url, cache_key))
        self.runner.run_all()
        return cast("ApkFacts | None", self.successResultOf(found))

    def test_bounded_in_bytes(self) -> None:
        one = parse_compact_apkindex(io.BytesIO(synthetic_index(1000))).nbytes
        indexes = ApkIndexes(self.store, keep_bytes=2 * one + one // 2)
        for n in range(4):
            self.put_index(f"http://m/r{n}/x86_64", synthetic_index(1000))
            self.assertIsNotNone(self.look_up(indexes, f"http://m/r{n}/x86_64/p5-1-r0.apk"))
            self.assertLessEqual(indexes.kept_bytes, indexes.keep_bytes)
        self.assertEqual(indexes.kept(), 2)
        # The most recent ones stayed: no parse for them.
        self.assertIsNotNone(self.look_up(indexes, "http://m/r3/x86_64/p1-1-r0.apk"))
        self.assertEqual(self.runner.calls, [])

    def test_newest_kept_even_if_larger_than_the_bound(self) -> None:
        indexes = ApkIndexes(self.store, keep_bytes=10)
        self.put_index("http://m/r/x86_64", synthetic_index(100))
        self.assertIsNotNone(self.look_up(indexes, "http://m/r/x86_64/p5-1-r0.apk"))
        self.assertEqual(indexes.kept(), 1)

    def test_refused_version_parsed_once_and_logged(self) -> None:
        indexes = ApkIndexes(self.store, max_entries=10)
        self.put_index(BASE, synthetic_index(11))
        parses = 0
        with capturedLogs() as events:
            for _ in range(3):
                found = Deferred.fromCoroutine(
                    indexes.entry_for(f"{BASE}/p1-1-r0.apk", cache_key)
                )
                parses += len(self.runner.calls)
                self.runner.run_all()
                self.assertIsNone(self.successResultOf(found))
        self.assertEqual(parses, 1)
        refused = [e for e in events if e.get("refused") == "too large"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["key"], cache_key(f"{BASE}/APKINDEX.tar.gz"))
        # A new version is parsed again.
        self.put_index(BASE, synthetic_index(5))
        self.assertIsNotNone(self.look_up(indexes, f"{BASE}/p1-1-r0.apk"))


class StoreCallsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = Store.open(self.mktemp(), 1 << 24, cast(Any, Clock()))
        self.addCleanup(self.store.close)

    def put(self, key: str, body: bytes, source_digest: str | None = None) -> Entry:
        writer = self.store.writer(key)
        writer.write(body)
        entry = writer.commit({}, source_digest=source_digest)
        assert entry is not None
        return entry

    def test_entries_under(self) -> None:
        for key in ("h/a/x.apk", "h/a/y.apk", "h/a/sub/z.apk", "h/ab/w.apk", "h/a"):
            self.put(key, b"x")
        self.assertEqual(
            [e.key for e in self.store.entries_under("h/a/")],
            ["h/a/sub/z.apk", "h/a/x.apk", "h/a/y.apk"],
        )

    def test_peek_many(self) -> None:
        keys = [f"k{i}" for i in range(1200)]
        for key in keys[::3]:
            self.put(key, b"x")
        found = self.store.peek_many(keys + ["k0"])
        self.assertEqual(set(found), set(keys[::3]))

    def test_remove_entry_only_the_same_version(self) -> None:
        old = self.put("k", b"old")
        new = self.put("k", b"new")
        self.assertFalse(self.store.remove_entry(old))
        self.assertEqual(self.store.peek("k"), new)
        self.assertTrue(self.store.remove_entry(new))
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(self.store.stats().entries, 0)
        self.assertEqual(os.listdir(os.path.join(self.store.directory, "tmp")), [])

    def test_source_digest_recorded_and_set(self) -> None:
        entry = self.put("k", b"body", "Q1abc")
        self.assertEqual(self.store.peek("k").source_digest, "Q1abc")  # type: ignore[union-attr]
        bare = self.put("j", b"body")
        self.assertIsNone(bare.source_digest)
        self.store.set_source_digest(bare, "Q1def")
        self.assertEqual(self.store.peek("j").source_digest, "Q1def")  # type: ignore[union-attr]
        self.assertEqual(entry.source_digest, "Q1abc")


class DisownedFilesTests(SynchronousTestCase):
    def entry(self, key: str, sha256: str | None) -> Entry:
        return Entry(key, 1, {}, sha256, 0.0, 0.0, 0.0, "f")

    def test_rule(self) -> None:
        digests = {"a": "11", "b": "22", "c": "33"}
        stored = {
            "a": self.entry("a", "11"),
            "b": self.entry("b", "2F"),
            "c": self.entry("c", None),
            "d": self.entry("d", "44"),
        }
        self.assertEqual(
            [(e.key, why) for e, why in disowned_files(digests, stored)],
            [("b", "sha256 2F stored, the page gives 22")],
        )

    def test_page_digests(self) -> None:
        page = ProjectPage(
            name="p",
            files=(
                ProjectFile(
                    filename="p-1.whl", url="http://h/f/p-1.whl",
                    hashes={"sha256": "AA"}, core_metadata={"sha256": "bb"},
                ),
                ProjectFile(filename="p-1.tar.gz", url="http://h/f/p-1.tar.gz"),
            ),
        )
        self.assertEqual(
            page_digests(page),
            {
                cache_key("http://h/f/p-1.whl"): "aa",
                cache_key("http://h/f/p-1.whl.metadata"): "bb",
            },
        )
