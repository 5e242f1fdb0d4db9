"""
Read-ahead of the pages of dependencies (:mod:`buildcache.ecosystems.pypi.pagereads`):
once a client has read a wheel's core metadata, the pages of the projects
its ``Requires-Dist`` names for that client are fetched before it asks.

Against a real PEP 503/691 origin with PEP 658 metadata on 127.0.0.1
(:class:`tests.pyindex.StaticSimpleIndex`), through the index on
127.0.0.1, asked with treq; the queue's bounds against a resolver whose
answers the test holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.ecosystems.pypi import pagereads
from buildcache.ecosystems.pypi.pagereads import PageReadAhead
from buildcache.ecosystems.pypi.pages import PageResolver
from buildcache.ecosystems.pypi.requires import client_environment, dependencies
from tests.pyindex import DemoRelease, StaticSimpleIndex
from tests.support import Client, listen, start_server, url_of
from tests.test_simple_index import PIP_ACCEPT, Harness, fixture_for

#: What pip 24 on CPython 3.11 / Linux sends (its linehaul JSON).
PIP_USER_AGENT = (
    'pip/24.0 {"ci":null,"cpu":"x86_64","distro":{"name":"Debian GNU/Linux"},'
    '"implementation":{"name":"CPython","version":"3.11.7"},'
    '"installer":{"name":"pip","version":"24.0"},"python":"3.11.7",'
    '"system":{"name":"Linux","release":"6.1.0"}}'
)

RELEASES = (
    DemoRelease(
        "rda-a", "1.0",
        requires=(
            "rda-b>=1.0", "rda-c", 'rda-d ; extra == "x"',
            'rda-e ; python_version < "3"',
        ),
    ),
    DemoRelease("rda-b", "1.0"),
    DemoRelease("rda-c", "1.0"),
    DemoRelease("rda-d", "1.0"),
    DemoRelease("rda-e", "1.0"),
)
WHEEL_A = "rda_a-1.0-py3-none-any.whl"
METADATA_A = f"/files/rda-a/{WHEEL_A}.metadata"


class DependencyPagesTests(TestCase):
    """
    The pages of a metadata file's dependencies are stored before the
    client asks for them, and answered from the store when it does.
    """

    def setUp(self) -> None:
        self.upstream_index = StaticSimpleIndex(fixture_for(self, RELEASES))
        self.harness = Harness(self, [self.upstream_index], prefetch_max_size=32 * 1024**2)
        self.upstream = self.harness.upstreams[0]

    async def read_metadata(self, **headers: str) -> None:
        page = await self.harness.page("rda-a")
        self.assertEqual(page.status, 200)
        metadata = await self.harness.get(METADATA_A, headers)
        self.assertEqual(metadata.status, 200)
        self.assertIn(b"Requires-Dist: rda-b>=1.0", metadata.body)
        assert self.harness.prefetcher is not None
        await self.harness.prefetcher.when_done()

    def metadata_requests(self) -> dict[str, int]:
        return {
            name: self.upstream.requests_for(
                f"/files/{name.replace('-', '_')}-1.0-py3-none-any.whl.metadata"
            )
            for name in ("rda-b", "rda-c", "rda-d", "rda-e")
        }

    def page_requests(self) -> dict[str, int]:
        return {
            name: self.upstream.requests_for(f"/simple/{name}/")
            for name in ("rda-b", "rda-c", "rda-d", "rda-e")
        }

    async def test_pages_read_ahead_then_hits(self) -> None:
        """
        After the metadata of A (``rda-b; rda-c; rda-d ; extra == "x";
        rda-e ; python_version < "3"``), the origin saw the pages of B and C
        asked for, not D nor E; the client's later requests for B (JSON)
        and C (HTML) are hits with no new upstream request.
        """
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        self.assertEqual(
            self.page_requests(), {"rda-b": 1, "rda-c": 1, "rda-d": 0, "rda-e": 0}
        )
        # The index's own request: no client header went upstream.
        read_ahead = [
            r for r in self.upstream_index.request_log if r.path == "/simple/rda-b/"
        ]
        self.assertNotIn("pip", read_ahead[0].headers.get("user-agent", ""))
        activity = self.harness.activity
        # The wheel of A, the pages of B and C, and the metadata of their
        # one pure wheel each (pip on Python 3.11 reads it next).
        self.assertEqual(self.metadata_requests(), {"rda-b": 1, "rda-c": 1, "rda-d": 0, "rda-e": 0})
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (5, 0))
        asked_before = len(self.upstream_index.request_log)
        b = await self.harness.page("rda-b")
        self.assertEqual((b.status, b.header("x-cache")), (200, "HIT"))
        self.assertEqual(json.loads(b.body)["files"][0]["filename"], "rda_b-1.0-py3-none-any.whl")
        c = await self.harness.page("rda-c", accept="text/html")
        self.assertEqual((c.status, c.header("x-cache")), (200, "HIT"))
        self.assertIn(b"rda_c-1.0-py3-none-any.whl", c.body)
        self.assertEqual(len(self.upstream_index.request_log), asked_before)
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (5, 2))
        # Asked again: counted once.
        await self.harness.page("rda-b")
        self.assertEqual(activity.read_ahead_used, 2)
        # The metadata of B: from the store, its bytes fetched for it.
        metadata = await self.harness.get(
            "/files/rda-b/rda_b-1.0-py3-none-any.whl.metadata",
            {"user-agent": PIP_USER_AGENT},
        )
        self.assertEqual((metadata.status, metadata.header("x-cache")), (200, "MISS"))
        self.assertIn(b"Name: rda-b", metadata.body)
        self.assertEqual(self.metadata_requests()["rda-b"], 1)
        # And, read, it starts the read-ahead of B's wheel (after the
        # turn that answered it).
        assert self.harness.prefetcher is not None
        await self.harness.prefetcher.when_done()
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (6, 3))

    async def test_without_client_environment_only_unconditional(self) -> None:
        """
        A client whose ``User-Agent`` says nothing of its environment gets
        the pages of requirements without a marker read ahead.
        """
        await self.read_metadata(**{"user-agent": "curl/8"})
        self.assertEqual(
            self.page_requests(), {"rda-b": 1, "rda-c": 1, "rda-d": 0, "rda-e": 0}
        )
        # Nor any metadata: which file it would read depends on its Python.
        self.assertEqual(
            self.metadata_requests(), {"rda-b": 0, "rda-c": 0, "rda-d": 0, "rda-e": 0}
        )

    async def test_credentialed_request_reads_nothing_ahead(self) -> None:
        """
        A metadata request that carries credentials reads no page ahead.
        """
        for header in ("authorization", "cookie"):
            await self.read_metadata(**{"user-agent": PIP_USER_AGENT, header: "Basic c2VjcmV0"})
            self.assertEqual(
                self.page_requests(), {"rda-b": 0, "rda-c": 0, "rda-d": 0, "rda-e": 0}
            )

    async def test_fresh_pages_are_not_asked_again(self) -> None:
        """
        Metadata read again (warm) reads nothing ahead: the pages are
        stored and fresh.
        """
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        self.assertEqual(
            self.page_requests(), {"rda-b": 1, "rda-c": 1, "rda-d": 0, "rda-e": 0}
        )
        self.assertEqual(self.harness.activity.read_ahead, 5)

    async def test_known_list_looked_up_after_the_answer(self) -> None:
        """
        Metadata read again, its dependency list known, looks the pages
        up only after the turn that answers it (Twisted sends that answer
        at the end of the turn: the lookups would hold it back).
        """
        metadata_keys: list[str] = []
        after_metadata = PageReadAhead.after_metadata

        def seen(reads: PageReadAhead, key: str, *args: Any, **kwargs: Any) -> None:
            metadata_keys.append(key)
            after_metadata(reads, key, *args, **kwargs)

        self.patch(PageReadAhead, "after_metadata", seen)
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        for name in ("rda-b", "rda-c"):
            # Asked for: no longer read-aheads waiting for their client.
            self.assertEqual((await self.harness.page(name)).status, 200)
        reads = self.harness.prefetcher.pages if self.harness.prefetcher else None
        assert reads is not None
        looked: list[str] = []
        has_fresh = PageResolver.has_fresh

        def looked_up(pages: PageResolver, name: str) -> bool:
            looked.append(name)
            return has_fresh(pages, name)

        self.patch(PageResolver, "has_fresh", looked_up)
        reads.after_metadata(metadata_keys[0], PIP_USER_AGENT, False)
        self.assertEqual((looked, reads.running()), ([], 1))
        await reads.when_done()
        self.assertEqual(sorted(looked), ["rda-b", "rda-c"])
        self.assertEqual(
            self.page_requests(), {"rda-b": 1, "rda-c": 1, "rda-d": 0, "rda-e": 0}
        )

    async def test_asked_for_through_another_process(self) -> None:
        """
        A page read ahead that a hit worker served (its access reached
        this process's store, no claim here) counts as asked for once the
        budget is reached, and frees it.
        """
        self.patch(pagereads, "UNCLAIMED_BUDGET", 2)
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        reads = self.harness.prefetcher.pages if self.harness.prefetcher else None
        assert reads is not None
        self.assertEqual(reads.unclaimed(), 2)
        key = f"simple-page|{self.upstream.base}|rda-b"
        self.harness.store.record_accesses({key: reactor.seconds() + 1})
        reads.read_ahead(["rda-d"])
        await reads.when_done()
        self.assertEqual(self.upstream.requests_for("/simple/rda-d/"), 1)
        self.assertEqual(self.harness.activity.read_ahead_used, 1)

    async def test_missing_dependency_page(self) -> None:
        """
        A dependency the upstream does not have is asked once (then
        remembered missing), and the client's request gets the 404.
        """
        del self.upstream_index.projects["rda-c"]
        await self.read_metadata(**{"user-agent": PIP_USER_AGENT})
        self.assertEqual(self.upstream.requests_for("/simple/rda-c/"), 1)
        missing = await self.harness.page("rda-c")
        self.assertEqual(missing.status, 404)
        self.assertEqual(self.upstream.requests_for("/simple/rda-c/"), 1)


class StatusPageTests(TestCase):
    """
    The server's status page and ``/-/stats.json`` count page read-aheads
    with the other read-aheads.
    """

    async def test_counted_on_the_status_page(self) -> None:
        index = StaticSimpleIndex(fixture_for(self, RELEASES))
        port = listen(index)
        self.addCleanup(port.stopListening)
        running = start_server(
            self, {"pypi_upstreams": (url_of(port, "/simple/"),)}
        )
        client = Client()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        base = f"http://127.0.0.1:{running.index_port}"
        await client.get(f"{base}/simple/rda-a/", {"accept": PIP_ACCEPT})
        await client.get(f"{base}{METADATA_A}", {"user-agent": PIP_USER_AGENT})
        prefetcher = running.server.index.prefetcher
        assert prefetcher is not None
        await prefetcher.when_done()
        await client.get(f"{base}/simple/rda-b/", {"accept": PIP_ACCEPT})
        stats: dict[str, Any] = json.loads((await client.get(f"{base}/-/stats.json")).body)
        self.assertEqual(
            (stats["store"]["prefetches"], stats["store"]["prefetch_hits"]), (5, 1)
        )
        page = (await client.get(f"{base}/")).body.decode()
        self.assertIn("1 asked for since", page)


class _Resolver:
    """
    A page resolver whose answers the test gives, one per requested name.
    """

    index_ttl = 300.0

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.waiting: dict[str, Deferred[Any]] = {}
        self.fresh: set[str] = set()

    def has_fresh(self, name: str) -> bool:
        return name in self.fresh

    def resolve(self, name: str, headers: object) -> Deferred[Any]:
        self.asked.append(name)
        d: Deferred[Any] = Deferred()
        self.waiting[name] = d
        return d

    def answer(self, name: str) -> None:
        self.fresh.add(name)
        self.waiting.pop(name).callback(SimpleNamespace(key=f"page|{name}"))


class _Store:
    """A store that has none of the pages: nobody read them elsewhere."""

    def peek(self, key: str) -> None:
        return None


class BoundsTests(SynchronousTestCase):
    """
    At most :data:`~pagereads.PER_METADATA` pages per metadata file,
    :data:`~pagereads.MAX_RUNNING` fetching at once, the rest queued.
    """

    def setUp(self) -> None:
        self.resolver = _Resolver()
        self.reads = PageReadAhead(
            SimpleNamespace(store=_Store()), self.resolver, Clock()  # type: ignore[arg-type]
        )

    def names(self, count: int, prefix: str = "p") -> Sequence[str]:
        return [f"{prefix}{i}" for i in range(count)]

    def test_per_metadata_and_in_flight(self) -> None:
        self.reads.read_ahead(self.names(pagereads.PER_METADATA + 5))
        self.assertEqual(len(self.resolver.asked), pagereads.MAX_RUNNING)
        self.assertEqual(self.reads.running(), pagereads.PER_METADATA)
        peak = 0
        while self.resolver.waiting:
            peak = max(peak, len(self.resolver.waiting))
            self.resolver.answer(next(iter(self.resolver.waiting)))
        self.assertEqual(peak, pagereads.MAX_RUNNING)
        self.assertEqual(self.resolver.asked, list(self.names(pagereads.PER_METADATA)))
        self.assertEqual(self.reads.running(), 0)
        self.assertTrue(self.reads.when_done().called)

    def test_unclaimed_budget(self) -> None:
        """
        Pages read ahead that no client asked for pause read-ahead at
        :data:`~pagereads.UNCLAIMED_BUDGET`; a claim frees one.
        """
        batches = pagereads.UNCLAIMED_BUDGET // pagereads.PER_METADATA
        for batch in range(batches + 1):
            self.reads.read_ahead(self.names(pagereads.PER_METADATA, f"b{batch}-"))
            while self.resolver.waiting:
                self.resolver.answer(next(iter(self.resolver.waiting)))
        self.assertEqual(len(self.resolver.asked), pagereads.UNCLAIMED_BUDGET)
        self.assertTrue(self.reads.claim("b0-0"))
        self.assertFalse(self.reads.claim("b0-0"))
        self.reads.read_ahead(["late"])
        self.assertEqual(self.resolver.asked[-1], "late")

    def test_queued_page_asked_meanwhile_is_skipped(self) -> None:
        names = self.names(pagereads.MAX_RUNNING + 1)
        self.reads.read_ahead(names)
        # The client fetched the queued one itself meanwhile.
        self.resolver.fresh.add(names[-1])
        while self.resolver.waiting:
            self.resolver.answer(next(iter(self.resolver.waiting)))
        self.assertNotIn(names[-1], self.resolver.asked)

    def test_stop_drops_the_queue(self) -> None:
        self.reads.read_ahead(self.names(pagereads.PER_METADATA))
        self.reads.stop()
        done = self.reads.when_done()
        while self.resolver.waiting:
            self.assertFalse(done.called)
            self.resolver.answer(next(iter(self.resolver.waiting)))
        self.assertTrue(done.called)
        self.assertEqual(len(self.resolver.asked), pagereads.MAX_RUNNING)


class RequirementsTests(SynchronousTestCase):
    """
    Which requirements of a metadata file apply to a client.
    """

    METADATA = (
        b"Metadata-Version: 2.1\nName: a\nVersion: 1\n"
        b"Requires-Dist: B\nRequires-Dist: c_C>=1\n"
        b'Requires-Dist: D ; extra == "x"\n'
        b'Requires-Dist: E ; python_version < "3"\n'
        b'Requires-Dist: F ; sys_platform == "linux"\n'
        b'Requires-Dist: G ; platform_version == "x"\n'
        b'Requires-Dist: H ; python_version >= "3.8" or extra == "y"\n'
        b"Requires-Dist: I @ https://example.invalid/i.whl\n"
        b"Requires-Dist: b\n"
        b"\nRequires-Dist: J\n"
    )

    def test_for_pip_on_linux(self) -> None:
        environment = client_environment(PIP_USER_AGENT)
        self.assertEqual(dependencies(self.METADATA, environment, 16), ["b", "c-c", "f", "h"])

    def test_environment_unknown(self) -> None:
        self.assertIsNone(client_environment("curl/8.0"))
        self.assertIsNone(client_environment("pip/1 {not json"))
        self.assertEqual(dependencies(self.METADATA, None, 16), ["b", "c-c"])

    def test_environment_from_user_agent(self) -> None:
        environment = client_environment(PIP_USER_AGENT)
        assert environment is not None
        self.assertEqual(
            {k: environment[k] for k in (
                "python_version", "python_full_version", "implementation_name",
                "sys_platform", "os_name", "platform_machine", "platform_version",
            )},
            {
                "python_version": "3.11", "python_full_version": "3.11.7",
                "implementation_name": "cpython", "sys_platform": "linux",
                "os_name": "posix", "platform_machine": "x86_64",
                "platform_version": "",
            },
        )

    def test_limit(self) -> None:
        self.assertEqual(dependencies(self.METADATA, None, 1), ["b"])

    def test_header_block_as_written(self) -> None:
        """
        CRLF line ends, a lower-case field name, a value folded onto the
        next line, and a named extra on either side of ``==`` (alone or in
        a conjunction): read as pip reads them.  A line past the first
        one that is no header ends the block.
        """
        metadata = (
            b"Metadata-Version: 2.1\r\nName: a\r\n"
            b"requires-dist: K\r\n"
            b"Requires-Dist: L ;\r\n  python_version >= '3.8'\r\n"
            b"Requires-Dist: M ; 'test' == extra\r\n"
            b"Requires-Dist: N ; (python_version >= '3.8' and extra == 'doc')\r\n"
            b"Requires-Dist: O ; extra == 'doc' or sys_platform == 'linux'\r\n"
            b"not a header\r\nRequires-Dist: P\r\n"
        )
        environment = client_environment(PIP_USER_AGENT)
        self.assertEqual(dependencies(metadata, environment, 16), ["k", "l", "o"])
        self.assertEqual(dependencies(metadata, None, 16), ["k"])


class CandidateMetadataTests(TestCase):
    """
    A page fetched for a client whose Python is known has the core
    metadata of the file it reads next read ahead, when that is certain.
    """

    def setUp(self) -> None:
        # bcdemo-a: 3.0 needs Python >= 4, so 2.0; bcdemo-b: 2.0 is yanked,
        # so 1.0.
        self.fixture = fixture_for(self)
        self.harness = Harness(
            self, [StaticSimpleIndex(self.fixture)], prefetch_max_size=32 * 1024**2
        )
        self.upstream = self.harness.upstreams[0]

    async def ask_page(self, name: str, **headers: str) -> None:
        page = await self.harness.page(name, **headers)
        self.assertEqual((page.status, page.header("x-cache")), (200, "MISS"))
        assert self.harness.prefetcher is not None
        await self.harness.prefetcher.when_done()

    def metadata_asked(self) -> dict[str, int]:
        return {
            path.removeprefix("/files/"): count
            for path, count in self.upstream.index.requests.items()
            if path.endswith(".metadata")
        }

    async def test_newest_allowed_version(self) -> None:
        """
        The page of bcdemo-a reads its 2.0's metadata ahead, which (for the
        same client) reads ahead the page of bcdemo-b it requires, and on
        it the metadata of 1.0: the resolver's walk, ahead of it.
        """
        await self.ask_page("bcdemo-a", **{"user-agent": PIP_USER_AGENT})
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-b/"), 1)
        page = await self.harness.page("bcdemo-b", **{"user-agent": PIP_USER_AGENT})
        self.assertEqual((page.status, page.header("x-cache")), (200, "HIT"))
        self.assertEqual(
            self.metadata_asked(),
            {
                "bcdemo_a-2.0-py3-none-any.whl.metadata": 1,
                "bcdemo_b-1.0-py3-none-any.whl.metadata": 1,
            },
        )
        got = await self.harness.get(
            "/files/bcdemo-a/bcdemo_a-2.0-py3-none-any.whl.metadata",
            {"user-agent": PIP_USER_AGENT},
        )
        self.assertEqual((got.status, got.header("x-cache")), (200, "MISS"))
        self.assertEqual(
            self.metadata_asked()["bcdemo_a-2.0-py3-none-any.whl.metadata"], 1
        )
        assert self.harness.prefetcher is not None
        await self.harness.prefetcher.when_done()
        # Those three, and the wheel of bcdemo-a 2.0 once its metadata is
        # read.
        self.assertEqual(self.harness.activity.read_ahead, 4)
        self.assertEqual(self.harness.activity.read_ahead_used, 2)

    async def test_unknown_python_or_credentials(self) -> None:
        await self.ask_page("bcdemo-a", **{"user-agent": "curl/8"})
        await self.ask_page(
            "bcdemo-b", **{"user-agent": PIP_USER_AGENT, "authorization": "Basic eDp5"}
        )
        self.assertEqual(self.metadata_asked(), {})
        self.assertEqual(self.harness.activity.read_ahead, 0)


class BestPureWheelTests(SynchronousTestCase):
    """
    Which file's metadata a client reads next, when that is certain.
    """

    def page(self, *filenames: str, requires_python: str | None = None) -> Any:
        from buildcache.ecosystems.pypi.model import ProjectFile, ProjectPage

        return ProjectPage(
            name="x",
            files=tuple(
                ProjectFile(
                    filename=f, url=f"http://127.0.0.1/{f}", core_metadata=True,
                    requires_python=requires_python,
                )
                for f in filenames
            ),
        )

    def best(self, page: Any, specifier: str = "", python: str = "3.11.7") -> str | None:
        from buildcache.ecosystems.pypi.requires import best_pure_wheel

        found = best_pure_wheel(page, specifier, python)
        return None if found is None else found.filename

    def test_pure_wheel_of_newest(self) -> None:
        page = self.page("x-1.0-py3-none-any.whl", "x-2.0-py3-none-any.whl", "x-2.0.tar.gz")
        self.assertEqual(self.best(page), "x-2.0-py3-none-any.whl")
        self.assertEqual(self.best(page, "<2"), "x-1.0-py3-none-any.whl")

    def test_uncertain(self) -> None:
        # Platform wheels: which one depends on tags.
        self.assertIsNone(self.best(self.page(
            "x-1.0-cp311-cp311-manylinux_2_17_x86_64.whl", "x-1.0-cp311-cp311-win_amd64.whl",
        )))
        # Newest has no wheel: pip builds the sdist's metadata.
        self.assertIsNone(self.best(self.page("x-1.0-py3-none-any.whl", "x-2.0.tar.gz")))
        # Pre-releases only when asked for.
        page = self.page("x-1.0-py3-none-any.whl", "x-2.0b1-py3-none-any.whl")
        self.assertEqual(self.best(page), "x-1.0-py3-none-any.whl")
        self.assertEqual(self.best(page, ">=2.0b1"), "x-2.0b1-py3-none-any.whl")
        # Requires-Python.
        self.assertIsNone(self.best(self.page("x-1.0-py3-none-any.whl", requires_python=">=4")))
