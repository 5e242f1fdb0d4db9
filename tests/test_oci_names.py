"""
The registry port's pure parts: paths and names, upstream selection,
store keys, Accept negotiation, digests and the JSON errors.
"""

from __future__ import annotations

import hashlib
import json

from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import REGISTRY_ALIASES
from buildcache.ecosystems.oci.errors import OciErrors, code_for, error_body
from buildcache.ecosystems.oci.names import (
    Endpoint,
    NameRefused,
    Selection,
    parse_request,
)
from buildcache.ecosystems.oci.policy import (
    ALL_MANIFEST_TYPES,
    DigestVerifier,
    OciPolicy,
    accept_suffix,
    accepted_types,
    policy_for,
    upstream_accept,
)
from buildcache.engine.errors import IntegrityError
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import Target
from buildcache.store import Entry

REGISTRIES = {
    "docker.io": "http://127.0.0.1:1",
    "127.0.0.1:5001": "http://127.0.0.1:5001",
    "quay.io": "http://127.0.0.1:2",
    "localhost": "http://127.0.0.1:3",
}
SHA = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def parse(path: str, query: str = ""):  # type: ignore[no-untyped-def]
    return parse_request(path, query, REGISTRIES, REGISTRY_ALIASES)


class PathTests(SynchronousTestCase):
    def test_base(self) -> None:
        self.assertIs(parse("/v2/").endpoint, Endpoint.BASE)
        self.assertIs(parse("/v2").endpoint, Endpoint.BASE)

    def test_one_word_docker_hub_name_gets_library(self) -> None:
        oci = parse("/v2/alpine/manifests/3.20")
        self.assertEqual(
            (oci.endpoint, oci.registry, oci.repository, oci.reference, oci.selection),
            (Endpoint.MANIFEST, "docker.io", "library/alpine", "3.20", Selection.DEFAULT),
        )
        self.assertEqual(oci.name, "docker.io/library/alpine")
        self.assertEqual(
            oci.upstream_url("http://up:1/"), "http://up:1/v2/library/alpine/manifests/3.20"
        )
        # The same key with or without library/.
        self.assertEqual(oci.key(), parse("/v2/library/alpine/manifests/3.20").key())
        self.assertEqual(oci.key(), "oci:docker.io/library/alpine/manifests/3.20")

    def test_ns_selects_registry(self) -> None:
        oci = parse("/v2/team/app/blobs/" + SHA, "ns=127.0.0.1%3A5001")
        self.assertEqual(
            (oci.endpoint, oci.registry, oci.repository, oci.selection),
            (Endpoint.BLOB, "127.0.0.1:5001", "team/app", Selection.NS),
        )
        self.assertEqual(oci.key(), f"oci:blobs/{SHA}")
        self.assertEqual(
            oci.upstream_url("http://127.0.0.1:5001"),
            f"http://127.0.0.1:5001/v2/team/app/blobs/{SHA}",
        )

    def test_docker_hub_aliases(self) -> None:
        for alias in (*REGISTRY_ALIASES, "docker.io", "Docker.IO"):
            oci = parse("/v2/alpine/manifests/latest", f"ns={alias}")
            self.assertEqual(oci.name, "docker.io/library/alpine")
        prefixed = parse("/v2/index.docker.io/alpine/manifests/latest")
        self.assertEqual(prefixed.name, "docker.io/library/alpine")
        self.assertIs(prefixed.selection, Selection.PREFIX)

    def test_path_prefix_selects_registry(self) -> None:
        oci = parse("/v2/quay.io/team/app/manifests/v1")
        self.assertEqual((oci.registry, oci.repository), ("quay.io", "team/app"))
        self.assertEqual(parse("/v2/localhost/app/tags/list").registry, "localhost")
        ported = parse("/v2/127.0.0.1:5001/app/manifests/v1")
        self.assertEqual(ported.name, "127.0.0.1:5001/app")

    def test_docker_hub_namespace_is_not_a_registry(self) -> None:
        oci = parse("/v2/team/app/manifests/v1")
        self.assertEqual(oci.name, "docker.io/team/app")

    def test_unknown_registry_refused(self) -> None:
        for path, query in [
            ("/v2/team/app/manifests/v1", "ns=ghcr.io"),
            ("/v2/ghcr.io/team/app/manifests/v1", ""),
            ("/v2/example.com:5000/app/blobs/" + SHA, ""),
        ]:
            with self.assertRaises(NameRefused) as caught:
                parse(path, query)
            self.assertEqual((caught.exception.status, caught.exception.code), (404, "NAME_UNKNOWN"))
            self.assertIn("not configured", caught.exception.message)

    def test_no_docker_hub_configured(self) -> None:
        with self.assertRaises(NameRefused) as caught:
            parse_request("/v2/alpine/manifests/latest", "", {"quay.io": "http://x"})
        self.assertEqual(caught.exception.code, "NAME_UNKNOWN")

    def test_invalid_names(self) -> None:
        for path in [
            "/v2/Team/app/manifests/v1",
            "/v2/team//app/manifests/v1",
            "/v2/team/app-/manifests/v1",
            "/v2/" + "a" * 300 + "/manifests/v1",
        ]:
            with self.assertRaises(NameRefused) as caught:
                parse(path)
            self.assertEqual(caught.exception.code, "NAME_INVALID", path)

    def test_invalid_tags_and_digests(self) -> None:
        with self.assertRaises(NameRefused):
            parse("/v2/app/manifests/-bad")
        with self.assertRaises(NameRefused):
            parse("/v2/app/manifests/" + "t" * 129)
        with self.assertRaises(NameRefused) as caught:
            parse("/v2/app/blobs/latest")
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "DIGEST_INVALID"))

    def test_unknown_digest_algorithm_refused(self) -> None:
        for ref in ["md5:" + "a" * 32, "sha256:" + "A" * 64, "sha256:abc"]:
            with self.assertRaises(NameRefused) as caught:
                parse("/v2/app/blobs/" + ref)
            self.assertEqual(
                (caught.exception.status, caught.exception.code), (400, "DIGEST_INVALID")
            )
        self.assertEqual(parse("/v2/app/blobs/" + SHA512).reference, SHA512)

    def test_not_an_endpoint(self) -> None:
        with self.assertRaises(NameRefused) as caught:
            parse("/v2/app/uploads/")
        self.assertEqual(caught.exception.status, 404)
        with self.assertRaises(NameRefused):
            parse("/")

    def test_tags_and_referrers_keys_keep_their_query(self) -> None:
        tags = parse("/v2/app/tags/list", "n=2&last=b&ns=docker.io&x=y")
        self.assertEqual(tags.query, "last=b&n=2")
        self.assertEqual(tags.key(), "oci:docker.io/library/app/tags/list?last=b&n=2")
        self.assertEqual(
            tags.upstream_url("http://u"), "http://u/v2/library/app/tags/list?last=b&n=2"
        )
        refs = parse(f"/v2/app/referrers/{SHA}", "artifactType=application%2Fx")
        self.assertEqual(
            refs.key(), f"oci:docker.io/library/app/referrers/{SHA}?artifactType=application%2Fx"
        )

    def test_query_bounded(self) -> None:
        with self.assertRaises(NameRefused):
            parse("/v2/app/tags/list", "n=" + "1" * 600)


class LinkTests(SynchronousTestCase):
    LINK = '</v2/library/app/tags/list?last=b&n=2>; rel="next"'

    def test_default_selection(self) -> None:
        oci = parse("/v2/app/tags/list", "n=2")
        self.assertEqual(
            oci.link_back(self.LINK), '</v2/app/tags/list?last=b&n=2>; rel="next"'
        )

    def test_ns_selection_keeps_ns(self) -> None:
        oci = parse("/v2/app/tags/list", "n=2&ns=docker.io")
        self.assertEqual(
            oci.link_back(self.LINK),
            '</v2/app/tags/list?last=b&n=2&ns=docker.io>; rel="next"',
        )

    def test_prefix_selection_keeps_prefix(self) -> None:
        oci = parse("/v2/quay.io/team/app/tags/list")
        self.assertEqual(
            oci.link_back('<https://quay.example/v2/team/app/tags/list?n=1&last=a>; rel="next"'),
            '</v2/quay.io/team/app/tags/list?n=1&last=a>; rel="next"',
        )

    def test_upstream_under_a_path_prefix(self) -> None:
        oci = parse("/v2/quay.io/team/app/tags/list")
        self.assertEqual(
            oci.link_back('</mirror/v2/team/app/tags/list?n=1&last=a>; rel="next"'),
            '</v2/quay.io/team/app/tags/list?n=1&last=a>; rel="next"',
        )

    def test_other_link_not_rewritten(self) -> None:
        oci = parse("/v2/app/tags/list")
        self.assertIsNone(oci.link_back('</v2/other/tags/list?n=1>; rel="next"'))
        self.assertIsNone(oci.link_back("garbage"))


class AcceptTests(SynchronousTestCase):
    def test_absent_or_wildcard_takes_all(self) -> None:
        self.assertEqual(accepted_types(None), ALL_MANIFEST_TYPES)
        self.assertEqual(accepted_types("*/*"), ALL_MANIFEST_TYPES)
        self.assertEqual(accept_suffix(ALL_MANIFEST_TYPES), "")

    def test_subset_gets_a_key_suffix(self) -> None:
        taken = accepted_types(f"{OCI_INDEX}, {DOCKER};q=0.5, text/html")
        self.assertEqual(taken, frozenset({OCI_INDEX, DOCKER}))
        self.assertEqual(accept_suffix(taken), ";accept=docker-manifest,oci-index")
        self.assertEqual(upstream_accept(taken), f"{DOCKER}, {OCI_INDEX}")

    def test_q_zero_excludes(self) -> None:
        self.assertEqual(accepted_types(f"{OCI};q=0, {DOCKER}"), frozenset({DOCKER}))

    def test_none_known(self) -> None:
        self.assertEqual(accepted_types("application/json"), frozenset())

    def test_answers_only_accepted_types(self) -> None:
        policy = OciPolicy(endpoint=Endpoint.MANIFEST, accepted=frozenset({DOCKER}))
        target = Target("http://u/v2/x/manifests/t", "registry")

        def entry(content_type: str) -> Entry:
            return Entry("k", 1, {"content-type": content_type}, None, 0.0, 0.0, 0.0)

        self.assertTrue(policy.answers(target, entry(DOCKER)))
        self.assertFalse(policy.answers(target, entry(OCI)))
        self.assertTrue(policy.storable(Kind.INDEX, 200, {"content-type": DOCKER}, {}))
        self.assertFalse(policy.storable(Kind.INDEX, 200, {"content-type": OCI}, {}))


class PolicyTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        target = Target("http://u/", "registry")
        self.assertIs(policy_for(parse(f"/v2/a/blobs/{SHA}"), ALL_MANIFEST_TYPES).kind(target), Kind.IMMUTABLE)
        self.assertIs(policy_for(parse(f"/v2/a/manifests/{SHA}"), ALL_MANIFEST_TYPES).kind(target), Kind.IMMUTABLE)
        tag = policy_for(parse("/v2/a/manifests/t"), ALL_MANIFEST_TYPES)
        self.assertIs(tag.kind(target), Kind.INDEX)
        self.assertEqual(tag.head_validator(Kind.INDEX), "docker-content-digest")
        self.assertTrue(tag.head_fetches(Kind.INDEX))
        tags = policy_for(parse("/v2/a/tags/list"), ALL_MANIFEST_TYPES)
        self.assertIs(tags.kind(target), Kind.INDEX)
        self.assertIsNone(tags.head_validator(Kind.INDEX))
        refs = policy_for(parse(f"/v2/a/referrers/{SHA}"), ALL_MANIFEST_TYPES)
        self.assertIs(refs.kind(target), Kind.INDEX)
        blob = policy_for(parse(f"/v2/a/blobs/{SHA}"), ALL_MANIFEST_TYPES)
        self.assertFalse(blob.head_fetches(Kind.IMMUTABLE))

    def test_stale_on(self) -> None:
        policy = OciPolicy()
        self.assertEqual(
            [s for s in (200, 401, 404, 429, 500, 503) if policy.stale_on(s)], [429, 500, 503]
        )

    def test_expectations(self) -> None:
        target = Target("http://u/", "registry")
        blob = self.successResultOf(
            _run(policy_for(parse(f"/v2/a/blobs/{SHA}"), ALL_MANIFEST_TYPES).expect(target, None))  # type: ignore[arg-type]
        )
        self.assertEqual((blob.sha256, blob.stream_before_check), ("a" * 64, True))
        manifest = self.successResultOf(
            _run(policy_for(parse(f"/v2/a/manifests/{SHA}"), ALL_MANIFEST_TYPES).expect(target, None))  # type: ignore[arg-type]
        )
        self.assertEqual((manifest.sha256, manifest.stream_before_check), ("a" * 64, False))
        long = self.successResultOf(
            _run(policy_for(parse(f"/v2/a/blobs/{SHA512}"), ALL_MANIFEST_TYPES).expect(target, None))  # type: ignore[arg-type]
        )
        self.assertIsNone(long.sha256)
        self.assertIsNotNone(long.verify)

    def test_digest_verifier(self) -> None:
        data = b"manifest"
        good = DigestVerifier("sha512:" + hashlib.sha512(data).hexdigest())
        good.update(data)
        good.finish()
        bad = DigestVerifier("sha256:" + hashlib.sha256(b"other").hexdigest())
        bad.update(data)
        self.assertRaises(IntegrityError, bad.finish)
        # Nothing to check without a digest, or with one it cannot check.
        DigestVerifier(None).finish()
        DigestVerifier("md5:abc").finish()


class ErrorTests(SynchronousTestCase):
    def test_json_form(self) -> None:
        content_type, body = OciErrors(not_found="MANIFEST_UNKNOWN")(404, "no such tag")
        self.assertTrue(content_type.startswith("application/json"))
        self.assertEqual(
            json.loads(body),
            {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such tag", "detail": {}}]},
        )

    def test_codes_by_status(self) -> None:
        self.assertEqual(
            [code_for(s, "BLOB_UNKNOWN") for s in (401, 403, 404, 405, 429, 500, 502, 504)],
            ["UNAUTHORIZED", "DENIED", "BLOB_UNKNOWN", "UNSUPPORTED", "TOOMANYREQUESTS",
             "UNKNOWN", "UNAVAILABLE", "UNAVAILABLE"],
        )

    def test_fixed_code(self) -> None:
        _, body = OciErrors(code="DIGEST_INVALID")(400, "x")
        self.assertEqual(json.loads(body)["errors"][0]["code"], "DIGEST_INVALID")

    def test_message_bounded(self) -> None:
        self.assertLess(len(error_body("UNKNOWN", "x" * 10000)), 600)


def _run(coroutine):  # type: ignore[no-untyped-def]
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)
