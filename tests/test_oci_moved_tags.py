"""
The registry port after a tag moved, and its shared layer key: a HEAD
never gives the old digest when the new manifest was not kept, a client
taking Docker v2 only is answered from its own key when the copy for every
type became a list, a 304 or a cut body on the GET after a move serves the
stored copy stale, and a layer asked from two registries at once is not
answered with the other registry's failure.  Regression tests of the
second review of issue 14.
"""

from __future__ import annotations

import json

from tests.oci_origin import (
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Fault,
    start_origin,
)
from tests.test_oci_registry import RegistryTestCase
from tests.test_oci_regressions import GetOnlyFaultOrigin


class HeadAfterMovedTagTests(RegistryTestCase):
    def _index_for(self, digest: str, size: int) -> bytes:
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": size}],
        }).encode()

    async def test_narrow_head_after_tag_became_index_not_old_digest(self) -> None:
        """
        A docker client stored tag t1 (an OCI manifest) under the shared
        key; the tag is republished as an OCI index.  A client taking OCI
        manifests only is moved to the shared copy (_shared_copy); its HEAD
        revalidates, the GET brings the index, which its policy does not
        store.  Its GET is answered 404 (right); its HEAD must not be
        answered 200 with the OLD digest, as a MISS, from the copy that
        was just found out of date.
        """
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        old = self.image.digest
        index = self._index_for(self.image.digest, len(self.image.manifest))
        new = self.origin.add_manifest("team/app", index, OCI_INDEX, tags=("t1",))
        get = await self.get(cache, path, {"accept": OCI_MANIFEST})
        head = await self.get(cache, path, {"accept": OCI_MANIFEST}, method=b"HEAD")
        self.assertEqual(get.status, 404)
        self.assertNotEqual(new, old)
        # The HEAD and the GET of one request must agree.
        self.assertEqual(
            (head.status, head.header("docker-content-digest")), (404, None),
            f"HEAD answered {head.status} {head.header('x-cache')} with the"
            f" old digest {head.header('docker-content-digest')} (tag is now {new})",
        )

    async def test_head_after_tag_moved_to_unaccepted_type(self) -> None:
        """
        The same with an upstream that ignores Accept, no shared copy: a
        Docker-v2-only client's tag moves to an OCI index.
        """
        self.origin = GetOnlyFaultOrigin(blobs=self.origin.blobs)
        self.origin_url = start_origin(self, self.origin)
        self.origin.ignore_accept = True
        image = self.origin.push_image("team/app", "t1", [b"old"], media_type=DOCKER_MANIFEST)
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        first = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual(first.body, image.manifest)
        index = self._index_for(image.digest, len(image.manifest))
        new = self.origin.add_manifest("team/app", index, OCI_INDEX, tags=("t1",))
        head = await self.get(cache, path, {"accept": DOCKER_MANIFEST}, method=b"HEAD")
        get = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual(get.status, 404)
        self.assertEqual(
            (head.status, head.header("docker-content-digest")), (404, None),
            f"HEAD answered {head.status} {head.header('x-cache')} with the"
            f" old digest {head.header('docker-content-digest')} (tag is now {new})",
        )


from twisted.web.iweb import IRequest  # noqa: E402

from tests.oci_origin import OciOrigin  # noqa: E402

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


class DefaultPlatformOrigin(OciOrigin):
    """
    The distribution registry's (and Docker Hub's) rule: a manifest list
    asked by a client that does not take lists is answered with the list's
    first (linux/amd64) manifest instead.
    """

    def _manifest(self, request: IRequest, repo: str, ref: str, headers: object) -> object:
        accept = dict(headers).get("accept", "")  # type: ignore[call-overload]
        digest = ref if ":" in ref else self.tags.get(repo, {}).get(ref)
        manifest = self.manifests.get(repo, {}).get(digest or "")
        if manifest is not None and manifest.media_type == DOCKER_LIST and DOCKER_LIST not in accept:
            first = json.loads(manifest.body)["manifests"][0]["digest"]
            return super()._manifest(request, repo, first, headers)  # type: ignore[arg-type]
        return super()._manifest(request, repo, ref, headers)  # type: ignore[arg-type]


class SharedCopyTests(RegistryTestCase):
    async def test_v2_only_client_after_tag_became_a_list(self) -> None:
        """
        A Docker-v2-only client is served from the all-types copy
        (_shared_copy).  The tag becomes a manifest list: the upstream
        answers such a client with the list's linux/amd64 manifest, and a
        cache with no all-types copy passes that on; with one, the cache
        revalidates with the all-types Accept, gets the list and answers
        404 MANIFEST_UNKNOWN.
        """
        self.origin = DefaultPlatformOrigin(blobs=self.origin.blobs)
        self.origin_url = start_origin(self, self.origin)
        image = self.origin.push_image("team/app", "t1", [b"one"], media_type=DOCKER_MANIFEST)
        cache = self.cache(index_ttl=0)
        path = self.manifest_path()
        await self.get(cache, path, {"accept": ALL_MANIFESTS})
        hit = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual(hit.body, image.manifest)
        listing = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_LIST,
            "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": image.digest,
                           "size": len(image.manifest),
                           "platform": {"architecture": "amd64", "os": "linux"}}],
        }).encode()
        self.origin.add_manifest("team/app", listing, DOCKER_LIST, tags=("t1",))
        # What the upstream itself answers that client:
        direct = await self.client.get(
            self.origin_url + "/v2/team/app/manifests/t1", {"accept": DOCKER_MANIFEST}
        )
        self.assertEqual((direct.status, direct.body), (200, image.manifest))
        got = await self.get(cache, path, {"accept": DOCKER_MANIFEST})
        self.assertEqual(
            (got.status, got.body), (200, image.manifest),
            f"the cache answered {got.status} {got.body[:120]!r}",
        )


class MovedTagGetFailsTests(RegistryTestCase):
    async def _moved(self) -> tuple[object, str]:
        self.origin = GetOnlyFaultOrigin(blobs=self.origin.blobs)
        self.origin_url = start_origin(self, self.origin)
        image = self.origin.push_image("team/app", "t1", [b"old"])
        cache = self.cache(index_ttl=0)
        await self.get(cache, self.manifest_path(), {"accept": ALL_MANIFESTS})
        self.origin.push_image("team/app", "t1", [b"new"])
        self.old = image
        return cache, self.manifest_path()

    async def test_truncated_get_after_move_head(self) -> None:
        """A moved tag whose GET is cut short: a HEAD is served stale."""
        cache, path = await self._moved()
        self.origin.truncate["/v2/team/app/manifests/t1"] = 10
        head = await self.get(cache, path, {"accept": ALL_MANIFESTS}, method=b"HEAD")
        self.assertEqual(
            (head.status, head.header("x-cache"), head.header("docker-content-digest")),
            (200, "STALE", self.old.digest),
        )

    async def test_truncated_get_after_move_get(self) -> None:
        """A moved tag whose GET is cut short: a GET is served stale."""
        cache, path = await self._moved()
        self.origin.truncate["/v2/team/app/manifests/t1"] = 10
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache"), got.body),
                         (200, "STALE", self.old.manifest))

    async def test_get_answers_304_after_move(self) -> None:
        """
        A GET (unconditional) answered 304 after the HEAD said the tag
        moved: a miss treats that as an upstream failure; here the stored
        copy should answer stale, not a 502.
        """
        cache, path = await self._moved()
        self.origin.fail["/v2/team/app/manifests/t1"] = Fault(304, body=b"")
        got = await self.get(cache, path, {"accept": ALL_MANIFESTS})
        self.assertEqual((got.status, got.header("x-cache")), (200, "STALE"))


from twisted.internet.defer import Deferred  # noqa: E402
from twisted.web.server import NOT_DONE_YET  # noqa: E402

from buildcache.fetch.fetcher import Fetcher  # noqa: E402


class HoldingOrigin(OciOrigin):
    """Holds every blob GET until the test answers it."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.held: list[IRequest] = []
        self.arrived: Deferred[None] = Deferred()

    def render(self, request: IRequest) -> object:
        if request.method == b"GET" and b"/blobs/" in request.path:
            self.requests[("GET", request.path.decode())] += 1
            self.held.append(request)
            self.arrived.callback(None)
            return NOT_DONE_YET
        return super().render(request)


class SharedBlobKeyTests(RegistryTestCase):
    async def test_other_registrys_failure_not_served(self) -> None:
        """
        One layer asked at once from two registries (oci:blobs/<digest>
        is one key): registry A answers 429 (its pull limit), registry B
        has the layer.  B's client joined A's download by the shared key
        and gets A's 429, though B was never asked.
        """
        holding = HoldingOrigin(blobs=self.origin.blobs)
        holding_url = start_origin(self, holding)
        from tests.test_oci_registry import start_cache
        cache = start_cache(self, {"docker.io": self.hub_url, "127.0.0.1:5001": holding_url})
        layer = self.image.layers[1]
        calls: list[object] = []
        joined: Deferred[None] = Deferred()
        original = Fetcher.fetch

        def fetch(fetcher: Fetcher, request: object) -> object:
            result = original(fetcher, request)  # type: ignore[arg-type]
            calls.append(request)
            if len(calls) == 2:
                joined.callback(None)
            return result

        self.patch(Fetcher, "fetch", fetch)
        from_a = Deferred.fromCoroutine(
            self.get(cache, f"/v2/team/app/blobs/{layer}?ns=127.0.0.1:5001")
        )
        await holding.arrived
        from_b = Deferred.fromCoroutine(self.get(cache, f"/v2/team/app/blobs/{layer}"))
        await joined
        request = holding.held[0]
        request.setResponseCode(429)
        request.setHeader("content-type", "application/json")
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"limit"}]}'
        request.setHeader("content-length", str(len(body)))
        request.write(body)
        request.finish()
        a = await from_a
        b = await from_b
        self.assertEqual(a.status, 429)
        self.assertEqual(
            (b.status, b.body), (200, self.origin.blobs[layer]),
            f"docker.io's client got {b.status} {b.body[:100]!r};"
            f" docker.io was asked {self.hub.requests[('GET', f'/v2/team/app/blobs/{layer}')]} times",
        )
