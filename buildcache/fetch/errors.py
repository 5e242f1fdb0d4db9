"""
The ways an upstream request fails.

Which status a client gets for each is not said here: that is
:data:`buildcache.engine.errors.ERROR_STATUS`, the one table.  The
connection layer (:mod:`buildcache.fetch.connect`) raises :class:`TargetRefused` and
:class:`UpstreamTimeout`; the fetcher raises the rest, and
:class:`buildcache.store.IntegrityError` for a body that fails its check.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """
    The upstream could not be reached or did not answer in time.
    """

    #: Whether the failure says something about the upstream's health; a
    #: target the access policy refused was never contacted.
    counts_against_upstream = True


class UpstreamTimeout(UpstreamError):
    """
    The upstream did not connect, or did not answer, in time.
    """


class CacheWriteError(UpstreamError):
    """
    The cache disk refused a body that had to be checked before anyone
    could see it (or that nobody was reading any more), so it was neither
    stored nor served.  An :class:`UpstreamError` so that front ends answer
    it like a failed fetch (502, or a stale copy).
    """


class TargetRefused(UpstreamError):
    """
    The access policy forbids connecting to this upstream.

    ``host`` and ``port`` are as requested; ``address`` is the resolved
    address refused, or ``None`` when the host name itself was refused (or
    no address was allowed and several were refused: then ``str()`` names
    them all); ``reason`` is the policy's explanation, fit for a 403 body.
    """

    counts_against_upstream = False

    def __init__(self, host: str, port: int, reason: str, address: str | None = None):
        self.host = host
        self.port = port
        self.reason = reason
        self.address = address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if address is not None:
            where = f"{where} ({address})"
        super().__init__(f"refused to connect to {where}: {reason}")
