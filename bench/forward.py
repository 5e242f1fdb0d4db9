"""
The least an index server built on twisted.web and treq can do for a cold
request: forward it upstream and stream the answer back, with no cache, no
parsing and no checks.  ``bench/pypi.py`` runs it as a reference row, so the
cost of fetching on demand with this stack is measured in the same run as
buildcache's cold row.

    python bench/forward.py PORT UPSTREAM_ORIGIN

``UPSTREAM_ORIGIN`` is ``http://host:port``; a request for ``/a/b`` is
fetched from ``UPSTREAM_ORIGIN/a/b`` with the client's ``Accept`` header,
over one persistent connection pool, as buildcache fetches.
"""

from __future__ import annotations

import sys

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

import treq
from treq.client import HTTPClient

#: Response headers passed on to the client.
FORWARDED_HEADERS = (b"content-type", b"content-length", b"etag", b"last-modified")


class Forward(Resource):
    isLeaf = True

    def __init__(self, client: HTTPClient, upstream: bytes) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream

    def render_GET(self, request: Request) -> object:
        accept = request.getHeader(b"accept")
        fetching = self.client.get(
            (self.upstream + request.uri).decode("ascii"),
            headers=Headers({b"Accept": [accept]} if accept else {}),
            unbuffered=True,
        )

        def answer(response: IResponse) -> object:
            request.setResponseCode(response.code)
            for name in FORWARDED_HEADERS:
                values = response.headers.getRawHeaders(name)
                if values:
                    request.responseHeaders.setRawHeaders(name, values)
            return treq.collect(response, request.write)

        def failed(failure: Failure) -> None:
            request.setResponseCode(502)
            request.write(failure.getErrorMessage().encode())

        fetching.addCallbacks(answer, failed)
        fetching.addBoth(lambda _: request.finish())
        return NOT_DONE_YET


def main(reactor: IReactorTCP, port: int, upstream: str) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool))
    site = Site(Forward(client, upstream.rstrip("/").encode("ascii")))
    site.noisy = False
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)


if __name__ == "__main__":
    from twisted.internet import reactor

    main(reactor, int(sys.argv[1]), sys.argv[2])
    reactor.run()  # type: ignore[attr-defined]
