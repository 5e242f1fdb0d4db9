"""
The agent that sends the operator's upstream credentials.

:class:`CredentialsAgent` adds the ``Authorization: Basic`` header to each
request for a configured upstream's own origin.  Which credentials belong
to which origin is decided in :mod:`buildcache.credentials`, which speaks
no HTTP; this is the only HTTP-level part.

The header is added below the fetcher, so it is part of no cache key and
of no request the fetcher compares.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from buildcache.credentials import UpstreamCredentials

__all__ = ["CredentialsAgent"]


@implementer(IAgent)
@attrs.frozen
class CredentialsAgent:
    """
    Adds the configured credentials to each request for their origin.

    It sits below the redirect handling, so each hop of a redirect is judged
    on its own URI: a redirect that leaves the origin is sent without them.
    A request that already carries an ``Authorization`` header (a client's
    own) is sent as it is.
    """

    agent: IAgent
    credentials: UpstreamCredentials

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        credentials = self.credentials.for_url(uri)
        if credentials is not None and not (
            headers is not None and headers.hasHeader(b"authorization")
        ):
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"authorization", [credentials.authorization()])
        return self.agent.request(method, uri, headers, bodyProducer)
