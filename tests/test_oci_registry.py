"""
The registry port over real TCP on 127.0.0.1: a real server
(:class:`buildcache.service.Server`) in front of the fault origin
(:mod:`tests.oci_origin`), asked by a real HTTP client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from buildcache.config import Registry
from buildcache.credentials import Credentials
from tests.oci_origin import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Fault,
    Gate,
    OciOrigin,
    Redirect,
    TokenFlow,
    digest_of,
    start_origin,
)
from tests.support import (
    Client,
    Received,
    listen,
    pattern_bytes,
    reactor,
    start_server,
)


@frozen
class Cache:
    server: Any
    store: Any
    url: str


def start_cache(
    testcase: TestCase, registries: Mapping[str, str],
    credentials: Mapping[str, Credentials] | None = None, **changes: Any,
) -> Cache:
    """
    A server whose registry port listens on 127.0.0.1 (port 0), with
    ``registries`` (NAME -> URL) and their ``credentials`` (NAME ->).
    """
    given = credentials or {}
    running = start_server(
        testcase,
        {
            "registries": tuple(
                Registry(n, u, given.get(n)) for n, u in registries.items()
            ),
            **changes,
        },
    )
    port = reactor.listenTCP(0, running.server.registry_site, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return Cache(running.server, running.store, f"http://127.0.0.1:{port.getHost().port}")


class RegistryTestCase(TestCase):
    def setUp(self) -> None:
        self.origin = OciOrigin()
        self.origin_url = start_origin(self, self.origin)
        self.image = self.origin.push_image(
            "team/app", "t1", [pattern_bytes(200_000, b"l1"), b"layer two"]
        )
        self.hub = OciOrigin(blobs=self.origin.blobs)
        self.hub_url = start_origin(self, self.hub)
        self.client = Client()
        self.addCleanup(lambda: Deferred.fromCoroutine(self.client.close()))

    def cache(self, **changes: Any) -> Cache:
        return start_cache(
            self, {"docker.io": self.hub_url, "127.0.0.1:5001": self.origin_url}, **changes
        )

    async def get(
        self, cache: Cache, path: str, headers: Mapping[str, str] | None = None,
        method: bytes = b"GET",
    ) -> Received:
        return await self.client.get(cache.url + path, headers, method=method)

    def manifest_path(self, ref: str = "t1") -> str:
        return f"/v2/team/app/manifests/{ref}?ns=127.0.0.1:5001"


def errors_of(received: Received) -> list[str]:
    return [e["code"] for e in json.loads(received.body)["errors"]]


class BasicTests(RegistryTestCase):
    async def test_base(self) -> None:
        cache = self.cache()
        got = await self.get(cache, "/v2/")
        self.assertEqual((got.status, json.loads(got.body)), (200, {}))
        self.assertEqual(got.header("docker-distribution-api-version"), "registry/2.0")

    async def test_manifest_miss_then_hit(self) -> None:
        cache = self.cache()
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        second = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        for got in (first, second):
            self.assertEqual(got.status, 200)
            self.assertEqual(got.body, self.image.manifest)
            self.assertEqual(got.header("content-type"), OCI_MANIFEST)
            self.assertEqual(got.header("docker-content-digest"), self.image.digest)
            self.assertEqual(got.header("docker-distribution-api-version"), "registry/2.0")
        self.assertEqual((first.header("x-cache"), second.header("x-cache")), ("MISS", "HIT"))
        self.assertEqual(self.origin.count("/v2/team/app/manifests/t1"), 1)
        self.assertIsNotNone(
            cache.store.peek("oci:127.0.0.1:5001/team/app/manifests/t1")
        )

    async def test_head_tag_stores_it(self) -> None:
        """A HEAD of a tag fetches and stores the manifest (one GET upstream)."""
        cache = self.cache()
        path = self.manifest_path()
        head = await self.get(cache, path, {"accept": ALL_MANIFESTS}, method=b"HEAD")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.header("docker-content-digest"), self.image.digest)
        self.assertEqual(head.header("content-length"), str(len(self.image.manifest)))
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.header("x-cache"), got.body), ("HIT", self.image.manifest))
        self.assertEqual(self.origin.requests[("GET", "/v2/team/app/manifests/t1")], 1)
        self.assertEqual(self.origin.requests[("HEAD", "/v2/team/app/manifests/t1")], 0)

    async def test_blob_miss_hit_and_range(self) -> None:
        cache = self.cache()
        layer = self.image.layers[0]
        path = f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001"
        data = self.origin.blobs[layer]
        first = await self.get(cache, path)
        second = await self.get(cache, path)
        ranged = await self.get(cache, path, {"range": "bytes=10-19"})
        self.assertEqual((first.status, first.header("x-cache"), first.body), (200, "MISS", data))
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", data))
        self.assertEqual((ranged.status, ranged.body), (206, data[10:20]))
        self.assertEqual(self.origin.count(f"/v2/team/app/blobs/{layer}"), 1)
        entry = cache.store.peek(f"oci:blobs/{layer}")
        self.assertEqual("sha256:" + entry.sha256, layer)

    async def test_blob_head(self) -> None:
        """A HEAD of a blob that missed asks the upstream's HEAD, stores nothing."""
        cache = self.cache()
        layer = self.image.layers[0]
        upstream = f"/v2/team/app/blobs/{layer}"
        head = await self.get(cache, f"{upstream}?ns=127.0.0.1:5001", method=b"HEAD")
        self.assertEqual((head.status, head.body, head.header("x-cache")), (200, b"", "MISS"))
        self.assertEqual(head.header("content-length"), str(len(self.origin.blobs[layer])))
        self.assertEqual(head.header("docker-content-digest"), layer)
        self.assertEqual(
            (self.origin.requests[("HEAD", upstream)], self.origin.requests[("GET", upstream)]),
            (1, 0),
        )
        await self.get(cache, f"{upstream}?ns=127.0.0.1:5001")
        hit = await self.get(cache, f"{upstream}?ns=127.0.0.1:5001", method=b"HEAD")
        self.assertEqual((hit.header("x-cache"), hit.header("docker-content-digest")), ("HIT", layer))

    async def test_manifest_varies_on_accept(self) -> None:
        cache = self.cache()
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual(got.header("vary"), "Accept")

    async def test_push_methods_refused(self) -> None:
        cache = self.cache()
        for method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
            got = await self.get(cache, "/v2/team/app/blobs/uploads/", method=method)
            self.assertEqual((got.status, errors_of(got)), (405, ["UNSUPPORTED"]))
            self.assertEqual(got.header("docker-distribution-api-version"), "registry/2.0")
        self.assertEqual(len(self.origin.seen), 0)

    async def test_unknown_manifest_and_blob(self) -> None:
        cache = self.cache()
        manifest = await self.get(cache, self.manifest_path("nope"))
        blob = await self.get(
            cache, f"/v2/team/app/blobs/{digest_of(b'none')}?ns=127.0.0.1:5001"
        )
        self.assertEqual((manifest.status, errors_of(manifest)), (404, ["MANIFEST_UNKNOWN"]))
        self.assertEqual((blob.status, errors_of(blob)), (404, ["BLOB_UNKNOWN"]))

    async def test_unknown_digest_algorithm_not_fetched(self) -> None:
        cache = self.cache()
        got = await self.get(cache, "/v2/team/app/blobs/md5:" + "a" * 32 + "?ns=127.0.0.1:5001")
        self.assertEqual((got.status, errors_of(got)), (400, ["DIGEST_INVALID"]))
        self.assertEqual(len(self.origin.seen), 0)

    async def test_unconfigured_registry(self) -> None:
        cache = self.cache()
        got = await self.get(cache, "/v2/team/app/manifests/t1?ns=ghcr.io")
        self.assertEqual((got.status, errors_of(got)), (404, ["NAME_UNKNOWN"]))
        self.assertIn("not configured", json.loads(got.body)["errors"][0]["message"])


class SelectionTests(RegistryTestCase):
    async def test_path_prefix(self) -> None:
        cache = self.cache()
        got = await self.get(
            cache, "/v2/127.0.0.1:5001/team/app/manifests/t1", {"accept": ALL_MANIFESTS}
        )
        self.assertEqual((got.status, got.body), (200, self.image.manifest))
        # The same entry as ?ns= selects.
        again = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual(again.header("x-cache"), "HIT")

    async def test_docker_hub_library(self) -> None:
        image = self.hub.push_image("library/alpine", "3.20", [b"alpine layer"])
        cache = self.cache()
        plain = await self.get(cache, "/v2/alpine/manifests/3.20", {"accept": ALL_MANIFESTS})
        ns = await self.get(
            cache, "/v2/library/alpine/manifests/3.20?ns=docker.io", {"accept": ALL_MANIFESTS}
        )
        self.assertEqual((plain.status, plain.body), (200, image.manifest))
        self.assertEqual((ns.header("x-cache"), ns.body), ("HIT", image.manifest))
        self.assertEqual(self.hub.count("/v2/library/alpine/manifests/3.20"), 1)
        self.assertEqual(len(self.origin.seen), 0)

    async def test_tags_list_link_points_back(self) -> None:
        self.origin.push_image("team/app", "t2", [b"x"])
        self.origin.push_image("team/app", "t3", [b"y"])
        cache = self.cache()
        got = await self.get(cache, "/v2/team/app/tags/list?n=2&ns=127.0.0.1:5001")
        self.assertEqual(json.loads(got.body), {"name": "team/app", "tags": ["t1", "t2"]})
        self.assertEqual(
            got.header("link"), '</v2/team/app/tags/list?n=2&last=t2&ns=127.0.0.1%3A5001>; rel="next"'
        )
        link_path = got.header("link")[1:].partition(">")[0]
        rest = await self.get(cache, link_path)
        self.assertEqual(json.loads(rest.body)["tags"], ["t3"])
        hit = await self.get(cache, "/v2/127.0.0.1:5001/team/app/tags/list?n=2")
        self.assertEqual(hit.header("x-cache"), "HIT")
        self.assertEqual(
            hit.header("link"), '</v2/127.0.0.1:5001/team/app/tags/list?n=2&last=t2>; rel="next"'
        )

    async def test_referrers(self) -> None:
        self.origin.referrers[("team/app", self.image.digest)] = [
            {"mediaType": OCI_MANIFEST, "digest": digest_of(b"sig"), "size": 3}
        ]
        cache = self.cache()
        path = f"/v2/team/app/referrers/{self.image.digest}?ns=127.0.0.1:5001"
        first = await self.get(cache, path)
        second = await self.get(cache, path)
        self.assertEqual(json.loads(first.body)["manifests"][0]["digest"], digest_of(b"sig"))
        self.assertEqual((first.header("x-cache"), second.header("x-cache")), ("MISS", "HIT"))


class AcceptTests(RegistryTestCase):
    async def test_manifest_not_served_to_client_not_accepting_it(self) -> None:
        cache = self.cache()
        path = self.manifest_path()
        stored = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual(stored.status, 200)
        docker_only = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual((docker_only.status, errors_of(docker_only)), (404, ["MANIFEST_UNKNOWN"]))
        self.assertNotIn(self.image.manifest, docker_only.body)
        # It was asked of the upstream with the client's type only.
        asked = [s for s in self.origin.seen if s.path.endswith("/manifests/t1")]
        self.assertEqual([s.headers["accept"] for s in asked][-1], DOCKER_MANIFEST)

    async def test_unaccepted_type_from_upstream_not_stored(self) -> None:
        """
        An upstream that ignores Accept: the type the client does not take
        is neither stored nor sent (404 MANIFEST_UNKNOWN, as the
        distribution registry answers).
        """
        self.origin.ignore_accept = True
        cache = self.cache()
        path = self.manifest_path()
        for _ in range(2):
            got = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
            self.assertEqual((got.status, errors_of(got)), (404, ["MANIFEST_UNKNOWN"]))
            self.assertEqual(got.header("vary"), "Accept")
        self.assertEqual(self.origin.count("/v2/team/app/manifests/t1"), 2)
        self.assertIsNone(
            cache.store.peek("oci:127.0.0.1:5001/team/app/manifests/t1;accept=docker-manifest")
        )


class AuthorizationTests(RegistryTestCase):
    async def test_client_authorization_ignored_and_not_forwarded(self) -> None:
        cache = self.cache()
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": ALL_MANIFESTS, "authorization": "Bearer alice"})
        second = await self.get(cache, path, {"accept": ALL_MANIFESTS, "authorization": "Bearer bob"})
        third = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual(
            [g.header("x-cache") for g in (first, second, third)], ["MISS", "HIT", "HIT"]
        )
        self.assertEqual([s.headers.get("authorization") for s in self.origin.seen], [None])

    async def test_upstream_401_and_403_are_our_unauthorized(self) -> None:
        """
        An upstream refusal the token agent could not answer is this
        port's 401, without the upstream's challenge.
        """
        self.origin.fail["/v2/team/app/manifests/t1"] = Fault(
            401, {"www-authenticate": 'Basic realm="upstream"'}
        )
        self.origin.fail["/v2/team/app/manifests/t2"] = Fault(403)
        cache = self.cache()
        for tag in ("t1", "t2"):
            got = await self.get(cache, self.manifest_path(tag), {"accept": ALL_MANIFESTS})
            self.assertEqual((got.status, errors_of(got)), (401, ["UNAUTHORIZED"]))
            self.assertIsNone(got.header("www-authenticate"))
            self.assertIn("--registry-auth", json.loads(got.body)["errors"][0]["message"])


class FreshnessTests(RegistryTestCase):
    async def test_tag_revalidated_by_head_after_ttl(self) -> None:
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        second = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((first.header("x-cache"), second.header("x-cache")), ("MISS", "REVALIDATED"))
        self.assertEqual(second.body, self.image.manifest)
        upstream = "/v2/team/app/manifests/t1"
        self.assertEqual(
            (self.origin.requests[("GET", upstream)], self.origin.requests[("HEAD", upstream)]),
            (1, 1),
        )

    async def test_retagged_is_fetched_again(self) -> None:
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        newer = self.origin.push_image("team/app", "t1", [b"new layer"])
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.header("x-cache"), got.body), ("MISS", newer.manifest))
        self.assertEqual(got.header("docker-content-digest"), newer.digest)

    async def test_digest_manifest_never_revalidated(self) -> None:
        cache = self.cache(index_ttl=0)
        path = self.manifest_path(self.image.digest)
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual(got.header("x-cache"), "HIT")
        self.assertEqual(self.origin.count(f"/v2/team/app/manifests/{self.image.digest}"), 1)

    async def _stale_on(self, fault: Fault | None, stop_origin: bool = False) -> None:
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.origin.fail_all = fault
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))
        self.assertEqual(got.body, self.image.manifest)

    async def test_head_stale_on_429(self) -> None:
        """A client's HEAD of a tag (how pulls start) is served stale too."""
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS}, method=b"HEAD")
        self.origin.fail_all = Fault(429)
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS}, method=b"HEAD")
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))
        self.assertEqual(got.header("docker-content-digest"), self.image.digest)
        self.assertEqual(got.header("content-length"), str(len(self.image.manifest)))
        self.assertEqual(self.origin.requests[("HEAD", "/v2/team/app/manifests/t1")], 1)

    async def test_stale_on_429(self) -> None:
        await self._stale_on(Fault(429, {"retry-after": "60"}))

    async def test_stale_on_503(self) -> None:
        await self._stale_on(Fault(503))

    async def test_stale_when_origin_down(self) -> None:
        origin = OciOrigin(blobs=self.origin.blobs)
        origin.push_image("team/app", "t1", [b"only layer"])
        port = listen(origin)
        url = f"http://127.0.0.1:{port.getHost().port}"
        cache = start_cache(self, {"docker.io": self.hub_url, "127.0.0.1:5001": url}, index_ttl=0)
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        await port.stopListening()
        # Its kept-alive connection goes too: the origin is down.
        await cache.server.pool.closeCachedConnections()
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache"), got.body), (200, "STALE", first.body))

    async def test_429_without_copy(self) -> None:
        self.origin.fail_all = Fault(429, {"retry-after": "30"})
        cache = self.cache()
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (429, ["TOOMANYREQUESTS"]))
        self.assertEqual(got.header("retry-after"), "30")

    async def test_origin_down_without_copy(self) -> None:
        cache = start_cache(self, {"127.0.0.1:5001": "http://127.0.0.1:1"})
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (502, ["UNAVAILABLE"]))


class IntegrityTests(RegistryTestCase):
    async def test_blob_digest_mismatch_not_stored(self) -> None:
        cache = self.cache()
        layer = self.image.layers[1]
        upstream = f"/v2/team/app/blobs/{layer}"
        self.origin.tamper[upstream] = b"layer 2!!"
        got = await self.get(cache, f"{upstream}?ns=127.0.0.1:5001")
        self.assertNotEqual(got.body, b"layer 2!!")
        self.assertTrue(got.status == 502 or not got.complete)
        self.assertIsNone(cache.store.peek(f"oci:blobs/{layer}"))

    async def test_manifest_digest_mismatch_is_502(self) -> None:
        cache = self.cache()
        upstream = f"/v2/team/app/manifests/{self.image.digest}"
        self.origin.tamper[upstream] = self.image.manifest.replace(b"schemaVersion", b"schemaversion")
        got = await self.get(cache, f"{upstream}?ns=127.0.0.1:5001", {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (502, ["UNAVAILABLE"]))
        self.assertIsNone(
            cache.store.peek(f"oci:127.0.0.1:5001/team/app/manifests/{self.image.digest}")
        )

    async def test_tag_checked_against_upstream_digest(self) -> None:
        cache = self.cache()
        upstream = "/v2/team/app/manifests/t1"
        self.origin.tamper[upstream] = self.image.manifest + b" "
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (502, ["UNAVAILABLE"]))
        self.assertIsNone(cache.store.peek("oci:127.0.0.1:5001/team/app/manifests/t1"))

    async def test_sha512_blob_checked(self) -> None:
        import hashlib

        cache = self.cache()
        good, bad = b"sha512 layer", b"sha512 other"
        digest = "sha512:" + hashlib.sha512(good).hexdigest()
        self.origin.blobs[digest] = good
        path = f"/v2/team/app/blobs/{digest}"
        first = await self.get(cache, f"{path}?ns=127.0.0.1:5001")
        second = await self.get(cache, f"{path}?ns=127.0.0.1:5001")
        self.assertEqual((first.status, first.body, second.header("x-cache")), (200, good, "HIT"))
        other = "sha512:" + hashlib.sha512(b"x").hexdigest()
        self.origin.blobs[other] = bad
        got = await self.get(cache, f"/v2/team/app/blobs/{other}?ns=127.0.0.1:5001")
        self.assertEqual((got.status, errors_of(got)), (502, ["UNAVAILABLE"]))
        self.assertIsNone(cache.store.peek(f"oci:blobs/{other}"))

    async def test_truncated_tag_manifest_not_stored(self) -> None:
        cache = self.cache()
        self.origin.truncate["/v2/team/app/manifests/t1"] = 20
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertTrue(got.status == 502 or not got.complete)
        self.assertNotEqual(got.body, self.image.manifest)
        self.assertIsNone(cache.store.peek("oci:127.0.0.1:5001/team/app/manifests/t1"))

    async def test_truncated_blob_not_stored(self) -> None:
        cache = self.cache()
        layer = self.image.layers[0]
        upstream = f"/v2/team/app/blobs/{layer}"
        self.origin.truncate[upstream] = 1000
        got = await self.get(cache, f"{upstream}?ns=127.0.0.1:5001")
        self.assertTrue(got.status == 502 or not got.complete)
        self.assertIsNone(cache.store.peek(f"oci:blobs/{layer}"))


class ConcurrencyTests(RegistryTestCase):
    async def test_concurrent_blob_gets_one_upstream_get(self) -> None:
        """
        Four clients, one upstream GET; a Range within what has arrived is
        answered while the fill runs (a blob over 4 MiB streams before its
        check).
        """
        cache = self.cache()
        layer = self.origin.add_blob(pattern_bytes(5 * 1024 * 1024, b"big"))
        upstream = f"/v2/team/app/blobs/{layer}"
        release: Deferred[None] = Deferred()
        started: Deferred[None] = Deferred()
        self.origin.gate[upstream] = Gate(1024 * 1024, release)
        self.origin.started[upstream] = started
        path = f"{upstream}?ns=127.0.0.1:5001"
        first = Deferred.fromCoroutine(self.get(cache, path))
        await started
        others = [Deferred.fromCoroutine(self.get(cache, path)) for _ in range(3)]
        ranged = Deferred.fromCoroutine(self.get(cache, path, {"range": "bytes=100-199"}))
        # The range within what has arrived is answered before the rest.
        got_range = await ranged
        release.callback(None)
        results = await gatherResults([first, *others])
        data = self.origin.blobs[layer]
        self.assertEqual((got_range.status, got_range.body), (206, data[100:200]))
        self.assertEqual([r.body == data for r in results], [True] * 4)
        self.assertEqual(self.origin.requests[("GET", upstream)], 1)


class AccessTests(RegistryTestCase):
    async def test_client_outside_allow_from_denied(self) -> None:
        from ipaddress import ip_network

        cache = self.cache(allow_from=(ip_network("10.0.0.0/8"),))
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (403, ["DENIED"]))
        self.assertEqual(len(self.origin.seen), 0)

    async def test_blob_redirect_followed_without_authorization(self) -> None:
        """
        A 307 to another origin (blob storage) is followed when that
        origin passes --allow-upstream; the blob is stored under its key.
        """
        storage = OciOrigin(blobs=self.origin.blobs)
        storage_url = start_origin(self, storage)
        self.origin.redirect_blobs = Redirect(307, storage_url)
        cache = self.cache(allow_upstream=("127.0.0.1",))
        layer = self.image.layers[1]
        path = f"/v2/team/app/blobs/{layer}"
        first = await self.get(cache, f"{path}?ns=127.0.0.1:5001", {"authorization": "Bearer x"})
        second = await self.get(cache, f"{path}?ns=127.0.0.1:5001")
        self.assertEqual((first.status, first.body), (200, self.origin.blobs[layer]))
        self.assertEqual(second.header("x-cache"), "HIT")
        self.assertEqual((self.origin.count(path), storage.count(path)), (1, 1))
        self.assertEqual([s.headers.get("authorization") for s in storage.seen], [None])

    async def test_redirect_target_must_be_allowed(self) -> None:
        storage = OciOrigin(blobs=self.origin.blobs)
        self.origin.redirect_blobs = Redirect(302, start_origin(self, storage))
        cache = self.cache()
        layer = self.image.layers[1]
        got = await self.get(cache, f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001")
        self.assertEqual((got.status, errors_of(got)), (403, ["DENIED"]))
        self.assertEqual(len(storage.seen), 0)


class TokenTests(RegistryTestCase):
    """The token flow, through the server's own upstream client."""

    async def test_anonymous_token_flow(self) -> None:
        self.origin.token = TokenFlow(expires_in=300)
        cache = self.cache()
        manifest = await self.get(
            cache, self.manifest_path(), {"accept": ALL_MANIFESTS, "authorization": "Bearer mine"}
        )
        blob = await self.get(cache, f"/v2/team/app/blobs/{self.image.layers[1]}?ns=127.0.0.1:5001")
        self.assertEqual((manifest.status, manifest.body), (200, self.image.manifest))
        self.assertEqual(blob.status, 200)
        # One token, reused for the blob of the same repository.
        self.assertEqual(self.origin.tokens, ["token-1"])
        sent = {s.headers.get("authorization") for s in self.origin.seen if s.path != "/token"}
        self.assertEqual(sent, {None, "Bearer token-1"})

    async def test_registry_auth_credentials_used_never_logged(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(repr(event) + (formatEvent(event) or ""))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.origin.token = TokenFlow(credentials=("alice", "s3cret-pw"))
        cache = start_cache(
            self, {"127.0.0.1:5001": self.origin_url},
            {"127.0.0.1:5001": Credentials("alice", "s3cret-pw")},
        )
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.body), (200, self.image.manifest))
        self.assertEqual(self.origin.requests[("GET", "/token")], 1)
        self.assertTrue(lines)
        self.assertEqual([line for line in lines if "s3cret" in line or "token-1" in line], [])
        self.assertNotIn("s3cret", repr(cache.server.config))

    async def test_refused_token_is_our_unauthorized(self) -> None:
        self.origin.token = TokenFlow(credentials=("alice", "s3cret-pw"))
        cache = self.cache()
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (401, ["UNAUTHORIZED"]))
        self.assertIsNone(got.header("www-authenticate"))
        self.assertIn("--registry-auth 127.0.0.1:5001=FILE", got.body.decode())

    async def test_wrong_credentials_said_so(self) -> None:
        """Credentials given but refused: the client is told they are wrong."""
        self.origin.token = TokenFlow(credentials=("alice", "s3cret-pw"))
        cache = start_cache(
            self, {"127.0.0.1:5001": self.origin_url},
            {"127.0.0.1:5001": Credentials("alice", "wrong-pw")},
        )
        got = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, errors_of(got)), (401, ["UNAUTHORIZED"]))
        message = json.loads(got.body)["errors"][0]["message"]
        self.assertIn("the credentials of --registry-auth 127.0.0.1:5001=FILE do not", message)
        self.assertNotIn("wrong-pw", got.body.decode())

    async def test_token_not_sent_to_blob_storage(self) -> None:
        self.origin.token = TokenFlow()
        storage = OciOrigin(blobs=self.origin.blobs)
        self.origin.redirect_blobs = Redirect(307, start_origin(self, storage))
        cache = self.cache(allow_upstream=("127.0.0.1",))
        layer = self.image.layers[0]
        got = await self.get(cache, f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001")
        self.assertEqual((got.status, got.body), (200, self.origin.blobs[layer]))
        self.assertEqual([s.headers.get("authorization") for s in storage.seen], [None])
        self.assertEqual(self.origin.tokens, ["token-1"])
