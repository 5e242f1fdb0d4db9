"""
What the fetcher tells operations about upstreams: bytes that crossed the
line, and each upstream's successes and failures.  :mod:`buildcache.ops`
implements :class:`FetchObserver`; nothing here imports it.
"""

from __future__ import annotations

from typing import Protocol


class FetchObserver(Protocol):
    """
    Told of upstream traffic as it happens.
    """

    def upstream_received(self, front_end: str, count: int) -> None:
        """
        ``count`` body bytes arrived from an upstream for ``front_end``.
        """

    def upstream_succeeded(self, url: str, latency: float) -> None:
        """
        An upstream answered ``url`` after ``latency`` seconds.
        """

    def upstream_failed(self, url: str, error: str) -> None:
        """
        An upstream failed on ``url`` (unreachable, timed out, 5xx, a body
        cut short); ``error`` says how, without credentials.
        """
