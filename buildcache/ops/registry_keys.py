"""
The registry front end's store keys and image names, for people: which
repository and tag a key belongs to (the status page's stored images,
``buildcache stats``), and which keys an image reference given to
``buildcache purge --image`` names.

The keys are those the registry front end makes
(:meth:`buildcache.ecosystems.oci.names.OciRequest.key`,
``oci:<registry>/<repository>/...``):

- ``manifests/<tag or digest>``, and ``manifests/<ref>;accept=<names>``
  for a client that accepts fewer manifest types;
- ``tags/list[?<query>]`` and ``referrers/<digest>[?<query>]``.

and a blob, whatever repository or registry it was asked from, is
``oci:blobs/<digest>``: one copy of a layer that many images share.

``<registry>`` is the configured name (``docker.io``, ``127.0.0.1:5001``)
and ``<repository>`` has ``library/`` for one-word Docker Hub names.  A
repository may have any number of path components, some named like a
section (``team/manifests``): keys are read from their end, where only
the last section's own segments are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from attrs import frozen

from buildcache.config import REGISTRY_ALIASES
from buildcache.ecosystems.oci.names import (
    DOCKER_HUB,
    KEY_PREFIX,
    canonical_registry,
    is_valid_digest,
    is_valid_repository,
    is_valid_tag,
    looks_like_registry,
)

__all__ = [
    "BLOB",
    "KEY_PREFIX",
    "MANIFEST",
    "ImageName",
    "RegistryKey",
    "StoredRepository",
    "digest_mismatch",
    "is_digest",
    "parse_image",
    "parse_key",
    "stored_tags",
]

#: The namespace of one-word names on Docker Hub.
OFFICIAL_NAMESPACE = "library/"
#: Kinds of registry keys in ``buildcache stats`` (with ``index`` for tag
#: lists and referrers, shared with the other ecosystems' indexes).
MANIFEST = "manifest"
BLOB = "blob"

# The repository is the shortest that leaves a whole section at the end
# (a query, after "?", may hold slashes of its own).
_BLOB_KEY = re.compile(re.escape(KEY_PREFIX) + r"blobs/(?P<ref>[^/?;#]+)")
_KEY = re.compile(
    re.escape(KEY_PREFIX) + r"(?P<registry>[^/]+)/(?P<repository>[^?;]+?)/"
    r"(?:(?P<section>manifests|referrers)/(?P<ref>[^/?;]+)"
    r"(?:;accept=(?P<accept>[^/?]*))?|(?P<tags>tags)/list)"
    r"(?:\?(?P<query>.*))?",
    re.DOTALL,
)


@frozen
class RegistryKey:
    """
    What one registry key names.
    """

    #: Empty for a blob (shared by every repository).
    registry: str
    repository: str
    #: ``blobs``, ``manifests``, ``tags`` (the tag list) or ``referrers``.
    section: str
    #: The digest or tag; None for a tag list.
    ref: str | None

    @property
    def image(self) -> str:
        """
        ``<registry>/<repository>``, as the exchanges name it.
        """
        return f"{self.registry}/{self.repository}"

    @property
    def tag(self) -> str | None:
        """
        The tag of a manifest stored by tag, else None.
        """
        if self.section != "manifests" or self.ref is None or is_digest(self.ref):
            return None
        return self.ref

    @property
    def kind(self) -> str:
        """
        Its kind for ``buildcache stats``: :data:`BLOB`, :data:`MANIFEST`,
        or ``index`` for the lists (tags, referrers).
        """
        if self.section == "blobs":
            return BLOB
        if self.section == "manifests":
            return MANIFEST
        return "index"


def is_digest(ref: str) -> bool:
    """
    Whether a manifest reference is a digest (``sha256:...``), not a tag.
    """
    return ":" in ref


def parse_key(key: str) -> RegistryKey | None:
    """
    What the registry key ``key`` names, or None for any other key (or a
    registry key of a shape this buildcache does not write).
    """
    if not key.startswith(KEY_PREFIX):
        return None
    # Without the marks of a private entry or a variant (``#p=``, ``#v=``),
    # should the engine ever add them: the rest names the same thing.
    plain = key.partition("#")[0]
    blob = _BLOB_KEY.fullmatch(plain)
    if blob is not None:
        # Shared by every repository: it belongs to none.
        return RegistryKey("", "", "blobs", blob["ref"])
    found = _KEY.fullmatch(plain)
    if found is None:
        return None
    if found["tags"]:
        return RegistryKey(found["registry"], found["repository"], "tags", None)
    return RegistryKey(
        found["registry"], found["repository"], found["section"], found["ref"]
    )


#: The header a registry names a manifest's digest in, stored with it.
DIGEST_HEADER = "docker-content-digest"


def digest_mismatch(
    key: str, sha256: str | None, headers: Mapping[str, str] | None = None
) -> str | None:
    """
    Why a body of sha256 ``sha256`` is not what the registry key ``key``
    names: a blob or manifest by ``sha256:`` digest, or a manifest by tag
    stored with a ``Docker-Content-Digest`` (in ``headers``) that clients
    are told; None when it is, or when there is nothing to compare.
    """
    parsed = parse_key(key)
    if parsed is None or sha256 is None or parsed.section not in ("blobs", "manifests"):
        return None
    if parsed.tag is not None:
        digest = (headers or {}).get(DIGEST_HEADER)
        where = f"its {DIGEST_HEADER} {digest}"
    else:
        digest = parsed.ref
        where = f"the digest {digest}"
    if digest is None:
        return None
    algorithm, _, expected = digest.strip().partition(":")
    if algorithm != "sha256" or expected.lower() == sha256.lower():
        return None
    return f"sha256 {sha256} stored under {where}"


@frozen
class ImageName:
    """
    An image reference given on the command line: a repository, or one
    tag or manifest digest of it.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        ref = f":{self.tag}" if self.tag else f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{ref}"

    def names(self, key: RegistryKey) -> bool:
        """
        Whether ``key`` belongs to what this reference names: every key of
        the repository (manifests, tag lists, referrers), or, with a tag
        or digest, the manifests stored under it (every ``;accept=``
        variant).  Blobs belong to no repository (one copy serves every
        image that has the layer): the LRU removes them.
        """
        if (key.registry, key.repository) != (self.registry, self.repository):
            return False
        ref = self.tag or self.digest
        return ref is None or (key.section == "manifests" and key.ref == ref)


def parse_image(text: str) -> ImageName:
    """
    ``[REGISTRY/]REPOSITORY[:TAG|@DIGEST]`` as docker reads it, with the
    registry port's grammar (:mod:`buildcache.ecosystems.oci.names`): the
    first component is the registry when it has a ``.`` or a ``:`` or is
    ``localhost``, else the image is on ``docker.io``, where one-word names
    get ``library/`` (and ``index.docker.io`` is ``docker.io``).

    Raises ValueError, saying why, for anything else.
    """
    rest, at, digest = text.partition("@")
    if at and not is_valid_digest(digest):
        raise ValueError(f"{digest!r} is not a digest (sha256:...)")
    first, slash, path = rest.partition("/")
    if slash and looks_like_registry(first):
        registry = canonical_registry(first, REGISTRY_ALIASES)
    else:
        registry, path = DOCKER_HUB, rest
    repository, colon, tag = path.rpartition(":")
    if not colon:
        repository, tag = path, ""
    if colon and not is_valid_tag(tag):
        raise ValueError(f"{tag!r} is not a tag")
    if not is_valid_repository(repository):
        raise ValueError(
            f"{repository!r} is not a repository name (lower-case components"
            " separated by /)"
        )
    if colon and digest:
        raise ValueError("give a tag or a digest, not both")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = OFFICIAL_NAMESPACE + repository
    return ImageName(registry, repository, tag or None, digest or None)


@frozen
class StoredRepository:
    """
    One repository whose tags are stored.
    """

    #: ``<registry>/<repository>``.
    name: str
    #: Its tags stored, in order.
    tags: tuple[str, ...]


def stored_tags(keys: Iterable[str]) -> list[StoredRepository]:
    """
    The repositories and their tags that ``keys`` store manifests of, in
    name order (a tag stored only for some clients' ``Accept`` counts
    once); other keys are passed over.
    """
    tags: dict[str, set[str]] = {}
    for key in keys:
        parsed = parse_key(key)
        if parsed is not None and parsed.tag is not None:
            tags.setdefault(parsed.image, set()).add(parsed.tag)
    return [StoredRepository(name, tuple(sorted(tags[name]))) for name in sorted(tags)]
