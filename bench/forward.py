"""
The least an index server built on twisted.web and treq can do for a cold
request: forward it upstream and stream the answer back, with no cache, no
parsing and no checks.  ``bench/pypi.py`` runs it as a reference row, so the
cost of fetching on demand with this stack is measured in the same run as
buildcache's cold row; with ``--delay-ms`` it stands in front of the origin
as a distant index (``bench/pypi.py --origin-latency-ms``).

    python bench/forward.py PORT UPSTREAM_ORIGIN [--delay-ms MS]

``UPSTREAM_ORIGIN`` is ``http://host:port``; a GET or HEAD of ``/a/b`` is
made of ``UPSTREAM_ORIGIN/a/b`` with the client's ``Accept`` header, over
one persistent connection pool as buildcache fetches, and the answer
(redirects too) is passed back.  ``--delay-ms``
holds every request that long before fetching it: the round trip to an
index across a slow line.  Its bandwidth is the origin's: ``bench/pypi.py
--origin-rate-mb`` has nginx send each file at that rate (``limit_rate``,
per request), and this forwarder streams what it receives as it arrives,
so a file reaches the client after the delay plus its size over the rate
(the forwarder's own copy adds little at 50 MB/s), each of the
forwarder's connections to nginx limited on its own.
"""

from __future__ import annotations

import argparse

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

#: Response headers passed on to the client.
FORWARDED_HEADERS = (
    b"content-type", b"content-length", b"etag", b"last-modified", b"location", b"vary",
)


class Forward(Resource):
    isLeaf = True

    def __init__(
        self, client: HTTPClient, upstream: bytes, clock: IReactorTime, delay: float
    ) -> None:
        super().__init__()
        self.client = client
        self.upstream = upstream
        self.clock = clock
        self.delay = delay

    def render_GET(self, request: Request) -> object:
        Deferred.fromCoroutine(self._forward(request))
        return NOT_DONE_YET

    render_HEAD = render_GET

    async def _forward(self, request: Request) -> None:
        accept = request.getHeader(b"accept")
        try:
            if self.delay > 0:
                await deferLater(self.clock, self.delay)
            response = await self.client.request(
                request.method.decode("ascii"),
                (self.upstream + request.uri).decode("ascii"),
                headers=Headers({b"Accept": [accept]} if accept else {}),
                allow_redirects=False,
                unbuffered=True,
            )
            request.setResponseCode(response.code)
            for name in FORWARDED_HEADERS:
                values = response.headers.getRawHeaders(name)
                if values:
                    request.responseHeaders.setRawHeaders(name, values)
            await treq.collect(response, request.write)
        except Exception as e:  # noqa: BLE001 - any failure is the client's 502
            if not request.startedWriting:
                request.setResponseCode(502)
                request.write(str(e).encode())
        finally:
            request.finish()


def main(
    reactor: IReactorTCP, clock: IReactorTime, port: int, upstream: str, delay: float
) -> None:
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = HTTPClient(Agent(reactor, pool=pool))
    site = Site(Forward(client, upstream.rstrip("/").encode("ascii"), clock, delay))
    site.noisy = False
    TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(site)


if __name__ == "__main__":
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("port", type=int)
    parser.add_argument("upstream")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    main(reactor, reactor, args.port, args.upstream, args.delay_ms / 1000)
    reactor.run()  # type: ignore[attr-defined]
