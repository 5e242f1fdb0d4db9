"""
The status pages on both ports: the page at ``/``, its figures at
``/-/stats.json`` and the Prometheus metrics at ``/-/metrics``.

:class:`StatusResource` owns only the answering: each request takes one
snapshot (:mod:`buildcache.ops.snapshot`) and renders it as HTML
(:mod:`buildcache.ops.page`), as JSON, or as the metrics exposition
(:mod:`buildcache.ops.metrics`).  A server of several processes gives it
their combined snapshot (:func:`buildcache.ops.combine.combine`) instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.engine.respond import send_error
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import METRICS_PATH, PAGE_PATH, STATS_PATH, render_page
from buildcache.ops.snapshot import Snapshot

#: Paths this module answers, on either port.
STATUS_PATHS = frozenset({PAGE_PATH, STATS_PATH, METRICS_PATH})


class StatusResource(Resource):
    """
    Answers ``/`` (the page), ``/-/stats.json`` and ``/-/metrics``.

    The front ends hand it requests through :meth:`serve` after their own
    client checks; as a leaf it also serves a ``Site`` of its own.
    """

    isLeaf = True
    paths = STATUS_PATHS

    def __init__(self, snapshot: Callable[[], Snapshot | Deferred[Snapshot]]) -> None:
        """
        :param snapshot: the figures now, taken for each request (e.g.
            :meth:`buildcache.ops.snapshot.SnapshotSources.snapshot`), or a
            Deferred of them (the whole server's, gathered from its
            worker processes).
        """
        super().__init__()
        self.snapshot = snapshot

    def render(self, request: Request) -> object:
        self.serve(request, request.path.decode("latin-1"))
        return NOT_DONE_YET

    def serve(self, request: Request, path: str) -> None:
        """
        Answer and finish ``request`` for ``path`` (without query).
        """
        if path not in STATUS_PATHS:
            send_error(
                request, 404,
                f"no such status path (there are {', '.join(sorted(STATUS_PATHS))})",
            )
            return
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            send_error(request, 405, "the status pages answer GET and HEAD")
            return
        # The whole server's figures may take a moment (the workers are
        # asked): a client that leaves meanwhile gets nothing written.
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        taken = maybeDeferred(self.snapshot)
        taken.addCallbacks(
            lambda snapshot: None if gone else self._answer(request, path, snapshot),
            lambda reason: None if gone else send_error(
                request, 500, f"no figures: {reason.getErrorMessage()}"
            ),
        )

    def _answer(self, request: Request, path: str, snapshot: Snapshot) -> None:
        if path == PAGE_PATH:
            body, content_type = render_page(snapshot), "text/html; charset=utf-8"
            request.setHeader(
                "content-security-policy",
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            )
        elif path == STATS_PATH:
            body = json.dumps(snapshot, indent=1).encode("utf-8")
            content_type = "application/json"
        else:
            body, content_type = render_metrics(snapshot)
        request.setResponseCode(200)
        request.setHeader("content-type", content_type)
        request.setHeader("content-length", str(len(body)))
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-content-type-options", "nosniff")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

