"""
An in-process OCI registry origin for tests, with faults on cue (a
``twisted.web`` resource: serve it on real TCP with
:func:`tests.support.listen`, or :func:`start_origin`).

Content::

    origin = OciOrigin()
    url = start_origin(testcase, origin)            # "http://127.0.0.1:PORT"
    image = origin.push_image("team/app", "t1", [b"layer one", b"layer two"])
    image.digest, image.manifest, image.config, image.layers   # digests, bytes
    blob = origin.add_blob(b"bytes")                # its digest
    digest = origin.add_manifest("team/app", body, media_type, tags=("t2",))

It serves ``GET``/``HEAD`` of ``/v2/``, ``/v2/<repo>/manifests/<tag|digest>``
(honouring ``Accept``: a manifest of a type the client does not take is a
404, as the distribution registry answers; ``ignore_accept`` turns that
off), ``/v2/<repo>/blobs/<digest>`` (blobs are shared by every repository;
``Range`` is not honoured), ``/v2/<repo>/tags/list`` (``n`` and ``last``,
with a ``Link`` to the next page), ``/v2/<repo>/referrers/<digest>``
(``origin.referrers[(repo, digest)]``: descriptors), and ``/token``.
``Docker-Content-Digest`` goes with manifests and blobs unless
``send_digest`` is False.  Anything else is 404 in the spec's JSON.

What it saw::

    origin.requests[("GET", "/v2/team/app/blobs/sha256:...")]   # a Counter
    origin.seen       # [Seen(method, path, query, headers)], in order
    origin.count(path)   # GETs and HEADs of path together

Faults (attributes; set and change them at any time):

- ``origin.fail[path] = Fault(429, {"retry-after": "30"}, times=1)``: that
  answer instead (``times`` None: always); ``origin.fail_all = Fault(503)``
  for every path but ``/token``.
- ``origin.token = TokenFlow(expires_in=60, credentials=("u", "p"))``:
  every ``/v2/`` request without a valid ``Authorization: Bearer`` gets a
  401 with ``WWW-Authenticate: Bearer realm="<origin>/token",
  service="oci-origin",scope="repository:<repo>:pull"``; ``GET /token``
  (Basic credentials checked when given) answers ``{"token":..,
  "expires_in":..}``.  ``origin.tokens`` lists those issued;
  ``origin.revoke_tokens()`` makes every issued token fail (a 401 with a
  kept token).  ``TokenFlow(basic=True)`` asks for Basic instead.
- ``origin.redirect_blobs = Redirect(307, other_url)``: blob GETs answer
  that status with ``Location: <other_url><same path>``.  Make the other
  origin with ``OciOrigin(blobs=origin.blobs)`` so it serves them (with
  its own counts and ``seen``: assert no ``Authorization`` arrived there).
- ``origin.truncate[path] = n``: the full ``Content-Length``, then ``n``
  bytes and the connection closed.
- ``origin.tamper[path] = b"..."``: those bytes instead of the right ones,
  same headers (a digest mismatch).
- ``origin.gate[path] = Gate(n, deferred)``: ``n`` bytes, then the rest
  when ``deferred`` fires (a fill in progress).  ``origin.started[path]``
  fires when that request's first bytes are sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.support import listen, url_of

__all__ = [
    "DOCKER_MANIFEST", "DOCKER_LIST", "OCI_MANIFEST", "OCI_INDEX", "OCI_CONFIG",
    "OCI_LAYER", "ALL_MANIFESTS", "Fault", "TokenFlow", "Redirect", "Gate",
    "Image", "Seen", "OciOrigin", "digest_of", "start_origin",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
#: The Accept header docker, containerd and skopeo send, more or less.
ALL_MANIFESTS = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@frozen
class Fault:
    """An answer given instead of the real one."""

    status: int
    headers: Mapping[str, str] = Factory(dict)
    body: bytes = b'{"errors":[{"code":"UNAVAILABLE","message":"fault"}]}'
    #: How many requests get it (None: all).
    times: int | None = None


@frozen
class TokenFlow:
    expires_in: int = 60
    #: (user, password) the token endpoint requires, else anonymous.
    credentials: tuple[str, str] | None = None
    #: Challenge with Basic (credentials checked on every request) instead.
    basic: bool = False


@frozen
class Redirect:
    status: int
    #: Base URL of the other origin (no trailing slash).
    to: str


@frozen
class Gate:
    before: int
    release: Deferred[None]


@frozen
class Image:
    repository: str
    tag: str
    digest: str
    manifest: bytes
    media_type: str
    config: str
    layers: tuple[str, ...]


@frozen
class Seen:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]


@define
class _Manifest:
    body: bytes
    media_type: str


@define(eq=False)
class OciOrigin(Resource):
    """See the module docstring."""

    isLeaf = True

    blobs: dict[str, bytes] = Factory(dict)
    #: repo -> digest -> manifest.
    manifests: dict[str, dict[str, _Manifest]] = Factory(dict)
    #: repo -> tag -> digest.
    tags: dict[str, dict[str, str]] = Factory(dict)
    referrers: dict[tuple[str, str], list[dict[str, Any]]] = Factory(dict)
    requests: Counter[tuple[str, str]] = Factory(Counter)
    seen: list[Seen] = Factory(list)
    fail: dict[str, Fault] = Factory(dict)
    fail_all: Fault | None = None
    token: TokenFlow | None = None
    tokens: list[str] = Factory(list)
    revoked: set[str] = Factory(set)
    redirect_blobs: Redirect | None = None
    truncate: dict[str, int] = Factory(dict)
    tamper: dict[str, bytes] = Factory(dict)
    gate: dict[str, Gate] = Factory(dict)
    started: dict[str, Deferred[None]] = Factory(dict)
    send_digest: bool = True
    ignore_accept: bool = False
    _fault_uses: Counter[str] = field(init=False, factory=Counter)

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    # -- content -----------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(
        self, repository: str, body: bytes, media_type: str, tags: Iterable[str] = ()
    ) -> str:
        digest = digest_of(body)
        self.manifests.setdefault(repository, {})[digest] = _Manifest(body, media_type)
        for tag in tags:
            self.tags.setdefault(repository, {})[tag] = digest
        return digest

    def push_image(
        self, repository: str, tag: str, layers: Sequence[bytes],
        media_type: str = OCI_MANIFEST,
    ) -> Image:
        """An image of ``layers`` (and a small config) tagged ``tag``."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        config_digest = self.add_blob(config)
        layer_digests = tuple(self.add_blob(layer) for layer in layers)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": d, "size": len(layer)}
                for d, layer in zip(layer_digests, layers)
            ],
        }, sort_keys=True).encode()
        digest = self.add_manifest(repository, manifest, media_type, (tag,))
        return Image(repository, tag, digest, manifest, media_type, config_digest, layer_digests)

    def count(self, path: str) -> int:
        """GETs and HEADs of ``path``."""
        return self.requests[("GET", path)] + self.requests[("HEAD", path)]

    def revoke_tokens(self) -> None:
        self.revoked.update(self.tokens)

    # -- serving -----------------------------------------------------------

    def render(self, request: IRequest) -> object:
        method = request.method.decode()
        path = request.path.decode()
        query = request.uri.decode().partition("?")[2]
        headers = {
            k.decode().lower(): b", ".join(v).decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests[(method, path)] += 1
        self.seen.append(Seen(method, path, query, headers))
        if path == "/token":
            return self._token(request, query, headers)
        fault = self.fail.get(path) or self.fail_all
        if fault is not None and (fault.times is None or self._fault_uses[path] < fault.times):
            self._fault_uses[path] += 1
            return self._answer(request, fault.status, fault.body, fault.headers)
        if not path.startswith("/v2/") and path != "/v2":
            return self._error(request, 404, "NAME_UNKNOWN", "not a registry path")
        if self.token is not None:
            refusal = self._refusal(request, headers, path)
            if refusal is not None:
                return refusal
        if path in ("/v2", "/v2/"):
            return self._answer(request, 200, b"{}", {"content-type": "application/json"})
        repo, kind, ref = _split(path)
        if kind == "manifests":
            return self._manifest(request, repo, ref, headers)
        if kind == "blobs":
            return self._blob(request, path, ref)
        if kind == "tags":
            return self._tags(request, repo, query)
        if kind == "referrers":
            body = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": self.referrers.get((repo, ref), []),
            }).encode()
            return self._answer(request, 200, body, {"content-type": OCI_INDEX})
        return self._error(request, 404, "NAME_UNKNOWN", "no such endpoint")

    def _refusal(
        self, request: IRequest, headers: Mapping[str, str], path: str
    ) -> object | None:
        """The 401 for a request without valid credentials, else None."""
        flow = self.token
        assert flow is not None
        given = headers.get("authorization", "")
        if flow.basic:
            if flow.credentials is not None and given == _basic(*flow.credentials):
                return None
            return self._answer(
                request, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"basic"}]}',
                {"www-authenticate": 'Basic realm="oci-origin"'},
            )
        if given.startswith("Bearer "):
            token = given[len("Bearer "):]
            if token in self.tokens and token not in self.revoked:
                return None
        repo = _split(path)[0]
        scope = f',scope="repository:{repo}:pull"' if repo else ""
        host = request.getHeader(b"host").decode()
        return self._answer(
            request, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}',
            {
                "content-type": "application/json",
                "www-authenticate": (
                    f'Bearer realm="http://{host}/token",service="oci-origin"{scope}'
                ),
            },
        )

    def _token(self, request: IRequest, query: str, headers: Mapping[str, str]) -> object:
        flow = self.token
        if flow is None:
            return self._error(request, 404, "NAME_UNKNOWN", "no token service")
        if flow.credentials is not None and headers.get("authorization") != _basic(
            *flow.credentials
        ):
            return self._error(request, 401, "UNAUTHORIZED", "bad credentials")
        token = f"token-{len(self.tokens) + 1}"
        self.tokens.append(token)
        body = json.dumps({
            "token": token, "expires_in": flow.expires_in,
            "scope": dict(parse_qsl(query)).get("scope", ""),
        }).encode()
        return self._answer(request, 200, body, {"content-type": "application/json"})

    def _manifest(
        self, request: IRequest, repo: str, ref: str, headers: Mapping[str, str]
    ) -> object:
        digest = ref if ":" in ref else self.tags.get(repo, {}).get(ref)
        manifest = self.manifests.get(repo, {}).get(digest or "")
        if manifest is None or digest is None:
            return self._error(request, 404, "MANIFEST_UNKNOWN", f"{repo}:{ref}")
        accept = headers.get("accept")
        if accept and not self.ignore_accept:
            taken = {a.split(";")[0].strip() for a in accept.split(",")}
            if manifest.media_type not in taken and not taken & {"*/*", "application/*"}:
                return self._error(
                    request, 404, "MANIFEST_UNKNOWN", "type not accepted"
                )
        return self._body(request, request.path.decode(), manifest.body, {
            "content-type": manifest.media_type,
            **({"docker-content-digest": digest} if self.send_digest else {}),
        })

    def _blob(self, request: IRequest, path: str, digest: str) -> object:
        data = self.blobs.get(digest)
        if data is None:
            return self._error(request, 404, "BLOB_UNKNOWN", digest)
        redirect = self.redirect_blobs
        if redirect is not None and request.method == b"GET":
            return self._answer(
                request, redirect.status, b"", {"location": redirect.to + path}
            )
        return self._body(request, path, data, {
            "content-type": "application/octet-stream",
            **({"docker-content-digest": digest} if self.send_digest else {}),
        })

    def _tags(self, request: IRequest, repo: str, query: str) -> object:
        if repo not in self.tags:
            return self._error(request, 404, "NAME_UNKNOWN", repo)
        params = dict(parse_qsl(query))
        tags = sorted(self.tags[repo])
        if "last" in params:
            tags = [t for t in tags if t > params["last"]]
        extra: dict[str, str] = {"content-type": "application/json"}
        if "n" in params and params["n"].isdigit():
            n = int(params["n"])
            if len(tags) > n:
                tags = tags[:n]
                next_query = urlencode({"n": n, "last": tags[-1]})
                extra["link"] = f'</v2/{repo}/tags/list?{next_query}>; rel="next"'
        body = json.dumps({"name": repo, "tags": tags}).encode()
        return self._answer(request, 200, body, extra)

    # -- writing -----------------------------------------------------------

    def _error(self, request: IRequest, status: int, code: str, message: str) -> object:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        return self._answer(request, status, body, {"content-type": "application/json"})

    def _answer(
        self, request: IRequest, status: int, body: bytes, headers: Mapping[str, str]
    ) -> object:
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader("content-length", str(len(body)))
        if request.method == b"HEAD":
            return b""
        return body

    def _body(
        self, request: IRequest, path: str, data: bytes, headers: Mapping[str, str]
    ) -> object:
        """A 200 with the faults of ``path`` applied."""
        request.setResponseCode(200)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader("content-length", str(len(data)))
        if request.method == b"HEAD":
            return b""
        data = self.tamper.get(path, data)
        started = self.started.pop(path, None)
        if path in self.truncate:
            request.write(data[: self.truncate[path]])
            if started is not None:
                started.callback(None)
            request.loseConnection()
            return NOT_DONE_YET
        gate = self.gate.get(path)
        if gate is None:
            if started is not None:
                started.callback(None)
            return data
        request.write(data[: gate.before])
        if started is not None:
            started.callback(None)
        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)

        def rest(_: object) -> None:
            if not lost:
                request.write(data[gate.before:])
                request.finish()

        gate.release.addCallback(rest)
        return NOT_DONE_YET


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _split(path: str) -> tuple[str, str, str]:
    """``(repo, kind, reference)`` of a ``/v2/`` path (empty strings if none)."""
    rest = path[len("/v2/"):]
    if rest.endswith("/tags/list"):
        return rest[: -len("/tags/list")], "tags", ""
    for kind in ("manifests", "blobs", "referrers"):
        repo, sep, ref = rest.rpartition(f"/{kind}/")
        if sep and "/" not in ref:
            return repo, kind, ref
    return "", "", ""


def start_origin(testcase: Any, origin: OciOrigin) -> str:
    """Serve ``origin`` on 127.0.0.1 until ``testcase`` ends; its base URL."""
    port = listen(origin)
    testcase.addCleanup(port.stopListening)
    return url_of(port).rstrip("/")
