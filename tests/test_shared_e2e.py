"""
End-to-end: two ``twistd buildcache`` nodes, each with its own cache
directory, sharing one SeaweedFS bucket (the shared tier), between ``curl``
(or ``pip``) and a static origin, everything on 127.0.0.1.

- The origin (:class:`tests.shared_parts.Origin`) serves apt ``pool/``
  files (immutable) and counts GETs per path: "0 upstream requests" and
  "one upstream fetch per file" are read there.  Where a race needs time it
  holds a response half-way until the test has seen both nodes waiting:
  nothing waits on a timer.
- The nodes reach the store through a :class:`~tests.shared_parts.StoreGate`,
  which records every S3 request and can hold an upload mid-body, so the
  store can be killed while a node is uploading.
- The nodes share a secret (``--shared-secret-file``): apt files have no
  independent digest, so their records are signed.
- The test reads and writes the bucket itself with the store's dummy
  keys (:class:`~tests.shared_parts.Bucket`): to see what was published
  and to corrupt a blob.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.apkrepo import BUILD_TIME, build_apk, write_repository
from tests.pyindex import StaticSimpleIndex, build_index
from tests.seaweed_parts import SECRET_KEY, Seaweed, SeaweedCase, start_seaweed
from tests.shared_parts import (
    KB,
    MB,
    Bucket,
    Fetched,
    Node,
    Origin,
    blob_name,
    curl,
    fetch_one,
    poll,
    pool_path,
    sha256,
    start_node,
    start_origin,
    write_files,
    write_secret,
)
from tests.store_gate import StoreGate
from tests.support import listen, pattern_bytes, url_of
from tests.test_pip_e2e import clean_environment

#: Events a node logs when the store fails and when it is back.
FAILING = "shared_store_failing"
RECOVERED = "shared_store_recovered"
#: A presigned URL's signature, in full: never in a log.
_SIGNATURE = re.compile(r"X-Amz-Signature=[0-9a-fA-F]{16}")


class _Shared:
    """
    What every test here sets up: an origin over ``files``, a bucket with
    a prefix of its own, a gate in front of the store, a shared secret.
    """

    timeout = 240
    work: Path
    origin: Origin
    files: dict[str, bytes]
    shared: Bucket
    gate: StoreGate
    secret_file: Path

    def set_up_parts(self: Any, store: Seaweed, bucket: str, sizes: dict[str, int]) -> None:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed (.ci/run installs it)")
        self.work = Path(self.mktemp()).resolve()
        (self.work / "www").mkdir(parents=True)
        self.files = write_files(self.work / "www", sizes, seed=self.id().encode())
        self.origin = start_origin(self, self.work / "www")
        self.shared = Bucket(store, bucket, "cache/")
        self.gate = StoreGate(store.ports["s3.port"])
        self.gate.listen(self)
        self.secret_file = write_secret(self.work)

    async def node(self: Any, name: str, *options: str, shared: bool = True) -> Node:
        return await start_node(
            self, name, self.work, self.origin.url,
            self.shared.shared_store(self.gate.endpoint) if shared else None,
            self.secret_file, *options,
        )

    async def nodes(self, *names: str) -> list[Node]:
        """Nodes ``names``, started together."""
        started: list[Node] = await gatherResults(
            [Deferred.fromCoroutine(self.node(name)) for name in names]
        )
        return started

    async def published(self, data: bytes, bound: float = 30.0) -> None:
        """Wait until a record and a whole blob of ``data`` are in the bucket."""
        await poll(
            lambda: self.shared.has_record_and_blob(data),
            f"a record and blob for {sha256(data)[:12]}", bound, every=0.2,
        )

    def assert_served(self: Any, fetched: Fetched, path: str, x_cache: str | None = None) -> None:
        self.assertEqual(
            (fetched.exit_code, fetched.status), (0, 200), f"{fetched.url}: {fetched.error}"
        )
        self.assertEqual(sha256(fetched.body), sha256(self.files[path]), fetched.url)
        if x_cache is not None:
            self.assertEqual(fetched.x_cache, x_cache, fetched.url)

    async def assert_no_secrets(self: Any, *nodes: Node) -> None:
        """
        Neither the AWS secret key, the shared secret nor a presigned
        URL's signature is in a node's log, status page, stats or metrics.
        """
        shared_secret = self.secret_file.read_bytes().strip().decode()
        for node in nodes:
            shown = {"log": node.log_text()}
            for path in ("/", "/-/stats.json", "/-/metrics"):
                shown[path] = (await node.page(path)).decode(errors="replace")
            for where, text in shown.items():
                self.assertNotIn(SECRET_KEY, text, (node.name, where))
                self.assertNotIn(shared_secret, text, (node.name, where))
                self.assertIsNone(_SIGNATURE.search(text), (node.name, where))


class SharingTests(_Shared, SeaweedCase):
    """One store for the class; each test has its own bucket."""

    async def setUp(self) -> None:  # type: ignore[override]
        await SeaweedCase.setUp(self)
        small, medium, large = (pool_path(n) for n in ("small", "medium", "large"))
        racing = [pool_path(f"race{n}") for n in range(2)]
        self.paths = {"small": small, "medium": medium, "large": large}
        self.racing = racing
        sizes = {small: 100 * KB, medium: 3 * MB, large: 24 * MB}
        sizes.update({path: 4 * MB for path in racing})
        sizes[pool_path("corrupt")] = 2 * MB
        #: Suite metadata: changes under its name, so it stays per node.
        self.index = "dists/stable/Release"
        sizes[self.index] = 4 * KB
        self.set_up_parts(self.store, self.bucket(), sizes)

    async def test_node_b_serves_what_node_a_fetched(self) -> None:
        """
        What node A fetched (a small, a medium and a 24 MB file, streamed)
        node B serves from the shared tier: byte-identical, ``X-Cache:
        HIT``, with no request to the origin; then from its own disk.  A
        mutable file (suite metadata) is not shared: each node fetches it.
        """
        a, b = await self.nodes("a", "b")
        self.assert_served(await fetch_one(a.url(self.index), self.work / "ai"), self.index, "MISS")
        paths = list(self.paths.values())
        for n, fetched in enumerate(await curl([a.url(p) for p in paths], self.work / "a")):
            self.assert_served(fetched, paths[n], "MISS")
        for path in paths:
            self.assertEqual(self.origin.gets(path), 1, path)
            await self.published(self.files[path])
        for n, fetched in enumerate(await curl([b.url(p) for p in paths], self.work / "b")):
            self.assert_served(fetched, paths[n], "HIT")
        self.assertEqual({p: self.origin.gets(p) for p in paths}, {p: 1 for p in paths})
        # B stored them: its own disk serves them now, still no upstream.
        for n, fetched in enumerate(await curl([b.url(p) for p in paths], self.work / "b2")):
            self.assert_served(fetched, paths[n], "HIT")
        self.assertEqual(sum(self.origin.gets(p) for p in paths), len(paths))
        # The blobs are content-addressed and hold the bodies.
        for path in paths:
            self.assertIn(blob_name(self.files[path]), self.shared.names("blobs/"))
        figures = await b.tier()
        self.assertEqual(
            (figures["healthy"], figures["conditional"], figures["signed"]), (True, True, True)
        )
        self.assertEqual(
            (figures["hits"], figures["hit_bytes"]),
            (len(paths), sum(len(self.files[p]) for p in paths)),
        )
        self.assertEqual((await a.tier())["uploads"], len(paths))
        # The index, fetched before them, was not published; B asks the
        # origin for it.
        self.assertNotIn(blob_name(self.files[self.index]), self.shared.names("blobs/"))
        self.assert_served(await fetch_one(b.url(self.index), self.work / "bi"), self.index, "MISS")
        self.assertEqual(self.origin.gets(self.index), 2)
        await self.assert_no_secrets(a, b)

    async def test_two_nodes_eight_clients_one_fetch_per_file(self) -> None:
        """
        2 nodes x 8 curl clients, cold, all asking for the same two 4 MB
        files at once: one upstream fetch per file, every client gets the
        right bytes.  The origin holds each body half-way until every
        client has asked, so the downloads overlap.
        """
        a, b = await self.nodes("a", "b")
        for path in self.racing:
            self.origin.hold(path)
        clients = [
            Deferred.fromCoroutine(curl([node.url(p) for p in self.racing], self.work / f"{node.name}{n}"))
            for node in (a, b) for n in range(8)
        ]
        all_done = gatherResults(clients)

        async def every_node_downloading() -> bool:
            asked = all(self.origin.gets(p) >= 1 for p in self.racing)
            if not asked:
                return False
            figures = [await node.stats() for node in (a, b)]
            return all(f.get("downloads_in_flight", 0) >= len(self.racing) for f in figures)

        try:
            await poll(every_node_downloading, "both nodes downloading both files", bound=30)
        finally:
            for path in self.racing:
                self.origin.release(path)
        results = await all_done
        for fetched_pair in results:
            for path, fetched in zip(self.racing, fetched_pair):
                self.assert_served(fetched, path)
        self.assertEqual(
            {p: self.origin.gets(p) for p in self.racing}, {p: 1 for p in self.racing}
        )
        # Every client of the node that did not fetch a file got it as a HIT.
        for path_index, path in enumerate(self.racing):
            by_node = {
                node: {r[path_index].x_cache for r in results[k * 8:(k + 1) * 8]}
                for k, node in enumerate(("a", "b"))
            }
            self.assertIn({"HIT"}, by_node.values(), (path, by_node))
        # The other node waited on the lease of the one that fetched, and
        # never gave up waiting.
        figures = [await node.tier() for node in (a, b)]
        self.assertGreaterEqual(sum(f["lease_waits"] for f in figures), len(self.racing))
        self.assertEqual(sum(f["lease_timeouts"] for f in figures), 0)
        await self.assert_no_secrets(a, b)

    async def test_corrupt_blob_caught_never_served_replaced(self) -> None:
        """
        A blob overwritten in the bucket with garbage of the same size is
        caught by its digest: node B's client gets the right bytes (B goes
        upstream), and the blob is replaced with the good body, which a
        third node then serves from the tier.
        """
        path = pool_path("corrupt")
        data = self.files[path]
        a, b = await self.nodes("a", "b")
        self.assert_served(await fetch_one(a.url(path), self.work / "a"), path, "MISS")
        await self.published(data)
        self.shared.put(blob_name(data), pattern_bytes(len(data), b"garbage"))

        fetched = await fetch_one(b.url(path), self.work / "b")
        self.assert_served(fetched, path)
        self.assertEqual(self.origin.gets(path), 2)
        failed = b.events("shared_copy_failed")
        # (Logged by the fetcher and by the tier: the same copy.)
        self.assertEqual({e["name"] for e in failed}, {blob_name(data)})
        self.assertGreaterEqual((await b.tier())["rejected"], 1)
        # Replaced: the blob holds the good body again.
        await self.published(data)

        c = await self.node("c")
        self.assert_served(await fetch_one(c.url(path), self.work / "c"), path, "HIT")
        self.assertEqual(self.origin.gets(path), 2)
        await self.assert_no_secrets(a, b, c)

    async def test_rebuilt_package_invalidates_its_shared_record(self) -> None:
        """
        An apk package rebuilt under the same name (a new APKINDEX entry):
        node B, with the new index, finds the bucket's record stale,
        drops it, serves the new build from the upstream and publishes
        it; a third node then gets the new build from the tier.
        """
        arch = "alpine/v3.20/main/x86_64"
        first = build_apk("hello", "1.0-r0", data_size_pad=200_000, pad_seed=1)
        again = build_apk("hello", "1.0-r0", data_size_pad=300_000, pad_seed=2)
        index, package = f"{arch}/APKINDEX.tar.gz", f"{arch}/{first.filename}"
        write_repository(self.work / "www" / "alpine/v3.20/main", [first], mtime=BUILD_TIME)
        a, b = await self.nodes("a", "b")
        for path, want in ((index, None), (package, first.content)):
            fetched = await fetch_one(a.url(path), self.work / "a")
            self.assertEqual(fetched.status, 200, path)
            if want is not None:
                self.assertEqual(sha256(fetched.body), sha256(want))
        await self.published(first.content)

        write_repository(self.work / "www" / "alpine/v3.20/main", [again], mtime=BUILD_TIME + 100)
        self.assertEqual((await fetch_one(b.url(index), self.work / "b")).status, 200)
        fetched = await fetch_one(b.url(package), self.work / "b")
        self.assertEqual((fetched.status, sha256(fetched.body)), (200, sha256(again.content)))
        self.assertEqual(self.origin.gets(package), 2)
        await b.wait_event("shared_record_stale")
        await self.published(again.content)

        c = await self.node("c")
        self.assertEqual((await fetch_one(c.url(index), self.work / "c")).status, 200)
        fetched = await fetch_one(c.url(package), self.work / "c")
        self.assertEqual(
            (fetched.status, fetched.x_cache, sha256(fetched.body)),
            (200, "HIT", sha256(again.content)),
        )
        self.assertEqual(self.origin.gets(package), 2)

    async def test_slow_store_costs_a_miss(self) -> None:
        """
        A store that accepts connections and never answers: node A's
        client still gets the file (from the upstream, after the record
        lookup timed out), A logs that the store is failing and shows it
        on its status page and in its stats; node B too goes upstream
        without a client error; A's disk serves the file again.
        """
        path = self.paths["medium"]
        a, b = await self.nodes("a", "b")
        self.gate.stall()
        self.addCleanup(self.gate.unstall)
        self.assert_served(await fetch_one(a.url(path), self.work / "a"), path, "MISS")
        failing = await a.wait_event(FAILING)
        self.assertIn("time", failing[0]["error"].lower())
        figures = await a.tier()
        self.assertEqual((figures["healthy"], bool(figures["last_error"])), (False, True))
        page = (await a.page("/")).decode()
        self.assertIn("failing: serving from disk and upstreams", page)
        self.assert_served(await fetch_one(b.url(path), self.work / "b"), path, "MISS")
        await b.wait_event(FAILING)
        self.assertEqual(self.origin.gets(path), 2)
        self.assert_served(await fetch_one(a.url(path), self.work / "a2"), path, "HIT")
        self.assertEqual(self.origin.gets(path), 2)
        await self.assert_no_secrets(a, b)

    async def test_pip_through_two_nodes_shares_wheels(self) -> None:
        """
        ``pip install`` through node A's index, then through node B's: B
        fetches the pages (they stay per node) but no file upstream.
        """
        fixture = build_index(self.work / "index")
        index = StaticSimpleIndex(fixture)
        port = listen(index)
        self.addCleanup(port.stopListening)
        upstream = url_of(port, "/simple")
        nodes = []
        for name in ("pa", "pb"):
            nodes.append(await start_node(
                self, name, self.work, self.origin.url,
                self.shared.shared_store(self.gate.endpoint), self.secret_file,
                pypi_upstream=upstream,
            ))
        await self.pip(nodes[0], self.work / "pip-a")
        files_asked = {p: n for p, n in index.requests.items() if p.startswith("/files/")}
        self.assertTrue(any(p.endswith(".whl") for p in files_asked), files_asked)
        # Wheels and their metadata files: B reads every one from the tier.
        for path in files_asked:
            await self.published(fixture.content(unquote(path.rsplit("/", 1)[1])))
        pages = {p: n for p, n in index.requests.items() if p.startswith("/simple/")}
        await self.pip(nodes[1], self.work / "pip-b")
        self.assertEqual(
            {p: n for p, n in index.requests.items() if p.startswith("/files/")}, files_asked
        )
        self.assertEqual(
            (self.work / "pip-b" / "bcdemo_a" / "__init__.py").read_text(),
            (self.work / "pip-a" / "bcdemo_a" / "__init__.py").read_text(),
        )
        # The pages are asked again: they stay per node.
        self.assertEqual(index.requests["/simple/bcdemo-a/"], 2 * pages["/simple/bcdemo-a/"])
        self.assertGreaterEqual((await nodes[1].tier())["hits"], len(files_asked))

    async def pip(self, node: Node, target: Path) -> None:
        argv = [
            "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
            "--no-input", "--index-url", node.index_url(), "--target", str(target),
            "bcdemo-a",
        ]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, argv,
            env=clean_environment({"PIP_CONFIG_FILE": os.devnull}),
            path=str(self.work),
        )
        if code != 0:
            self.fail(f"pip exited {code}:\n{out.decode(errors='replace')}\n{err.decode(errors='replace')}")


class StoreFailureTests(_Shared, TestCase):
    """
    The store killed while node A uploads: a store of this test's own (it
    is killed and restarted on the same ports and data).
    """

    async def setUp(self) -> None:  # type: ignore[override]
        # In a short temporary directory of its own (its unix sockets'
        # paths must stay under 108 bytes), removed with it.
        self.store = await start_seaweed()
        self.addCleanup(self.store.remove)
        self.store.create_bucket("killed")
        self.big = pool_path("big")
        sizes = {self.big: 24 * MB}
        # Small files to show sharing is back, one per attempt.
        self.after = [pool_path(f"after{n}") for n in range(60)]
        sizes.update({path: 64 * KB for path in self.after})
        self.set_up_parts(self.store, "killed", sizes)

    async def test_store_killed_mid_upload(self) -> None:
        """
        SeaweedFS SIGKILLed while node A uploads a 24 MB blob: A's client
        already has its bytes and A still serves it; B goes upstream for it
        with no client error; both log that the store is failing.  Once the
        store is back on the same ports, what A fetches B serves again
        from the tier.
        """
        a, b = await self.nodes("a", "b")
        data = self.files[self.big]
        held = self.gate.hold_upload(f"blobs/sha256/{sha256(data)}")
        self.assert_served(await fetch_one(a.url(self.big), self.work / "a"), self.big, "MISS")
        # A is uploading the blob: the store has its first chunk.
        self.assertEqual((await held).path, f"/killed/cache/{blob_name(data)}")
        self.store.kill_now()
        self.gate.release()
        await a.wait_event(FAILING)

        self.assert_served(await fetch_one(a.url(self.big), self.work / "a2"), self.big, "HIT")
        fetched = await fetch_one(b.url(self.big), self.work / "b")
        self.assert_served(fetched, self.big)
        self.assertEqual(self.origin.gets(self.big), 2)
        await b.wait_event(FAILING)

        # Back on the same ports and data: the interrupted upload left no
        # record (a record is written only after its whole blob).
        await self.store.start()
        self.assertEqual(self.shared.records_naming(data), [])

        # Sharing resumes once each node finds the store healthy again (it
        # marks it failing for a while): one fresh file per attempt.
        attempts = iter(self.after)

        async def shared_again() -> bool:
            path = next(attempts)
            self.assert_served(await fetch_one(a.url(path), self.work / "x"), path)
            try:
                await self.published(self.files[path], bound=3)
            except AssertionError:
                return False
            fetched = await fetch_one(b.url(path), self.work / "y")
            self.assert_served(fetched, path)
            return fetched.x_cache == "HIT" and self.origin.gets(path) == 1

        await poll(shared_again, "B serving from the tier what A fetched", bound=120, every=1)
        await a.wait_event(RECOVERED)
        await b.wait_event(RECOVERED)
        self.assertTrue((await a.tier())["healthy"])
        await self.assert_no_secrets(a, b)
