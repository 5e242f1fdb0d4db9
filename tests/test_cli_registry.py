"""
The registry front end's keys in the ``buildcache`` command: ``purge
--image`` removing exactly a repository's or a tag's rows and files from a
store that holds registry, http and simple-page keys, ``stats`` and
``verify`` on registry keys, and the key and image-name parsing
underneath (:mod:`buildcache.ops.registry_keys`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.oci.names import parse_request
from buildcache.ops.cli_keys import entry_kind, key_matcher
from buildcache.ops.front_ends import FRONT_END_TABLE
from buildcache.ops.registry_keys import (
    ImageName,
    RegistryKey,
    digest_mismatch,
    parse_image,
    parse_key,
    stored_tags,
)
from buildcache.store import Store
from tests.test_admin import object_files, run, stored_keys


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


LAYER = b"layer of alpine"
CONFIG_BLOB = b'{"architecture":"amd64"}'
INDEX = b'{"mediaType":"application/vnd.oci.image.index.v1+json"}'
MANIFEST = b'{"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
APP_MANIFEST = b'{"app":1}'

ALPINE = "oci:docker.io/library/alpine"
#: A repository whose name starts with alpine's and one path component more.
NESTED = "oci:docker.io/library/alpine/extra"
#: The same repository name on another registry.
OTHER_REGISTRY = "oci:127.0.0.1:5001/library/alpine"
APP = "oci:127.0.0.1:5001/team/app"
BLOBS = "oci:blobs/"
ACCEPT = ";accept=docker-manifest,oci-manifest"

#: Key to body: every kind of registry key, and the other front ends'.
STORED: dict[str, bytes] = {
    f"{ALPINE}/manifests/3.19": INDEX,
    f"{ALPINE}/manifests/3.19{ACCEPT}": MANIFEST,
    f"{ALPINE}/manifests/latest": INDEX,
    f"{ALPINE}/manifests/{digest_of(INDEX)}": INDEX,
    f"{ALPINE}/manifests/{digest_of(MANIFEST)}": MANIFEST,
    # One copy of a layer, whatever repository asked for it.
    f"{BLOBS}{digest_of(LAYER)}": LAYER,
    f"{BLOBS}{digest_of(CONFIG_BLOB)}": CONFIG_BLOB,
    f"{ALPINE}/tags/list": b'{"tags":["3.19","latest"]}',
    f"{ALPINE}/tags/list?n=10": b'{"tags":["3.19"]}',
    f"{ALPINE}/referrers/{digest_of(INDEX)}?artifactType=application/vnd.x": b"{}",
    f"{NESTED}/manifests/3.19": MANIFEST,
    f"{OTHER_REGISTRY}/manifests/3.19": MANIFEST,
    f"{APP}/manifests/v1": APP_MANIFEST,
    f"{APP}/manifests/{digest_of(APP_MANIFEST)}": APP_MANIFEST,
    "https://mirror.test/alpine/v3.19/main/x86_64/curl-8.5.0-r0.apk": b"apk",
    "http://deb.test/debian/pool/main/c/curl/curl_7.88.1-10_amd64.deb": b"deb",
    "simple-page|http://127.0.0.1:9000/simple|alpine": b"<html></html>",
    "http://docker.io/library/alpine/manifests/3.19": b"a URL, not a registry key",
}
ALPINE_KEYS = {key for key in STORED if key.startswith(f"{ALPINE}/")} - {
    key for key in STORED if key.startswith(f"{NESTED}/")
}


def store_bodies(directory: str, bodies: Mapping[str, bytes], clock: Clock | None = None) -> None:
    """
    Store each body under its key through a real store.
    """
    store = Store.open(directory, 1 << 30, cast(IReactorTime, clock or Clock()))
    try:
        for key, body in bodies.items():
            writer = store.writer(key)
            writer.write(body)
            writer.commit({"content-type": "application/octet-stream"})
    finally:
        store.close()



class PurgeTests(SynchronousTestCase):
    """
    ``buildcache purge --image`` on a cache holding registry, http and
    simple-page keys.
    """

    def setUp(self) -> None:
        self.cache_dir = os.path.abspath(self.mktemp())
        store_bodies(self.cache_dir, STORED)
        self.files = len(object_files(self.cache_dir))
        self.assertEqual(self.files, len(STORED))

    def assert_left(self, removed: set[str]) -> None:
        """
        Exactly ``removed`` lost their rows and their files.
        """
        self.assertEqual(stored_keys(self.cache_dir), set(STORED) - removed)
        self.assertEqual(len(object_files(self.cache_dir)), self.files - len(removed))

    def test_repository(self) -> None:
        """
        A repository goes with all its manifests (by tag, by digest, every
        Accept variant), tag lists and referrers; the layers (shared by
        every image), a repository one component longer, the same name on
        another registry, URL keys that look alike and the other front
        ends' keys stay.
        """
        code, out, err = run(
            "purge", "--image", "docker.io/library/alpine", "--cache-dir", self.cache_dir
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(ALPINE_KEYS), 8)
        self.assert_left(ALPINE_KEYS)
        self.assertIn(f"Removed {len(ALPINE_KEYS)} entries", out)
        for key in ALPINE_KEYS:
            self.assertIn(f"removed {key}  ", out)

    def test_one_word_name(self) -> None:
        """
        A name without a registry is docker.io's, with ``library/``.
        """
        code, _, _ = run("purge", "--image", "alpine", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left(ALPINE_KEYS)

    def test_tag(self) -> None:
        """
        A tag removes its manifests for every client's Accept and nothing
        else: not the digests it pointed at, nor its other tags, nor the
        same tag of other repositories.
        """
        code, out, _ = run("purge", "--image", "alpine:3.19", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({f"{ALPINE}/manifests/3.19", f"{ALPINE}/manifests/3.19{ACCEPT}"})
        self.assertIn("Removed 2 entries", out)

    def test_digest_and_several(self) -> None:
        digest = digest_of(APP_MANIFEST)
        code, _, _ = run(
            "purge", "--image", f"127.0.0.1:5001/team/app@{digest}",
            "--image", "127.0.0.1:5001/library/alpine:3.19", "--cache-dir", self.cache_dir,
        )
        self.assertEqual(code, 0)
        self.assert_left({f"{APP}/manifests/{digest}", f"{OTHER_REGISTRY}/manifests/3.19"})

    def test_dry_run(self) -> None:
        code, out, _ = run(
            "purge", "--dry-run", "--image", "alpine:latest", "--cache-dir", self.cache_dir
        )
        self.assertEqual(code, 0)
        self.assert_left(set())
        self.assertIn(f"would remove {ALPINE}/manifests/latest", out)
        self.assertIn("Would remove 1 entry,", out)
        self.assertIn("--image alpine:latest is docker.io/library/alpine:latest\n", out)

    def test_not_an_image(self) -> None:
        """
        A name docker would refuse is refused before anything is removed.
        """
        for bad in ("Alpine", "alpine:bad:tag", "alpine@md5", "alpine:1@sha256:ab", ""):
            code, _, err = run("purge", "--image", bad, "--cache-dir", self.cache_dir)
            self.assertEqual(code, 2, bad)
            self.assertIn(f"--image {bad!r}", err)
        code, _, err = run("purge", "--image", "docker.io/library/*", "--cache-dir",
                           self.cache_dir)
        self.assertEqual(code, 2)
        self.assertIn("for a glob give a PATTERN over the keys", err)
        self.assert_left(set())

    def test_globs_over_registry_keys(self) -> None:
        """
        A glob over the whole registry key works; a glob without a scheme,
        meant for URLs, does not reach into registry keys.
        """
        code, _, _ = run("purge", "docker.io/*", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({"http://docker.io/library/alpine/manifests/3.19"})
        code, _, _ = run("purge", "oci:127.0.0.1:5001/*", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        self.assert_left({
            "http://docker.io/library/alpine/manifests/3.19",
            *(key for key in STORED if key.startswith(("oci:127.0.0.1:5001/"))),
        })

    def test_needs_something(self) -> None:
        code, _, err = run("purge", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 2)
        self.assertIn("--image IMAGE", err)
        self.assert_left(set())


class StatsAndVerifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = os.path.abspath(self.mktemp())
        store_bodies(self.cache_dir, STORED)

    def test_stats_kinds(self) -> None:
        """
        ``stats`` counts the registry's manifests and blobs as their own
        kinds (the front ends' kinds, from their table, in order), its
        lists with the indexes.
        """
        code, out, _ = run("stats", "--json", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 0)
        kinds = {kind: total["entries"] for kind, total in json.loads(out)["kinds"].items()}
        self.assertEqual(
            list(kinds),
            [kind for front_end in FRONT_END_TABLE for kind in front_end.kinds]
            + ["index", "other"],
        )
        self.assertEqual(kinds, {
            "apk": 1, "deb": 1, "wheel": 0, "sdist": 0, "manifest": 9, "blob": 2,
            "index": 4, "other": 1,
        })
        self.assertIn("manifest         9", run("stats", "--cache-dir", self.cache_dir)[1])

    def test_verify_digests(self) -> None:
        """
        A blob or manifest whose body is not the digest its key names, or
        a tag's manifest not the digest stored to tell its clients, is
        removed (exit 1); sound ones stay.
        """
        self.assertEqual(run("verify", "--cache-dir", self.cache_dir)[0], 0)
        wrong = f"{BLOBS}{digest_of(b'another layer')}"
        store_bodies(self.cache_dir, {wrong: LAYER})
        # A tag whose body is not the digest clients are told with it.
        edge, sound = f"{ALPINE}/manifests/edge", f"{ALPINE}/manifests/stable"
        store = Store.open(self.cache_dir, 1 << 30, cast(IReactorTime, Clock()))
        for key, told in ((edge, digest_of(INDEX)), (sound, digest_of(MANIFEST))):
            writer = store.writer(key)
            writer.write(MANIFEST)
            writer.commit({"docker-content-digest": told})
        store.close()
        code, out, _ = run("verify", "--cache-dir", self.cache_dir)
        self.assertEqual(code, 1)
        self.assertIn(
            f"disagrees with its index, removed: {wrong} (sha256"
            f" {hashlib.sha256(LAYER).hexdigest()} stored under the digest", out,
        )
        self.assertIn(
            f"disagrees with its index, removed: {edge} (sha256"
            f" {hashlib.sha256(MANIFEST).hexdigest()} stored under its"
            f" docker-content-digest {digest_of(INDEX)})", out,
        )
        self.assertIn("2 disagreeing with their index", out)
        self.assertEqual(stored_keys(self.cache_dir), set(STORED) | {sound})


class KeysTests(SynchronousTestCase):
    def test_parse_key(self) -> None:
        digest = "sha256:" + "a" * 64
        cases = {
            f"{ALPINE}/manifests/3.19": RegistryKey(
                "docker.io", "library/alpine", "manifests", "3.19"),
            f"{ALPINE}/manifests/3.19{ACCEPT}": RegistryKey(
                "docker.io", "library/alpine", "manifests", "3.19"),
            f"{BLOBS}{digest}": RegistryKey("", "", "blobs", digest),
            f"{APP}/blobs/{digest}": None,
            "oci:r.test/foo/tags/tags/list": RegistryKey("r.test", "foo/tags", "tags", None),
            "oci:r.test/foo/tags/list?n=10&last=x": RegistryKey("r.test", "foo", "tags", None),
            f"oci:r.test/a/referrers/{digest}?artifactType=application/vnd.x":
                RegistryKey("r.test", "a", "referrers", digest),
            f"oci:r.test/a/manifests/v1/manifests/{digest}":
                RegistryKey("r.test", "a/manifests/v1", "manifests", digest),
            "oci:r.test/a/manifests/v1#p=" + "0" * 32:
                RegistryKey("r.test", "a", "manifests", "v1"),
            "oci:r.test/a": None,
            "oci:r.test/a/blobs/": None,
            "https://r.test/v2/a/manifests/v1": None,
        }
        self.assertEqual({key: parse_key(key) for key in cases}, cases)
        by_digest = parse_key(f"{ALPINE}/manifests/{digest}")
        variant = parse_key(f"{ALPINE}/manifests/3.19{ACCEPT}")
        assert by_digest is not None and variant is not None
        self.assertEqual((by_digest.tag, variant.tag), (None, "3.19"))

    def test_keys_of_the_front_end(self) -> None:
        """
        The keys the registry front end makes read back as the request
        they were made for.
        """
        registries = {"docker.io": "http://127.0.0.1:1", "127.0.0.1:5001": "http://127.0.0.1:2"}
        digest = "sha256:" + "b" * 64
        for path, query in (
            ("/v2/alpine/manifests/3.19", ""),
            (f"/v2/library/alpine/manifests/{digest}", ""),
            (f"/v2/team/app/blobs/{digest}", "ns=127.0.0.1:5001"),
            ("/v2/127.0.0.1:5001/team/app/tags/list", "n=10&last=v1"),
            (f"/v2/a/referrers/{digest}", "artifactType=application/vnd.dev.cosign"),
            ("/v2/foo/tags/tags/list", ""),
            ("/v2/team/manifests/manifests/v1", "ns=127.0.0.1:5001"),
        ):
            request = parse_request(path, query, registries)
            for key in (request.key(), request.key(ACCEPT)):
                parsed = parse_key(key)
                assert parsed is not None, key
                # A blob belongs to no repository: one copy for all.
                name = "/" if request.endpoint.value == "blobs" else request.name
                self.assertEqual(
                    (parsed.image, parsed.section, parsed.ref),
                    (name, request.endpoint.value, request.reference),
                )

    def test_parse_image(self) -> None:
        cases = {
            "alpine": ImageName("docker.io", "library/alpine"),
            "alpine:3.19": ImageName("docker.io", "library/alpine", "3.19"),
            "docker.io/bitnami/redis": ImageName("docker.io", "bitnami/redis"),
            "index.docker.io/alpine": ImageName("docker.io", "library/alpine"),
            "127.0.0.1:5001/team/app:v1": ImageName("127.0.0.1:5001", "team/app", "v1"),
            "localhost/x@sha256:ab": ImageName("localhost", "x", None, "sha256:ab"),
            "ghcr.io/a/b/c": ImageName("ghcr.io", "a/b/c"),
        }
        self.assertEqual({text: parse_image(text) for text in cases}, cases)
        self.assertEqual(str(parse_image("alpine:3.19")), "docker.io/library/alpine:3.19")
        for bad in ("Alpine", "a:b:c", "", "x/", "x@sha256", "x:1@sha256:ab", "x:-y"):
            with self.assertRaises(ValueError, msg=bad):
                parse_image(bad)

    def test_kinds_and_matching(self) -> None:
        self.assertEqual(
            {entry_kind(key) for key in STORED if key.startswith(BLOBS)}, {"blob"}
        )
        self.assertEqual(entry_kind(f"{ALPINE}/manifests/3.19{ACCEPT}"), "manifest")
        self.assertEqual(entry_kind(f"{ALPINE}/tags/list"), "index")
        self.assertEqual(entry_kind("oci:r.test/not-a-key-shape"), "other")
        matches = key_matcher([], [], [parse_image("alpine:latest")])
        self.assertEqual({key for key in STORED if matches(key)}, {f"{ALPINE}/manifests/latest"})

    def test_stored_tags(self) -> None:
        self.assertEqual(
            [(repository.name, repository.tags) for repository in stored_tags(STORED)],
            [("127.0.0.1:5001/library/alpine", ("3.19",)),
             ("127.0.0.1:5001/team/app", ("v1",)),
             ("docker.io/library/alpine", ("3.19", "latest")),
             ("docker.io/library/alpine/extra", ("3.19",))],
        )

    def test_digest_mismatch(self) -> None:
        right = hashlib.sha256(LAYER).hexdigest()
        self.assertIsNone(digest_mismatch(f"{BLOBS}sha256:{right}", right))
        self.assertIsNone(digest_mismatch(f"{BLOBS}sha256:{right.upper()}", right))
        self.assertIsNone(digest_mismatch(f"{ALPINE}/manifests/latest", right))
        self.assertIsNone(digest_mismatch(f"{BLOBS}sha256:{right}", None))
        self.assertIsNone(digest_mismatch(f"{BLOBS}sha512:{'0' * 128}", right))
        self.assertIsNotNone(digest_mismatch(f"{BLOBS}sha256:{'0' * 64}", right))
        # A manifest by tag against the digest stored for its clients.
        tag = f"{ALPINE}/manifests/3.19{ACCEPT}"
        self.assertIsNone(digest_mismatch(tag, right, {}))
        self.assertIsNone(
            digest_mismatch(tag, right, {"docker-content-digest": f"sha256:{right}"})
        )
        self.assertEqual(
            digest_mismatch(tag, right, {"docker-content-digest": f"sha256:{'0' * 64}"}),
            f"sha256 {right} stored under its docker-content-digest sha256:{'0' * 64}",
        )
