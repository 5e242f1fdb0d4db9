"""
The registry port (``--registry-port``): the pull side of the OCI
distribution API, a thin front end on the cache engine::

    GET      /v2/                                200 {} (the API check)
    GET|HEAD /v2/<name>/manifests/<tag|digest>   manifests, Accept-negotiated
    GET|HEAD /v2/<name>/blobs/<digest>           blobs (Range: 206)
    GET      /v2/<name>/tags/list                tags, fresh for --index-ttl
    GET      /v2/<name>/referrers/<digest>       OCI 1.1 referrers

It parses the path and picks the upstream (:mod:`.names`), builds a
:class:`~buildcache.engine.policy.Target` with the store key of
OCI_API.md and the request's :class:`~.policy.OciPolicy`, and lets the
engine resolve it.  Every answer carries ``Docker-Distribution-API-Version``;
errors are the spec's JSON (:mod:`.errors`), the engine's included.

What a client sends that would split the cache per user is ignored: its
``Authorization`` (and cookies) never reach the engine nor the upstream;
the operator's ``--registry-auth`` speaks for every allowed client.  An
upstream's own 401 becomes this port's 401 UNAUTHORIZED without the
upstream's challenge (a client could not answer it: its token would not be
sent on).  Any push method is answered 405 UNSUPPORTED.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.access import AccessPolicy
from buildcache.ecosystems.oci.errors import (
    BLOB_UNKNOWN,
    CONTENT_TYPE,
    DENIED,
    MANIFEST_UNKNOWN,
    NAME_UNKNOWN,
    UNSUPPORTED,
    OciErrors,
)
from buildcache.ecosystems.oci.names import (
    Endpoint,
    NameRefused,
    OciRequest,
    parse_request,
)
from buildcache.ecosystems.oci.policy import (
    ALL_MANIFEST_TYPES,
    API_VERSION_HEADER,
    accept_suffix,
    accepted_types,
    media_type,
    policy_for,
    upstream_accept,
)
from buildcache.engine.core import Engine, Resolved
from buildcache.engine.exchanges import client_gone
from buildcache.engine.policy import Target
from buildcache.engine.respond import request_headers

__all__ = ["RegistryResource", "FRONT_END"]

#: The front end's name in accounting and on Target.front_end.
FRONT_END = "registry"

#: The request headers the engine judges (freshness requests,
#: conditionals, ranges): nothing else, so a client's ``Authorization`` or
#: cookies never split the cache per user nor go upstream.
_JUDGED = frozenset({
    "cache-control", "pragma", "if-none-match", "if-modified-since",
    "if-match", "if-unmodified-since", "range", "if-range",
})

_NOT_FOUND = {
    Endpoint.MANIFEST: MANIFEST_UNKNOWN,
    Endpoint.BLOB: BLOB_UNKNOWN,
}

#: What a referrers list and a tags list are asked for upstream.
_REFERRERS_ACCEPT = "application/vnd.oci.image.index.v1+json"
_TAGS_ACCEPT = "application/json"


class RegistryResource(Resource):
    """
    The registry port; see the module docstring.

    :param registries: configured NAME -> base URL (``docker.io`` ->
        ``https://...``).
    :param aliases: other names of some (``index.docker.io`` ->
        ``docker.io``).
    :param policy: with it, clients outside its ``allow_from`` get 403.
    :param credentialed: the NAMEs given credentials (``--registry-auth``),
        for what a refusal tells the client.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        engine: Engine,
        registries: Mapping[str, str],
        policy: AccessPolicy | None = None,
        aliases: Mapping[str, str] = {},
        credentialed: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.credentialed = credentialed
        self.engine = engine
        self.registries = dict(registries)
        self.aliases = dict(aliases)
        self.policy = policy

    def render(self, request: Request) -> object:
        request.setHeader(*API_VERSION_HEADER)
        if not self._client_allowed(request):
            return NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            self.engine.begin(request, FRONT_END, errors=OciErrors(code=UNSUPPORTED))
            request.setHeader("allow", "GET, HEAD")
            self.engine.refuse(
                request, 405,
                f"{request.method.decode('latin-1')[:20]} is not supported: this"
                " cache serves the pull side of the registry API only",
            )
            return NOT_DONE_YET
        path = request.path.decode("latin-1")
        query = urlsplit(request.uri.decode("latin-1")).query
        try:
            oci = parse_request(path, query, self.registries, self.aliases)
        except NameRefused as refused:
            self.engine.begin(request, FRONT_END, errors=OciErrors(code=refused.code))
            self.engine.refuse(request, refused.status, refused.message)
            return NOT_DONE_YET
        if oci.endpoint is Endpoint.BASE:
            self.engine.begin(request, FRONT_END, errors=OciErrors())
            self._base(request)
            return NOT_DONE_YET
        self.engine.begin(
            request, FRONT_END, oci.name,
            errors=OciErrors(not_found=_NOT_FOUND.get(oci.endpoint, NAME_UNKNOWN)),
        )
        d = Deferred.fromCoroutine(self._serve(request, oci))
        d.addErrback(self.engine.crashed, request)
        return NOT_DONE_YET

    def _client_allowed(self, request: Request) -> bool:
        if self.policy is None:
            return True
        client_ip = getattr(request.getClientAddress(), "host", "")
        verdict = self.policy.client_allowed(client_ip)
        if verdict:
            return True
        self.log.warn(
            "Refused client {client}: {reason}", client=client_ip, reason=verdict.reason
        )
        self.engine.begin(request, FRONT_END, errors=OciErrors(code=DENIED))
        self.engine.refuse(
            request, 403, f"client {client_ip} is not allowed to use this registry"
        )
        return False

    def _base(self, request: Request) -> None:
        """``/v2/``: the API check clients make first (no auth needed here)."""
        body = b"{}"
        request.setResponseCode(200)
        request.setHeader("content-type", CONTENT_TYPE)
        request.setHeader("content-length", str(len(body)))
        request.setHeader("cache-control", "no-store")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    async def _serve(self, request: Request, oci: OciRequest) -> None:
        headers = request_headers(request)
        judged = {k: v for k, v in headers.items() if k in _JUDGED}
        upstream_headers: dict[str, str] = {}
        accepted = accepted_types(None)
        suffix = ""
        if oci.endpoint is Endpoint.MANIFEST:
            accepted = accepted_types(headers.get("accept"))
            if not accepted:
                request.setHeader("vary", "Accept")
                self.engine.refuse(
                    request, 404,
                    "the client accepts none of the manifest types this cache"
                    " serves (Docker v2 manifests and lists, OCI manifests and"
                    " indexes)",
                )
                return
            suffix = accept_suffix(accepted)
            upstream_headers["accept"] = upstream_accept(accepted)
        elif oci.endpoint is Endpoint.REFERRERS:
            upstream_headers["accept"] = _REFERRERS_ACCEPT
        elif oci.endpoint is Endpoint.TAGS:
            upstream_headers["accept"] = _TAGS_ACCEPT
        target = Target(
            oci.upstream_url(self.registries[oci.registry]),
            FRONT_END,
            judged,
            upstream_headers,
            key=oci.key(suffix),
            follow_redirects=True,
            # The registry's tokens (--registry-auth) go with the
            # operator's requests only, never a forward-proxy client's.
            operator_credentials=True,
            variants=False,
        )
        own = (target, policy_for(oci, accepted))
        tries = [own]
        if suffix:
            shared = self._shared_copy(target, oci, accepted)
            if shared is not None:
                # Stored and revalidated as the copy for every type is; this
                # client gets it only while its type is one it takes, else
                # its own key is asked.
                tries.insert(0, (shared, policy_for(oci, ALL_MANIFEST_TYPES)))
        for target, policy in tries:
            resolved = await self.engine.resolve_for(request, target, policy)
            if resolved is None:
                return
            answer = resolved.answer
            if answer is not None and answer.status != 200:
                resolved.close()
                self._upstream_failed(request, oci, answer.status, answer.headers)
                return
            sent = _type_of(resolved)
            if oci.endpoint is not Endpoint.MANIFEST or sent in accepted:
                break
            resolved.close()
        else:
            # An upstream that ignored Accept: an OCI index must never reach
            # a client that takes Docker v2 manifests only (nor is it stored).
            request.setHeader("vary", "Accept")
            self.engine.refuse(
                request, 404,
                f"{_described(oci)}: {oci.registry} has it only as"
                f" {sent or 'no type'}, which this client does not accept",
            )
            return
        if client_gone(request):
            resolved.close()
            return
        extra = self._extra_headers(oci, resolved)
        if extra:
            policy = evolve(policy, extra=extra)
        self.engine.respond(request, target, policy, resolved)

    def _shared_copy(
        self, target: Target, oci: OciRequest, accepted: frozenset[str]
    ) -> Target | None:
        """
        ``target`` for a client that takes fewer manifest types than all,
        moved to the copy stored for clients that take every type, when
        that copy is of a type this client takes: one copy, one
        revalidation, served stale to both when the upstream fails.  None
        when no such copy is stored.
        """
        shared = evolve(
            target, key=oci.key(""),
            upstream_headers={"accept": upstream_accept(ALL_MANIFEST_TYPES)},
        )
        entry = self.engine.find(shared)
        if entry is not None and media_type(entry.headers.get("content-type")) in accepted:
            return shared
        return None

    def _extra_headers(self, oci: OciRequest, resolved: Resolved) -> dict[str, str]:
        """
        What the answer adds to the upstream's headers: its ``Link`` made
        to point back here, the digest when the upstream did not say it.
        """
        if resolved.stored is not None:
            stored_headers = resolved.stored.entry.headers
            sha256 = resolved.stored.entry.sha256
        else:
            assert resolved.answer is not None
            stored_headers = resolved.answer.headers
            # A checked manifest has arrived whole before it is answered.
            body = resolved.answer.body
            sha256 = body.download.sha256 if body is not None else None
        extra: dict[str, str] = {}
        link = stored_headers.get("link")
        if link is not None:
            local = oci.link_back(link)
            if local is not None:
                extra["link"] = local
        if (
            oci.endpoint in (Endpoint.MANIFEST, Endpoint.BLOB)
            and "docker-content-digest" not in stored_headers
        ):
            if oci.by_digest and oci.reference is not None:
                extra["docker-content-digest"] = oci.reference
            elif sha256 is not None:
                extra["docker-content-digest"] = f"sha256:{sha256}"
        return extra

    def _upstream_failed(
        self, request: Request, oci: OciRequest, status: int, headers: Mapping[str, str]
    ) -> None:
        """
        The upstream's error answer, nothing stored to serve instead, in
        this port's terms.
        """
        what = _described(oci)
        if status in (404, 410):
            self.engine.refuse(request, 404, f"{what}: unknown to {oci.registry}")
        elif status in (401, 403):
            if oci.registry in self.credentialed:
                advice = (
                    f"the credentials of --registry-auth {oci.registry}=FILE do not"
                    " reach it (wrong, or without access to this repository)"
                )
            else:
                advice = (
                    "the cache's operator can give credentials with"
                    f" --registry-auth {oci.registry}=FILE"
                )
            self.engine.refuse(
                request, 401,
                f"{oci.registry} refused access to {oci.name} (upstream {status}); {advice}",
            )
        elif status == 429:
            retry_after = headers.get("retry-after")
            if retry_after is not None and retry_after.strip().isdigit():
                request.setHeader("retry-after", retry_after.strip())
            self.engine.refuse(
                request, 429,
                f"{oci.registry} is rate-limiting this cache (upstream 429), and"
                f" it has no copy of {what}",
            )
        else:
            self.engine.refuse(
                request, 502, f"{oci.registry} answered {status} for {what}"
            )



def _type_of(resolved: Resolved) -> str:
    """The media type of what ``resolved`` would send."""
    if resolved.stored is not None:
        return media_type(resolved.stored.entry.headers.get("content-type"))
    assert resolved.answer is not None
    return media_type(resolved.answer.headers.get("content-type"))


_NOUNS = {
    Endpoint.MANIFEST: "manifest",
    Endpoint.BLOB: "blob",
    Endpoint.REFERRERS: "referrers of",
}


def _described(oci: OciRequest) -> str:
    """What ``oci`` asks for, in a message: ``docker.io/library/alpine manifest 3.20``."""
    if oci.endpoint is Endpoint.TAGS:
        return f"{oci.name} tags"
    return f"{oci.name} {_NOUNS.get(oci.endpoint, 'object')} {oci.reference}"
