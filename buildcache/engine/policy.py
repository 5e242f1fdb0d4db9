"""
What the engine asks of an ecosystem: the :class:`Policy` protocol, the
:class:`Target` a front end hands the engine with it, and the
:class:`Expectation` a policy may have of a body (its size, its digest, a
verifier).  :class:`GenericPolicy` is the plain RFC 9111 one the forward
proxy uses for URLs no ecosystem claims; an ecosystem's policy usually
extends it and overrides what it knows better.

An ecosystem knows its file names (which are immutable, which are indexes:
:class:`PathRule` tables) and how to check its files; the engine knows
HTTP.  The engine's RFC 9111 rules (a request's credentials, ``Vary``, a
response's ``no-store``/``private``) always win over a policy's kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from attrs import Factory, frozen

from buildcache.engine.freshness import Kind, client_cache_control
from buildcache.engine.keys import cache_key

if TYPE_CHECKING:
    from buildcache.engine.core import Engine
    from buildcache.fetch.fetcher import BodyVerifier
    from buildcache.store import Entry

__all__ = [
    "Target",
    "Expectation",
    "NO_EXPECTATION",
    "Policy",
    "GenericPolicy",
    "GENERIC",
    "PathRule",
    "rule",
    "kind_by_rules",
]


@frozen
class Target:
    """
    One client request as the engine serves it: the upstream URL, the
    store key of its anonymous entries, and the request headers, chosen by
    the front end.
    """

    #: The upstream URL fetched on a miss.
    url: str
    #: Who served it, for accounting and the bytes fetched: "proxy",
    #: "mirror", "index", "registry".
    front_end: str
    #: The client's request headers as the cache judges them (lowercase
    #: names): its ``Cache-Control``, conditionals, ``Range`` and
    #: credentials.  A front end leaves out what it ignores (the registry
    #: ignores ``Authorization``, a mirror route a ``Cookie``).
    headers: Mapping[str, str] = Factory(dict)
    #: The request headers sent upstream (lowercase names); the ``Vary``
    #: variant served is the one these select.
    upstream_headers: Mapping[str, str] = Factory(dict)
    #: The store key of the URL's anonymous entries; a client with
    #: credentials gets its own family under it (see
    #: :func:`buildcache.engine.keys.private_family`).
    key: str = Factory(lambda self: cache_key(self.url), takes_self=True)
    #: Whether redirects are followed upstream (the mirror routes and the
    #: index, not the forward proxy, whose client follows them itself).
    follow_redirects: bool = False
    #: Whether the operator's credentials for the origin go with it (see
    #: :attr:`buildcache.fetch.fetcher.UpstreamRequest.operator_credentials`).
    operator_credentials: bool = False
    #: Whether the URL's responses may vary (``Vary``): stored per variant,
    #: and a client whose headers select another variant does not join a
    #: download.  Off for requests always sent with the same headers.
    variants: bool = True

    def for_url(self, url: str) -> Target:
        """
        The same client request, for another URL (a file's index, say).
        Built directly, not with ``attrs.evolve``: it runs on every hit of
        a package, and evolve looks the fields up each time.
        """
        return Target(
            url, self.front_end, self.headers, self.upstream_headers,
            cache_key(url), self.follow_redirects, self.operator_credentials,
            self.variants,
        )


@frozen
class Expectation:
    """
    What a policy knows of a body before it arrives: a download with a
    size, a digest or a verifier is checked before it is stored (and, but
    for ``stream_before_check``, before any client sees it).
    """

    size: int | None = None
    #: Hex sha256 of the body (an index page's ``#sha256=``, an OCI digest).
    sha256: str | None = None
    #: Builds a checker from the response headers (checks 200s only).
    verify: Callable[[Mapping[str, str]], BodyVerifier] | None = None
    #: How the index that vouches for the body identifies it (recorded
    #: with it, see :attr:`buildcache.store.Entry.source_digest`).
    source_digest: str | None = None
    #: Stream all but the tail before the check passes (large files).
    stream_before_check: bool = False
    #: ``verify`` checks every byte of the body (an apk package: its
    #: size, its control stream's checksum, its data stream's hash), so a
    #: sha256 of the whole body would check nothing more: the store keeps
    #: none unless the shared tier names the body by it.
    verify_covers_body: bool = False
    #: False: a file its ecosystem would check but cannot (no index lists
    #: it): served, never stored.
    vouched: bool = True


#: A body nothing is known about.
NO_EXPECTATION = Expectation()


class Policy(Protocol):
    """
    An ecosystem's rules for its files, as the engine asks for them.  Every
    hook has a plain default in :class:`GenericPolicy`.
    """

    def kind(self, target: Target) -> Kind:
        """
        How ``target``'s file behaves over time, by the ecosystem's names.
        The engine makes a private request's kind HTTP whatever this says.
        """

    def ttl(self, kind: Kind, default: float) -> float:
        """
        How long an INDEX of this ecosystem stays fresh; ``default`` is the
        operator's ``--index-ttl``.
        """

    def storable(
        self, kind: Kind, status: int, response_headers: Mapping[str, str],
        request_headers: Mapping[str, str],
    ) -> bool:
        """
        The ecosystem's own rule for storing a response.  It only ever
        narrows the engine's: RFC 9111's (:func:`buildcache.engine.freshness.is_storable`:
        a complete 200, no ``no-store`` or ``private``, no ``Vary: *``, a
        credentialed request's response only when it says it may be shared)
        and the expectation's ``vouched`` always apply.
        """

    def cache_control(
        self, kind: Kind, ttl: float, response_headers: Mapping[str, str] | None,
        status: int,
    ) -> str | None:
        """
        The ``Cache-Control`` sent to clients with a response of ``status``.
        """

    def extra_headers(self, target: Target) -> Mapping[str, str]:
        """
        Headers added to every answer for ``target`` (``Vary: Accept`` on
        the index's pages, say).
        """

    def stale_on(self, status: int) -> bool:
        """
        Whether an upstream answer of ``status`` to a revalidation is a
        failure a stored copy is served stale for (5xx; a registry adds
        429, its rate limit).  The engine heeds a yes only for an error
        status other than 404 and 410 (see
        :func:`buildcache.engine.freshness.stale_status`): a success, a
        redirect, or an upstream saying the file is gone is never hidden
        behind a stored copy.
        """

    def head_validator(self, kind: Kind) -> str | None:
        """
        A response header naming the version of a file of ``kind`` (a
        registry's ``Docker-Content-Digest``): the engine then revalidates
        with a HEAD and compares it, instead of a conditional GET.  None
        for a conditional GET.
        """

    def head_fetches(self, kind: Kind) -> bool:
        """
        Whether a HEAD for a file of ``kind`` that misses fetches the whole
        body (a GET), stores it, and answers from the store, instead of
        asking the upstream with a HEAD.  A registry's manifests: clients
        HEAD a tag and then GET the manifest by digest, so a tag asked
        with a HEAD alone would never be stored, nor served stale later.
        """

    async def before_lookup(self, target: Target, engine: Engine) -> None:
        """
        Runs before the store is looked at: apk waits for an index still
        being stored, and drops the packages it now lists differently.
        """

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        """
        What the body fetched on a miss must be (its index entry, the
        digest a page or a manifest gave).
        """

    async def vouches_for(
        self, target: Target, engine: Engine, twin: Entry, expected: Expectation
    ) -> bool:
        """
        Whether ``twin``, the entry the ``http://`` twin of ``target``'s
        key holds in the client's own family (see
        :func:`buildcache.engine.keys.http_twin`), is the body ``expected``
        describes, as checked over https (a digest, an index entry).  The
        engine then takes it over under the client's key and serves it as
        a HIT instead of fetching (see :meth:`Engine.adopt`); a policy
        never chooses the key.
        """

    def answers(self, target: Target, entry: Entry) -> bool:
        """
        Whether the stored ``entry`` found for ``target`` may answer it
        (a pure check of what the policy already knows: no I/O).  An
        entry it rejects is no hit: :meth:`Engine.resolve` fetches as for
        a miss, and :meth:`Engine.fresh_hit` returns None.  FilePolicy
        compares the entry's sha256 with the page's; ApkPolicy its
        recorded source digest with the index entry held in memory.
        """

    async def recheck(
        self, target: Target, engine: Engine, expected: Expectation, error: Exception
    ) -> Expectation | None:
        """
        A body failed its check against ``expected``: a newer expectation
        to fetch it once more with (apk revalidates the index that listed
        it), or None to answer the failure.
        """


@frozen
class GenericPolicy:
    """
    The RFC 9111 policy: files have the kind their path rules give (HTTP
    without rules), nothing is expected of a body, every stored entry
    answers, no twin is vouched for.
    """

    rules: Sequence[PathRule] = ()

    def kind(self, target: Target) -> Kind:
        return kind_by_rules(self.rules, target.url) or Kind.HTTP

    def ttl(self, kind: Kind, default: float) -> float:
        return default

    def storable(
        self, kind: Kind, status: int, response_headers: Mapping[str, str],
        request_headers: Mapping[str, str],
    ) -> bool:
        return True

    def cache_control(
        self, kind: Kind, ttl: float, response_headers: Mapping[str, str] | None,
        status: int,
    ) -> str | None:
        return client_cache_control(kind, ttl, response_headers, status)

    def extra_headers(self, target: Target) -> Mapping[str, str]:
        return {}

    def stale_on(self, status: int) -> bool:
        return status >= 500

    def head_validator(self, kind: Kind) -> str | None:
        return None

    def head_fetches(self, kind: Kind) -> bool:
        return False

    async def before_lookup(self, target: Target, engine: Engine) -> None:
        return None

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        return NO_EXPECTATION

    async def vouches_for(
        self, target: Target, engine: Engine, twin: Entry, expected: Expectation
    ) -> bool:
        return False

    def answers(self, target: Target, entry: Entry) -> bool:
        return True

    async def recheck(
        self, target: Target, engine: Engine, expected: Expectation, error: Exception
    ) -> Expectation | None:
        return None


#: The generic policy: plain URLs on the forward proxy.
GENERIC = GenericPolicy()


@frozen
class PathRule:
    """
    One row of an ecosystem's table of file names: ``pattern`` is searched
    in the URL path (no scheme, host or query).
    """

    pattern: re.Pattern[str]
    kind: Kind


def rule(regex: str, kind: Kind) -> PathRule:
    return PathRule(re.compile(regex), kind)


def url_path(url: str) -> str:
    """
    The path of ``url``; a bare path may carry a query or fragment.
    """
    if "://" in url:
        return urlsplit(url).path
    return url.split("?", 1)[0].split("#", 1)[0]


def kind_by_rules(rules: Sequence[PathRule], url: str) -> Kind | None:
    """
    The kind the first row of ``rules`` matching ``url``'s path gives, or
    None when none matches.
    """
    path = url_path(url)
    for row in rules:
        if row.pattern.search(path):
            return row.kind
    return None
