"""
The registry's rules for the engine: which answers never change (blobs and
manifests by digest), which are indexes revalidated after ``--index-ttl``
(manifests by tag, tags lists, referrers), how bodies are checked against
their digests, and which stored manifest may answer which client
(``Accept`` negotiation across Docker v2 manifests, manifest lists, OCI
manifests and OCI indexes).

One policy object per request: it carries what the request's URL says (the
digest to check, the manifest types its client accepts).  The front end
(:mod:`.registry`) builds them with :func:`policy_for`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from attrs import Factory, field, frozen

from buildcache.ecosystems.oci.names import Endpoint, OciRequest, digest_algorithm
from buildcache.engine.errors import IntegrityError
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import NO_EXPECTATION, Expectation, GenericPolicy, Target

if TYPE_CHECKING:
    from buildcache.engine.core import Engine
    from buildcache.store import Entry

__all__ = [
    "API_VERSION_HEADER",
    "MANIFEST_TYPES",
    "ALL_MANIFEST_TYPES",
    "DigestVerifier",
    "OciPolicy",
    "accepted_types",
    "accept_suffix",
    "upstream_accept",
    "media_type",
    "policy_for",
]

#: Sent with every answer of the registry port.
API_VERSION_HEADER = ("docker-distribution-api-version", "registry/2.0")

#: Manifest media types -> the short names a store key's ``;accept=`` uses.
MANIFEST_TYPES: Mapping[str, str] = {
    "application/vnd.docker.distribution.manifest.v2+json": "docker-manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "docker-list",
    "application/vnd.oci.image.manifest.v1+json": "oci-manifest",
    "application/vnd.oci.image.index.v1+json": "oci-index",
}
ALL_MANIFEST_TYPES = frozenset(MANIFEST_TYPES)
_WILDCARDS = frozenset({"*/*", "application/*"})
#: Largest manifest taken (the distribution registry's own limit): a tag's
#: manifest may have no digest to be checked against.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Longest Accept header read (clients send a few types).
MAX_ACCEPT = 2048


def media_type(value: str | None) -> str:
    """A ``Content-Type`` value without its parameters, lowercase."""
    if not value:
        return ""
    return value.split(";", 1)[0].strip().lower()


def accepted_types(accept: str | None) -> frozenset[str]:
    """
    The manifest types a client's ``Accept`` takes (q=0 excludes one).
    No ``Accept`` (or a wildcard) takes every type; an ``Accept`` naming
    none of them takes none.
    """
    if accept is None or not accept.strip():
        return ALL_MANIFEST_TYPES
    taken: set[str] = set()
    for item in accept[:MAX_ACCEPT].split(","):
        name, *params = (part.strip() for part in item.split(";"))
        name = name.lower()
        refused = any(
            p.replace(" ", "").lower() in ("q=0", "q=0.0", "q=0.00", "q=0.000")
            for p in params
        )
        if refused:
            continue
        if name in _WILDCARDS:
            return ALL_MANIFEST_TYPES
        if name in MANIFEST_TYPES:
            taken.add(name)
    return frozenset(taken)


def accept_suffix(types: frozenset[str]) -> str:
    """
    The store key suffix of a manifest for a client taking ``types``:
    nothing for every type (docker, containerd, skopeo, podman), else
    ``;accept=<short names, sorted, joined by ,>``.
    """
    if types >= ALL_MANIFEST_TYPES:
        return ""
    return ";accept=" + ",".join(sorted(MANIFEST_TYPES[t] for t in types))


def upstream_accept(types: frozenset[str]) -> str:
    """The ``Accept`` sent upstream for ``types``: one fixed order per set."""
    return ", ".join(t for t in MANIFEST_TYPES if t in types)


@frozen
class DigestVerifier:
    """
    Checks a body against an OCI digest while it streams (a
    :class:`buildcache.fetch.fetcher.BodyVerifier`).  ``digest`` None or of
    an algorithm the cache cannot check: nothing to check.
    """

    digest: str | None
    #: Most bytes the body may have (a manifest's), or None.
    limit: int | None = None
    _hash: Any = field(
        init=False, default=Factory(lambda self: _hasher(self.digest), takes_self=True)
    )
    _received: list[int] = field(init=False, factory=lambda: [0])

    def update(self, data: bytes) -> None:
        if self.limit is not None:
            self._received[0] += len(data)
            if self._received[0] > self.limit:
                raise IntegrityError(
                    f"larger than {self.limit} bytes, the most a manifest may have"
                )
        if self._hash is not None:
            self._hash.update(data)

    def finish(self) -> None:
        if self._hash is None or self.digest is None:
            return
        received = self._hash.hexdigest()
        expected = self.digest.partition(":")[2]
        if received != expected:
            algorithm = self.digest.partition(":")[0]
            raise IntegrityError(
                f"expected {self.digest}, received {algorithm}:{received}"
            )


def _hasher(digest: str | None) -> Any:
    if digest is None:
        return None
    known = digest_algorithm(digest.strip())
    if known is None:
        return None
    return hashlib.new(known[0])


def verify_digest(
    digest: str | None, limit: int | None = None
) -> Callable[[Mapping[str, str]], DigestVerifier]:
    """
    A verifier factory checking every 200 body against ``digest`` (if
    any), and against ``limit`` bytes (if any).
    """
    return lambda headers: DigestVerifier(digest, limit)


def verify_upstream_digest(headers: Mapping[str, str]) -> DigestVerifier:
    """
    A manifest by tag: checked against the ``Docker-Content-Digest`` its
    upstream sends (nothing to check without one), and its size bounded.
    """
    return DigestVerifier(headers.get("docker-content-digest"), MAX_MANIFEST_SIZE)


@frozen
class OciPolicy(GenericPolicy):
    """
    The policy of one registry request (see the module docstring).

    :ivar endpoint: what is asked for.
    :ivar digest: the digest the body must have (blobs, manifests by
        digest), else None.
    :ivar accepted: the manifest types the client accepts (manifests).
    :ivar extra: headers added to the answer (the front end's, per request:
        a rewritten ``Link``, the digest).
    """

    endpoint: Endpoint = Endpoint.BLOB
    digest: str | None = None
    accepted: frozenset[str] = ALL_MANIFEST_TYPES
    extra: Mapping[str, str] = Factory(dict)

    def kind(self, target: Target) -> Kind:
        if self.endpoint in (Endpoint.BLOB, Endpoint.MANIFEST) and self.digest is not None:
            return Kind.IMMUTABLE
        return Kind.INDEX

    def stale_on(self, status: int) -> bool:
        # 429: a registry's pull limit (Docker Hub's); the copy it would
        # refuse is the one stored.
        return status >= 500 or status == 429

    def head_validator(self, kind: Kind) -> str | None:
        if self.endpoint is Endpoint.MANIFEST and kind is Kind.INDEX:
            # Docker Hub does not count a HEAD against its pull limit.
            return "docker-content-digest"
        return None

    def head_fetches(self, kind: Kind) -> bool:
        # Clients HEAD a tag, then GET its digest: without this a tag would
        # never be stored, nor served stale.
        return self.endpoint is Endpoint.MANIFEST

    def storable(
        self, kind: Kind, status: int, response_headers: Mapping[str, str],
        request_headers: Mapping[str, str],
    ) -> bool:
        if self.endpoint is Endpoint.MANIFEST:
            # Stored under this client's accept key: a type it does not
            # take would never answer it.
            return media_type(response_headers.get("content-type")) in self.accepted
        return True

    def extra_headers(self, target: Target) -> Mapping[str, str]:
        headers = {API_VERSION_HEADER[0]: API_VERSION_HEADER[1]}
        if self.endpoint is Endpoint.MANIFEST:
            # Which manifest answers depends on the client's Accept.
            headers["vary"] = "Accept"
        return {**headers, **self.extra}

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        if self.endpoint is Endpoint.MANIFEST and self.digest is None:
            return Expectation(verify=verify_upstream_digest)
        if self.digest is None:
            return NO_EXPECTATION
        known = digest_algorithm(self.digest)
        if known is None:
            # The front end refuses these before asking (DIGEST_INVALID).
            return NO_EXPECTATION
        algorithm, encoded = known
        if self.endpoint is Endpoint.BLOB:
            if algorithm == "sha256":
                return Expectation(sha256=encoded, stream_before_check=True)
            return Expectation(verify=verify_digest(self.digest), stream_before_check=True)
        if algorithm == "sha256":
            return Expectation(sha256=encoded, verify=verify_digest(None, MAX_MANIFEST_SIZE))
        return Expectation(verify=verify_digest(self.digest, MAX_MANIFEST_SIZE))

    def answers(self, target: Target, entry: Entry) -> bool:
        if self.endpoint is not Endpoint.MANIFEST:
            return True
        return media_type(entry.headers.get("content-type")) in self.accepted


def policy_for(request: OciRequest, accepted: frozenset[str]) -> OciPolicy:
    """The policy of ``request`` for a client taking ``accepted`` manifest types."""
    digest = request.reference if request.by_digest else None
    if request.endpoint is Endpoint.REFERRERS:
        digest = None
    return OciPolicy(endpoint=request.endpoint, digest=digest, accepted=accepted)
