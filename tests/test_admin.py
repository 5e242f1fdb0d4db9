"""
Tests for :mod:`buildcache.ops.cli`, the ``buildcache`` command.

``stats``, ``purge`` and ``verify`` run in-process on cache directories
filled through a real :class:`~buildcache.store.Store`, also while a store
holds the directory's lock as a running server does.  ``warm`` runs as a
subprocess (``python -m buildcache.ops.cli``) against a server in this
process, which keeps serving while it runs (``getProcessOutputAndValue``),
in front of a local Alpine repository or a local simple index.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.ecosystems.apk.index import ApkIndex, ApkIndexEntry
from buildcache.ops.cli import (
    Progress,
    distribution_project,
    entry_kind,
    human_size,
    index_beside,
    key_matcher,
    main,
    resolve_apk_closure,
)
from buildcache.store import (
    INDEX_NAME,
    SCHEMA_VERSION,
    OfflineIndex,
    Store,
    metadata_size,
)
from tests.apkrepo import BuiltApk, RepositoryResource, build_apk, write_repository
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import listen, reactor, start_server, url_of
from tests.test_pip_e2e import clean_environment

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH = 1_700_000_000.0
MB = 1024 * 1024

APK_319 = "https://mirror.test/alpine/v3.19/main/x86_64/curl-8.5.0-r0.apk"
APK_320 = "https://mirror.test/alpine/v3.20/main/x86_64/curl-8.9.0-r0.apk"
APKINDEX_319 = "https://mirror.test/alpine/v3.19/main/x86_64/APKINDEX.tar.gz"
DEB = "http://deb.test/debian/pool/main/c/curl/curl_7.88.1-10_amd64.deb"
RELEASE = "http://deb.test/debian/dists/bookworm/InRelease"
WHEEL_A = "http://127.0.0.1:9000/files/bcdemo_a-2.0-py3-none-any.whl"
WHEEL_A_METADATA = "http://127.0.0.1:9000/files/bcdemo_a-2.0-py3-none-any.whl.metadata"
SDIST_A = "http://127.0.0.1:9000/files/BCDemo.A-1.0.tar.gz"
WHEEL_AB = "http://127.0.0.1:9000/files/bcdemo_ab-1.0-py3-none-any.whl"
WHEEL_B = "http://127.0.0.1:9000/files/bcdemo_b-1.0-py3-none-any.whl"
PAGE_A = "simple-page|http://127.0.0.1:9000/simple|bcdemo-a"
PAGE_B = "simple-page|http://127.0.0.1:9000/simple|bcdemo-b"
ROOT_PAGE = "simple-root|http://127.0.0.1:9000/simple|text/html"
OTHER = "http://example.test/downloads/tool.bin"


def body_of(size: int, seed: str) -> bytes:
    pattern = hashlib.sha256(seed.encode()).digest()
    return (pattern * (size // len(pattern) + 1))[:size]


#: Key to size, in the order they are stored (one clock second apart).
SAMPLE: dict[str, int] = {
    APKINDEX_319: 900,
    APK_319: 30_000,
    APK_320: 31_000,
    DEB: 2_500_000,
    RELEASE: 1_200,
    WHEEL_A: 5_000,
    WHEEL_A_METADATA: 300,
    SDIST_A: 7_000,
    WHEEL_AB: 5_100,
    WHEEL_B: 4_000,
    PAGE_A: 800,
    PAGE_B: 700,
    ROOT_PAGE: 600,
    OTHER: 12_345,
}


def populate(directory: str, objects: Mapping[str, int]) -> None:
    """
    Store an object of the given size under each key, through a real
    store, fetched one second apart from EPOCH on.
    """
    clock = Clock()
    clock.advance(EPOCH)
    store = Store.open(directory, 1 << 30, cast(IReactorTime, clock))
    try:
        for key, size in objects.items():
            writer = store.writer(key)
            writer.write(body_of(size, key))
            writer.commit({"content-type": "application/octet-stream"})
            clock.advance(1)
    finally:
        store.close()


def row_cost(key: str) -> int:
    """
    What the row of ``key`` costs as :func:`populate` writes it.
    """
    return metadata_size(key, json.dumps({"content-type": "application/octet-stream"}))


def stored_keys(directory: str) -> set[str]:
    with sqlite3.connect(os.path.join(directory, INDEX_NAME)) as db:
        return {key for (key,) in db.execute("SELECT key FROM entries")}


def object_files(directory: str) -> set[str]:
    found = set()
    for _, _, names in os.walk(os.path.join(directory, "objects")):
        found.update(names)
    return found


def object_path(directory: str, key: str) -> str:
    with sqlite3.connect(os.path.join(directory, INDEX_NAME)) as db:
        (name,) = db.execute("SELECT file FROM entries WHERE key = ?", (key,)).fetchone()
    return os.path.join(directory, "objects", name[:2], name)


def run(*argv: str) -> tuple[int, str, str]:
    """
    Run the command in-process; its exit status, stdout and stderr.
    """
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, environ={})
    return code, out.getvalue(), err.getvalue()


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = os.path.abspath(self.mktemp())
        populate(self.cache_dir, SAMPLE)


class StatsTests(CacheTestCase):
    def test_json_totals(self) -> None:
        """
        ``stats --json`` counts every entry and byte, names the first and
        last fetched entries and lists the ten largest, largest first.
        """
        code, out, err = run("stats", "--json", "--cache-dir", self.cache_dir)
        self.assertEqual((code, err), (0, ""))
        stats = json.loads(out)
        self.assertEqual(stats["cache_dir"], self.cache_dir)
        self.assertEqual(stats["entries"], len(SAMPLE))
        # Rows count as the server counts them (see test_agrees_with_server).
        self.assertGreater(stats["metadata_bytes"], 0)
        self.assertEqual(stats["bytes"], sum(SAMPLE.values()) + stats["metadata_bytes"])
        self.assertEqual(stats["oldest"]["key"], APKINDEX_319)
        self.assertEqual(stats["oldest"]["fetched_at"], EPOCH)
        self.assertEqual(stats["newest"]["key"], OTHER)
        expected_largest = sorted(SAMPLE.items(), key=lambda item: -item[1])[:10]
        self.assertEqual(
            [(item["key"], item["size"]) for item in stats["largest"]],
            expected_largest,
        )

    def test_json_kinds(self) -> None:
        """
        Entries are counted by kind: packages of each system, index files
        of every front end, and the rest.
        """
        code, out, _ = run("stats", "--json", "--cache-dir", self.cache_dir)
        kinds = json.loads(out)["kinds"]
        self.assertEqual(code, 0)
        self.assertEqual(
            {kind: total["entries"] for kind, total in kinds.items()},
            {"apk": 2, "deb": 1, "wheel": 3, "sdist": 1, "manifest": 0, "blob": 0,
             "index": 6, "other": 1},
        )
        self.assertEqual(kinds["deb"]["bytes"], SAMPLE[DEB] + row_cost(DEB))
        self.assertEqual(
            kinds["apk"]["bytes"],
            SAMPLE[APK_319] + SAMPLE[APK_320] + row_cost(APK_319) + row_cost(APK_320),
        )

    def test_text(self) -> None:
        """
        The text report gives the totals in human units and the largest
        entry first.
        """
        code, out, _ = run("stats", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assertIn(f"Entries          {len(SAMPLE)}\n", out)
        rows = sum(row_cost(key) for key in SAMPLE)
        total = sum(SAMPLE.values()) + rows
        self.assertIn(
            f"Stored           {human_size(total)} ({total} bytes, {rows} of them"
            " index rows)\n",
            out,
        )
        self.assertIn("Oldest entry     2023-11-14 22:13:20Z  " + APKINDEX_319, out)
        largest = out.split("Largest entries\n")[1].splitlines()
        self.assertEqual(largest[0].split(), ["2.4", "MiB", DEB])
        self.assertEqual(len(largest), 10)

    def test_reads_only(self) -> None:
        """
        ``stats`` changes nothing: the same rows, access times and files.
        """
        def snapshot() -> list[tuple[Any, ...]]:
            with sqlite3.connect(os.path.join(self.cache_dir, INDEX_NAME)) as db:
                return db.execute("SELECT * FROM entries ORDER BY key").fetchall()

        before = snapshot(), object_files(self.cache_dir)
        run("stats", "--cache-dir", self.cache_dir)
        self.assertEqual((snapshot(), object_files(self.cache_dir)), before)

    def test_agrees_with_server(self) -> None:
        """
        ``stats`` counts what the server counts against --max-size: bodies
        and rows.
        """
        _, out, _ = run("stats", "--json", "--cache-dir", self.cache_dir)
        store = Store.open(self.cache_dir, 1 << 30, cast(IReactorTime, Clock()))
        try:
            server = store.stats()
        finally:
            store.close()
        stats = json.loads(out)
        self.assertEqual(
            (stats["bytes"], stats["metadata_bytes"]),
            (server.bytes_stored, server.bytes_metadata),
        )

    def test_empty_cache(self) -> None:
        empty = self.mktemp()
        populate(empty, {})
        code, out, _ = run("stats", "--json", "--cache-dir", empty)
        stats = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual((stats["entries"], stats["bytes"], stats["oldest"]), (0, 0, None))

    def test_no_cache_here(self) -> None:
        """
        A directory without an index is an error that points at
        ``--cache-dir``, and nothing is created there.
        """
        nowhere = os.path.abspath(self.mktemp())
        code, out, err = run("stats", "--cache-dir", nowhere)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("holds no buildcache index", err)
        self.assertIn("--cache-dir", err)
        self.assertFalse(os.path.exists(nowhere))

    def test_foreign_index(self) -> None:
        """
        An SQLite file that is not a buildcache index is refused.
        """
        foreign = self.mktemp()
        os.makedirs(foreign)
        with sqlite3.connect(os.path.join(foreign, INDEX_NAME)) as db:
            db.execute("CREATE TABLE entries (key TEXT)")
        code, _, err = run("stats", "--cache-dir", foreign)
        self.assertEqual(code, 2)
        self.assertIn("is not a buildcache index", err)

    def test_default_cache_dir(self) -> None:
        """
        Without ``--cache-dir`` the server's default is used
        (``$CACHE_DIRECTORY`` first).
        """
        out = io.StringIO()
        code = main(
            ["stats", "--json"], stdout=out, stderr=io.StringIO(),
            environ={"CACHE_DIRECTORY": self.cache_dir},
        )
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out.getvalue())["entries"], len(SAMPLE))


class PurgeTests(CacheTestCase):
    def assert_removed(self, removed: set[str]) -> None:
        """
        Exactly ``removed`` lost their rows and their files.
        """
        self.assertEqual(stored_keys(self.cache_dir), set(SAMPLE) - removed)
        self.assertEqual(len(object_files(self.cache_dir)), len(SAMPLE) - len(removed))

    def test_glob(self) -> None:
        """
        A glob removes the matching entries, rows and files, and reports
        them and the bytes freed.
        """
        code, out, _ = run("purge", "*/alpine/v3.19/*", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_removed({APK_319, APKINDEX_319})
        # Rows freed count too, as in stats.
        freed = (
            SAMPLE[APK_319] + SAMPLE[APKINDEX_319]
            + row_cost(APK_319) + row_cost(APKINDEX_319)
        )
        self.assertIn(f"removed {APK_319}", out)
        self.assertIn(f"Removed 2 entries, {human_size(freed)} freed ({freed} bytes)", out)

    def test_several_globs(self) -> None:
        code, _, _ = run("purge", "*.apk", "*.deb", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_removed({APK_319, APK_320, DEB})

    def test_url_glob(self) -> None:
        """
        A glob written as a URL matches keys, which name their scheme.
        """
        code, _, _ = run(
            "purge", "https://mirror.test/alpine/*/curl-*", "--cache-dir", self.cache_dir
        )
        self.assertEqual(code, 0)
        self.assert_removed({APK_319, APK_320})

    def test_url_glob_of_the_other_scheme(self) -> None:
        """
        A URL glob matches only keys of its own scheme.
        """
        code, _, _ = run(
            "purge", "http://mirror.test/alpine/*/curl-*", "--cache-dir", self.cache_dir
        )
        self.assertEqual(code, 0)
        self.assert_removed(set())

    def test_glob_without_scheme(self) -> None:
        """
        A glob without a scheme matches http and https keys alike, as it
        did when keys had none.
        """
        code, _, _ = run(
            "purge", "mirror.test/alpine/*/curl-*", "deb.test/*.deb",
            "--cache-dir", self.cache_dir,
        )
        self.assertEqual(code, 0)
        self.assert_removed({APK_319, APK_320, DEB})

    def test_project(self) -> None:
        """
        ``--project`` (any spelling) removes the project's pages and every
        distribution file of it, including metadata and old-style sdist
        names, and nothing of a project whose name it only prefixes.
        """
        code, out, _ = run("purge", "--project", "BCDemo_A", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        removed = {PAGE_A, WHEEL_A, WHEEL_A_METADATA, SDIST_A}
        self.assert_removed(removed)
        self.assertIn("Removed 4 entries", out)

    def test_dry_run(self) -> None:
        """
        ``--dry-run`` lists what would go and removes nothing.
        """
        code, out, _ = run("purge", "--dry-run", "*.apk", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_removed(set())
        self.assertIn(f"would remove {APK_319}", out)
        self.assertIn(f"would remove {APK_320}", out)
        self.assertIn("Would remove 2 entries", out)

    def test_nothing_matches(self) -> None:
        code, out, _ = run("purge", "*.rpm", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_removed(set())
        self.assertIn("Removed 0 entries", out)

    def test_needs_a_pattern(self) -> None:
        code, _, err = run("purge", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 2)
        self.assertIn("PATTERN or --project", err)
        self.assert_removed(set())

    def test_while_the_server_runs(self) -> None:
        """
        With a store holding the directory (a running server), purge
        works; the store then misses the purged key, still serves the
        others, and a reader of the purged file keeps reading it.
        """
        clock = Clock()
        clock.advance(EPOCH + 100)
        store = Store.open(self.cache_dir, 1 << 30, cast(IReactorTime, clock))
        self.addCleanup(store.close)
        reading = store.lookup(APK_320)
        assert reading is not None
        self.addCleanup(reading.close)

        code, _, err = run("purge", "*/v3.20/*", "--cache-dir", self.cache_dir)

        self.assertEqual((code, err), (0, ""))
        self.assertIsNone(store.lookup(APK_320))
        kept = store.lookup(APK_319)
        assert kept is not None
        kept.close()
        self.assertEqual(
            os.pread(reading.fd, SAMPLE[APK_320] + 1, 0), body_of(SAMPLE[APK_320], APK_320)
        )
        # The pending access time of a purged key is written harmlessly,
        # and the store's totals follow the purge.
        store.flush()
        self.assertEqual(stored_keys(self.cache_dir), set(SAMPLE) - {APK_320})
        self.assertEqual(store.entry_count, len(SAMPLE) - 1)
        self.assertEqual(store.total_size, sum(SAMPLE.values()) - SAMPLE[APK_320])

    def test_replaced_meanwhile(self) -> None:
        """
        An entry the server replaced after purge read it is not removed:
        the new version's row and file stay.
        """
        with OfflineIndex.open(self.cache_dir) as index:
            (old,) = [row for row in index.rows() if row.key == OTHER]
            clock = Clock()
            store = Store.open(self.cache_dir, 1 << 30, cast(IReactorTime, clock))
            writer = store.writer(OTHER)
            writer.write(b"a newer version")
            writer.commit({})
            store.close()
            self.assertEqual(index.remove([old]), [])
        with open(object_path(self.cache_dir, OTHER), "rb") as body:
            self.assertEqual(body.read(), b"a newer version")


class VerifyTests(CacheTestCase):
    def test_clean(self) -> None:
        """
        A sound cache verifies with exit status 0 and every byte checked.
        """
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        total = sum(SAMPLE.values())
        self.assertIn(
            f"Checked {len(SAMPLE)} entries, {human_size(total)} ({total} bytes):"
            " 0 corrupt, 0 missing, 0 disagreeing with their index, 0 without a digest",
            out,
        )
        self.assertEqual(stored_keys(self.cache_dir), set(SAMPLE))

    def test_corrupt(self) -> None:
        """
        A file changed in place (same size; here its last byte, past the
        first megabyte read) is found, its row and file removed, and the
        exit status is 1; the others stay.
        """
        path = object_path(self.cache_dir, DEB)
        with open(path, "r+b") as body:
            body.seek(SAMPLE[DEB] - 1)
            last = body.read(1)
            body.seek(SAMPLE[DEB] - 1)
            body.write(bytes([last[0] ^ 0xFF]))
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 1)
        self.assertIn(f"corrupt, removed: {DEB}", out)
        self.assertIn(f"Checked {len(SAMPLE)} entries", out)
        self.assertIn("1 corrupt, 0 missing", out)
        self.assertEqual(stored_keys(self.cache_dir), set(SAMPLE) - {DEB})
        self.assertFalse(os.path.exists(path))
        self.assertEqual(len(object_files(self.cache_dir)), len(SAMPLE) - 1)
        # Once the bad entry is gone the cache is clean again.
        self.assertEqual(run("verify", "--cache-dir", self.cache_dir)[0], 0)

    def test_truncated(self) -> None:
        path = object_path(self.cache_dir, WHEEL_B)
        os.truncate(path, 10)
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 1)
        self.assertIn(f"corrupt, removed: {WHEEL_B} (10 bytes, the index says 4000)", out)
        self.assertNotIn(WHEEL_B, stored_keys(self.cache_dir))

    def test_missing_file(self) -> None:
        """
        A row whose file is gone is reported and dropped.
        """
        os.unlink(object_path(self.cache_dir, PAGE_B))
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 1)
        self.assertIn(f"file missing, row removed: {PAGE_B}", out)
        self.assertIn("0 corrupt, 1 missing", out)
        self.assertEqual(stored_keys(self.cache_dir), set(SAMPLE) - {PAGE_B})

    def test_without_digest(self) -> None:
        """
        Entries without a known sha256 are counted, not checked.
        """
        with sqlite3.connect(os.path.join(self.cache_dir, INDEX_NAME)) as db:
            db.execute("UPDATE entries SET sha256 = NULL WHERE key = ?", (OTHER,))
        os.truncate(object_path(self.cache_dir, OTHER), 0)
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assertIn(f"Checked {len(SAMPLE) - 1} entries", out)
        self.assertIn("1 without a digest", out)


class ProgressTests(SynchronousTestCase):
    def test_terminal(self) -> None:
        """
        On a terminal the bar is redrawn in place and ends at 100%.
        """
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        stream = Terminal()
        progress = Progress.on(stream, 2, 3 * MB)
        progress.start("one.apk")
        progress.advance(MB)
        progress.finished("one.apk", MB)
        progress.start("two.apk")
        progress.advance(2 * MB)
        progress.finished("two.apk", 2 * MB)
        progress.close()
        text = stream.getvalue()
        self.assertTrue(text.startswith("\r["))
        self.assertNotIn("\n", text[:-1])
        last = text.rstrip("\n").split("\r")[-1]
        self.assertIn("100%  2/2  3.0 MiB/3.0 MiB", last)
        self.assertIn("[" + "#" * 24 + "]", last)

    def test_log(self) -> None:
        """
        Elsewhere, one line per finished file.
        """
        stream = io.StringIO()
        progress = Progress.on(stream, 2, 3 * MB)
        progress.start("one.apk")
        progress.advance(MB)
        progress.finished("one.apk", MB, "MISS")
        progress.close()
        self.assertEqual(stream.getvalue(), "[1/2] one.apk  1.0 MiB  MISS\n")


class NamesTests(SynchronousTestCase):
    def test_distribution_project(self) -> None:
        cases = {
            "bcdemo_a-2.0-py3-none-any.whl": "bcdemo-a",
            "bcdemo_a-2.0-py3-none-any.whl.metadata": "bcdemo-a",
            "python-dateutil-2.8.2.tar.gz": "python-dateutil",
            "zope.interface-6.0.zip": "zope-interface",
            "Django-4.2.tar.gz": "django",
            "curl-8.9.0-r0.apk": None,
            "README": None,
            "-1.0.tar.gz": None,
        }
        self.assertEqual({name: distribution_project(name) for name in cases}, cases)

    def test_entry_kind(self) -> None:
        self.assertEqual({key: entry_kind(key) for key in SAMPLE}, {
            APKINDEX_319: "index", APK_319: "apk", APK_320: "apk", DEB: "deb",
            RELEASE: "index", WHEEL_A: "wheel", WHEEL_A_METADATA: "index",
            SDIST_A: "sdist", WHEEL_AB: "wheel", WHEEL_B: "wheel",
            PAGE_A: "index", PAGE_B: "index", ROOT_PAGE: "index", OTHER: "other",
        })

    def test_private_entries_and_variants(self) -> None:
        """
        A private entry or a variant (``#p=``, ``#v=`` after the URL) has
        its URL's kind, and goes with its URL's glob or project.
        """
        private = DEB + "#p=" + "a" * 32
        variant = WHEEL_B + "#v=" + "b" * 32
        both = APK_319 + "#p=" + "c" * 32 + "#v=" + "d" * 32
        self.assertEqual(
            [entry_kind(key) for key in (private, variant, both)], ["deb", "wheel", "apk"]
        )
        matches = key_matcher(["*.deb", "*/curl-8.5.0-r0.apk"], ["bcdemo-b"])
        self.assertEqual([matches(key) for key in (private, variant, both)], [True] * 3)
        self.assertFalse(key_matcher(["*.deb#p=*"], [])(private))

    def test_glob_without_scheme_does_not_reach_into_index_keys(self) -> None:
        """
        The index's page keys hold their upstream's URL after a prefix: a
        host glob meant for files does not remove the pages (regression:
        it did once globs without a scheme matched after ``://``).
        """
        page = "simple-page|https://index.test/simple|bcdemo-a"
        self.assertFalse(key_matcher(["index.test/*"], [])(page))
        self.assertTrue(key_matcher(["index.test/*"], [])("https://index.test/files/x.whl"))
        self.assertTrue(key_matcher(["simple-page|*"], [])(page))

    def test_matcher(self) -> None:
        matches = key_matcher(["*/tool.*"], ["bcdemo.b"])
        self.assertEqual(
            {key for key in SAMPLE if matches(key)}, {OTHER, WHEEL_B, PAGE_B}
        )

    def test_human_size(self) -> None:
        self.assertEqual(
            [human_size(n) for n in (0, 1023, 1024, 1536 * 1024, 5 * 1024**4)],
            ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB"],
        )


def index_of(*entries: ApkIndexEntry) -> ApkIndex:
    return ApkIndex({entry.filename: entry for entry in entries})


def entry(
    name: str, version: str = "1.0-r0", depends: Sequence[str] = (),
    provides: Sequence[str] = (),
) -> ApkIndexEntry:
    return ApkIndexEntry(
        name, version, 100, b"\0" * 20, "x86_64", depends=tuple(depends),
        provides=tuple(provides),
    )


class ResolveTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """
        ``so:`` and ``cmd:`` dependencies resolve through other packages'
        ``p:`` lines, version stripped; a package name beats a provider.
        """
        resolution = resolve_apk_closure(
            [("http://s/main", index_of(
                entry("curl", depends=["so:libcurl.so.4", "cmd:sh", "musl"]),
                entry("libcurl", provides=["so:libcurl.so.4=4.8.0"]),
                entry("busybox", provides=["cmd:sh=1.36.1-r29", "cmd:musl"]),
                entry("musl", provides=["so:libc.musl-x86_64.so.1=1"]),
            ))],
            ["curl"],
        )
        self.assertEqual(
            [found.name for _, found in resolution.packages],
            ["curl", "libcurl", "busybox", "musl"],
        )
        self.assertEqual(resolution.unresolved, ())

    def test_closure(self) -> None:
        """
        Dependencies are followed by name, without their version
        constraints; conflicts ask for nothing; cycles end.
        """
        main_index = index_of(
            entry("app", depends=["liba>=1.0", "libb~2", "!oldapp", "so:libc.musl-x86_64.so.1"]),
            entry("liba", depends=["libb", "cmd:sh", "app"]),
            entry("libb", "2.1-r0"),
            entry("oldapp"),
            entry("unrelated"),
        )
        resolution = resolve_apk_closure([("http://s/main", main_index)], ["app"])
        self.assertEqual(
            [found.name for _, found in resolution.packages], ["app", "liba", "libb"]
        )
        self.assertEqual(resolution.unresolved, ("so:libc.musl-x86_64.so.1", "cmd:sh"))
        self.assertEqual(resolution.not_found, ())

    def test_repositories_in_order(self) -> None:
        """
        The first repository that lists a name provides it; names no
        repository lists are reported.
        """
        resolution = resolve_apk_closure(
            [
                ("http://s/main", index_of(entry("a", depends=["b"]), entry("b", "1"))),
                ("http://s/community", index_of(entry("b", "2"), entry("c"))),
            ],
            ["a", "c", "nope"],
        )
        self.assertEqual(
            [(repository, found.filename) for repository, found in resolution.packages],
            [("http://s/main", "a-1.0-r0.apk"), ("http://s/community", "c-1.0-r0.apk"),
             ("http://s/main", "b-1.apk")],
        )
        self.assertEqual(resolution.not_found, ("nope",))


def closed_port() -> int:
    """
    A 127.0.0.1 port nothing listens on.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class WarmArgumentsTests(SynchronousTestCase):
    def test_index_beside_the_server(self) -> None:
        """
        Without --index, pip is sent to the index port of --server's host,
        not to this machine's (regression: warm run from another machine
        sent pip to 127.0.0.1).
        """
        self.assertEqual(index_beside("http://box.lan:8899"), "http://box.lan:3141/simple/")
        self.assertEqual(index_beside("http://[fd00::5]:8899/"), "http://[fd00::5]:3141/simple/")
        self.assertEqual(index_beside("http://127.0.0.1:8899"), "http://127.0.0.1:3141/simple/")

    def test_needs_something(self) -> None:
        code, _, err = run("warm")
        self.assertEqual(code, 2)
        self.assertIn("--requirements FILE and/or --apk", err)

    def test_apk_needs_repository(self) -> None:
        code, _, err = run("warm", "--apk", "curl")
        self.assertEqual(code, 2)
        self.assertIn("--apk needs --alpine-repo", err)

    def test_https_repository(self) -> None:
        """
        An https repository cannot be cached through a proxy: the command
        says to use the mirror route.
        """
        code, _, err = run(
            "warm", "--apk", "curl", "--alpine-repo", "https://mirror.test/alpine/v3.20/main"
        )
        self.assertEqual(code, 2)
        self.assertIn("mirror route", err)

    def test_bad_values_name_their_option(self) -> None:
        for option, value, says in [
            ("--timeout", "-1", "above 0"),
            ("--timeout", "soon", "above 0"),
            ("--server", "127.0.0.1:8899", "not an http:// URL"),
            ("--index", "127.0.0.1:3141/simple/", "not an http:// URL"),
        ]:
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            code, _, _ = run(
                "warm", option, value, "--apk", "curl", "--alpine-repo", "alpine/v3.20/main"
            )
            self.assertEqual(code, 2, option)
            self.assertIn(f"argument {option}", stderr.getvalue())
            self.assertIn(says, stderr.getvalue())

    def test_server_down(self) -> None:
        server = f"http://127.0.0.1:{closed_port()}"
        code, _, err = run(
            "warm", "--server", server, "--apk", "curl", "--alpine-repo", "alpine/v3.20/main"
        )
        self.assertEqual(code, 2)
        self.assertIn(f"cannot reach the server at {server}", err)


async def run_command(argv: Sequence[str], **environment: str) -> tuple[int, str, str]:
    """
    Run ``python -m buildcache.ops.cli ARGV`` while the reactor keeps
    serving.
    """
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "buildcache.ops.cli", *argv],
        env=clean_environment(environment), path=REPO_ROOT, reactor=reactor,
    )
    return code, out.decode(), err.decode()


class WarmApkTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        root = Path(self.mktemp())
        self.packages: dict[str, BuiltApk] = {
            apk.name: apk for apk in [
                build_apk("app", "1.0-r0", depends=[
                    "liba>=1.0", "so:libc.musl-x86_64.so.1", "!oldapp",
                ]),
                build_apk("liba", "1.2-r0", depends=["libb"], data_size_pad=300_000),
                build_apk("libb", "0.9-r1"),
                build_apk("unrelated", "3.0-r0"),
            ]
        }
        write_repository(root / "v3.20" / "main", list(self.packages.values()))
        self.origin = RepositoryResource(root)
        self.running = start_server(self, upstream=self.origin)
        self.server = f"http://127.0.0.1:{self.running.proxy_port}"

    async def warm(self, *names: str) -> tuple[int, str, str]:
        return await run_command([
            "warm", "--server", self.server, "--apk", *names,
            "--alpine-repo", f"{self.server}/up/v3.20/main", "--arch", "x86_64",
        ])

    def stored_packages(self) -> dict[str, int]:
        return {
            entry.key.rpartition("/")[2]: entry.size
            for entry in self.running.store.keys()
            if entry.key.endswith(".apk")
        }

    async def test_closure_stored(self) -> None:
        """
        ``warm --apk`` fetches the index and each package of the closure
        once from upstream through the server, which stores them; a second
        run is served from the cache alone.
        """
        code, out, err = await self.warm("app")
        self.assertEqual(code, 0, err)
        closure = ["app", "liba", "libb"]
        self.assertEqual(
            self.stored_packages(),
            {self.packages[name].filename: self.packages[name].size for name in closure},
        )
        expected_requests = {"/v3.20/main/x86_64/APKINDEX.tar.gz": 1} | {
            f"/v3.20/main/x86_64/{self.packages[name].filename}": 1 for name in closure
        }
        self.assertEqual(dict(self.origin.request_counts), expected_requests)
        self.assertIn("apk: 3 packages", out)
        self.assertIn("3 MISS", out)
        self.assertIn("so:libc.musl-x86_64.so.1", err)
        # stderr is a pipe: one line per package, not a redrawn bar.
        lines = [line for line in err.splitlines() if line.startswith("[")]
        self.assertEqual(
            [line.split()[:2] for line in lines],
            [["[1/3]", "app-1.0-r0.apk"], ["[2/3]", "liba-1.2-r0.apk"], ["[3/3]", "libb-0.9-r1.apk"]],
        )
        self.assertNotIn("\r", err)

        code, out, err = await self.warm("app")
        self.assertEqual(code, 0, err)
        self.assertIn("3 HIT", out)
        self.assertEqual(dict(self.origin.request_counts), expected_requests)

    async def test_unknown_package(self) -> None:
        """
        A package no repository lists fails the run (status 1); the others
        are still fetched.
        """
        code, _, err = await self.warm("libb", "nosuchthing")
        self.assertEqual(code, 1)
        self.assertIn("no such package in the repositories: nosuchthing", err)
        self.assertEqual(list(self.stored_packages()), [self.packages["libb"].filename])

    async def test_upstream_failure(self) -> None:
        """
        A package the server cannot get is reported, with status 1.
        """
        self.origin.set_status(f"/v3.20/main/x86_64/{self.packages['libb'].filename}", 503)
        code, out, err = await self.warm("liba")
        self.assertEqual(code, 1)
        self.assertIn(f"failed: {self.server}/up/v3.20/main/x86_64/libb-0.9-r1.apk", err)
        self.assertIn("apk: 1 packages", out)
        self.assertEqual(list(self.stored_packages()), [self.packages["liba"].filename])


class WarmRequirementsTests(TestCase):
    timeout = 120

    async def test_closure_stored(self) -> None:
        """
        ``warm --requirements`` lets pip resolve the closure through the
        server's index: every page and wheel pip needed is stored after one
        upstream request each, and pip's download directory is gone.
        """
        upstream = StaticSimpleIndex(build_index(Path(self.mktemp())))
        upstream_port = listen(upstream)
        self.addCleanup(upstream_port.stopListening)
        running = start_server(self, {"pypi_upstreams": (url_of(upstream_port, "/simple"),)})
        work = Path(self.mktemp()).resolve()
        temporary = work / "tmp"
        temporary.mkdir(parents=True)
        requirements = work / "requirements.txt"
        requirements.write_text("bcdemo-a\n")

        code, out, err = await run_command(
            ["warm", "--requirements", str(requirements),
             "--index", f"http://127.0.0.1:{running.index_port}/simple/"],
            TMPDIR=str(temporary),
        )

        self.assertEqual(code, 0, err)
        self.assertIn("pip: 2 files", out)
        wheels = ["bcdemo_a-2.0-py3-none-any.whl", "bcdemo_b-1.0-py3-none-any.whl"]
        keys = {entry.key for entry in running.store.keys()}
        authority = urlsplit(url_of(upstream_port)).netloc
        for wheel in wheels:
            self.assertIn(f"http://{authority}/files/{wheel}", keys)
            self.assertEqual(upstream.requests[f"/files/{wheel}"], 1)
        self.assertEqual(upstream.requests["/simple/bcdemo-a/"], 1)
        self.assertEqual(upstream.requests["/simple/bcdemo-b/"], 1)
        self.assertEqual({p: n for p, n in upstream.requests.items() if n != 1}, {})
        self.assertEqual(list(temporary.iterdir()), [])


class OlderIndexTests(SynchronousTestCase):
    """
    The admin commands on an index of an older schema: they migrate it as
    the server would when no server holds the directory, and refuse while
    one does (it is an older buildcache, which would go on writing rows of
    its own schema into the migrated index).
    """

    def setUp(self) -> None:
        from tests.test_store import make_version_1_cache

        self.cache_dir = os.path.abspath(self.mktemp())
        make_version_1_cache(self.cache_dir, {"mirror.test/pool/a.deb": b"deb"})

    def version(self) -> int:
        with sqlite3.connect(os.path.join(self.cache_dir, INDEX_NAME)) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    def test_migrated_when_no_server_holds_it(self) -> None:
        code, out, err = run("stats", "--cache-dir", self.cache_dir, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["entries"], 1)
        self.assertEqual(self.version(), SCHEMA_VERSION)
        self.assertEqual(stored_keys(self.cache_dir), {"http://mirror.test/pool/a.deb"})

    def test_refused_while_an_older_server_holds_it(self) -> None:
        lock_fd = os.open(os.path.join(self.cache_dir, "lock"), os.O_RDWR | os.O_CREAT)
        self.addCleanup(os.close, lock_fd)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = run("stats", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 2, out)
        self.assertIn("restart the server with this version first", err)
        self.assertEqual(self.version(), 1)
        self.assertEqual(stored_keys(self.cache_dir), {"mirror.test/pool/a.deb"})
