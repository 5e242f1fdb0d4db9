"""
Regression tests for what the review of the registry port found: a tag
that moved whose GET then fails is served stale, an upstream that ignores
``Accept`` never reaches a client with a type it does not take, a tag's
manifest is bounded and carries its digest on a miss, and a 416 carries none of the object's
headers.
"""

from __future__ import annotations

import json

from twisted.web.iweb import IRequest

from tests.oci_origin import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Fault,
    OciOrigin,
    start_origin,
)
from tests.test_oci_registry import RegistryTestCase, errors_of, start_cache


class GetOnlyFaultOrigin(OciOrigin):
    """Faults for GETs only (a HEAD passes): Docker Hub's pull limit."""

    def render(self, request: IRequest) -> object:
        if request.method == b"HEAD":
            saved, self.fail = self.fail, {}
            try:
                return super().render(request)
            finally:
                self.fail = saved
        return super().render(request)


class StaleAfterHeadTests(RegistryTestCase):
    async def test_429_on_get_after_head_says_tag_moved(self) -> None:
        """
        The tag moved upstream (the HEAD, not counted by Docker Hub, says
        so), and the GET of it is rate-limited: the stored copy must be
        served STALE (the issue: tags served stale when the upstream
        answers 429), not a 429.
        """
        self.origin = GetOnlyFaultOrigin(blobs=self.origin.blobs)
        self.origin_url = start_origin(self, self.origin)
        image = self.origin.push_image("team/app", "t1", [b"old"])
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual(first.body, image.manifest)
        self.origin.push_image("team/app", "t1", [b"new"])
        self.origin.fail["/v2/team/app/manifests/t1"] = Fault(429)
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))
        self.assertEqual(got.body, image.manifest)

    async def test_head_then_get_503_after_tag_moved(self) -> None:
        """The same with a 5xx on the GET."""
        self.origin = GetOnlyFaultOrigin(blobs=self.origin.blobs)
        self.origin_url = start_origin(self, self.origin)
        image = self.origin.push_image("team/app", "t1", [b"old"])
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.origin.push_image("team/app", "t1", [b"new"])
        self.origin.fail["/v2/team/app/manifests/t1"] = Fault(503)
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))
        self.assertEqual(got.body, image.manifest)


class AcceptTests(RegistryTestCase):
    def _index_tag(self) -> bytes:
        body = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": self.image.digest, "size": len(self.image.manifest)}],
        }).encode()
        self.origin.add_manifest("team/app", body, OCI_INDEX, tags=("multi",))
        return body

    async def test_oci_index_never_to_docker_v2_only_client_get(self) -> None:
        """An upstream ignoring Accept: the index must not reach a v2-only client."""
        self.origin.ignore_accept = True
        body = self._index_tag()
        cache = self.cache()
        got = await self.get(cache, self.manifest_path("multi"), {"accept": DOCKER_MANIFEST})
        self.assertNotEqual(got.header("content-type"), OCI_INDEX)
        self.assertNotEqual(got.body, body)

    async def test_oci_index_never_to_docker_v2_only_client_head(self) -> None:
        self.origin.ignore_accept = True
        self._index_tag()
        cache = self.cache()
        got = await self.get(
            cache, self.manifest_path("multi"), {"accept": DOCKER_MANIFEST}, method=b"HEAD"
        )
        self.assertNotEqual((got.status, got.header("content-type")), (200, OCI_INDEX))


    async def test_narrower_client_served_the_shared_copy(self) -> None:
        """
        A client that takes OCI manifests only is answered from the copy a
        client taking every type stored (its type is OCI): no upstream
        request, and stale from it when the upstream is down.
        """
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        upstream = ("GET", "/v2/team/app/manifests/t1")
        self.assertEqual(self.origin.requests[upstream], 1)
        self.origin.fail_all = Fault(503)
        got = await self.get(cache, path, {"accept": OCI_MANIFEST})
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))
        self.assertEqual(got.body, self.image.manifest)
        self.assertEqual(self.origin.requests[upstream], 1)
        # A client that takes Docker v2 only is not answered from it.
        other = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual(other.status, 502)


class SharedLayerTests(RegistryTestCase):
    async def test_a_layer_crosses_the_line_once(self) -> None:
        """
        The same layer asked from another repository, and from another
        registry, is the copy stored once (a new user's finding: each
        repository fetched and stored base layers again).
        """
        other = OciOrigin(blobs=self.origin.blobs)
        other_url = start_origin(self, other)
        cache = start_cache(self, {
            "docker.io": self.hub_url, "127.0.0.1:5001": self.origin_url,
            "registry.test": other_url,
        })
        layer = self.image.layers[0]
        first = await self.get(cache, f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001")
        again = await self.get(cache, f"/v2/team/other/blobs/{layer}?ns=127.0.0.1:5001")
        elsewhere = await self.get(cache, f"/v2/registry.test/base/blobs/{layer}")
        self.assertEqual(
            [g.header("x-cache") for g in (first, again, elsewhere)], ["MISS", "HIT", "HIT"]
        )
        self.assertEqual({g.body for g in (first, again, elsewhere)}, {self.origin.blobs[layer]})
        gets = [s for s in (*self.origin.seen, *other.seen) if "/blobs/" in s.path]
        self.assertEqual(len(gets), 1)
        self.assertEqual(
            [e.key for e in cache.store.keys() if "blobs" in e.key], [f"oci:blobs/{layer}"]
        )


class SpecTests(RegistryTestCase):
    async def test_tag_miss_carries_docker_content_digest(self) -> None:
        """
        A manifest by tag from an upstream that does not say its digest:
        the MISS says it as the HIT does (clients pin the tag by it).
        """
        self.origin.send_digest = False
        cache = self.cache()
        miss = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        hit = await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.assertEqual(hit.header("docker-content-digest"), self.image.digest)
        self.assertEqual(miss.header("docker-content-digest"), self.image.digest)

    async def test_blob_range_unsatisfiable(self) -> None:
        cache = self.cache()
        layer = self.image.layers[1]
        path = f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001"
        await self.get(cache, path)
        got = await self.get(cache, path, {"range": "bytes=100000-"})
        self.assertEqual(got.status, 416)
        self.assertEqual(got.header("content-range"), f"bytes */{len(self.origin.blobs[layer])}")

    async def test_tag_manifest_size_bounded(self) -> None:
        """
        A manifest by tag has no digest to check it against (an upstream
        without Docker-Content-Digest): the spec bounds manifests at 4 MiB;
        a larger answer must not be stored (nor served whole).
        """
        self.origin.send_digest = False
        self.origin.ignore_accept = True
        huge = b"{" + b" " * (8 * 1024 * 1024) + b"}"
        self.origin.add_manifest(
            "team/app", huge, "application/vnd.oci.image.manifest.v1+json", tags=("huge",)
        )
        cache = self.cache()
        await self.get(cache, self.manifest_path("huge"), {"accept": ALL_MANIFESTS})
        self.assertIsNone(cache.store.peek("oci:127.0.0.1:5001/team/app/manifests/huge"))

    async def test_unknown_blob_head_code(self) -> None:
        cache = self.cache()
        got = await self.get(
            cache, "/v2/team/app/blobs/sha256:" + "0" * 64 + "?ns=127.0.0.1:5001",
            method=b"HEAD",
        )
        self.assertEqual(got.status, 404)
        self.assertEqual(got.header("docker-distribution-api-version"), "registry/2.0")

    async def test_unknown_endpoint_json(self) -> None:
        cache = self.cache()
        got = await self.get(cache, "/v2/_catalog")
        self.assertEqual(got.status, 404)
        self.assertTrue(errors_of(got))


class EngineSeamTests(RegistryTestCase):
    async def test_416_not_cacheable_for_a_year(self) -> None:
        """A 416 is no blob: it must not say immutable for a year."""
        cache = self.cache()
        layer = self.image.layers[1]
        path = f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001"
        got = await self.get(cache, path, {"range": "bytes=100000-"})
        self.assertEqual(got.status, 416)
        self.assertNotIn("immutable", got.header("cache-control") or "")
