"""
The access log's lines: what one finished request's line says, and the log
event that carries it.

A line is made in two steps.  :func:`access_record` takes what the line
needs from an :class:`~buildcache.engine.events.Exchange` (its URL
redacted) into a plain list of JSON values: a hit worker sends these
records to the main process as they are (:mod:`buildcache.workers.control`),
which is much cheaper than sending log events.  :func:`access_event` makes
the log event from a record, in whichever process writes it: the same
event a ``Logger.info("{line}", line=..., client=..., ...)`` call made,
field for field, its text line formatted here, once.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel

from buildcache.credentials import redact
from buildcache.engine.events import Exchange

__all__ = [
    "ACCESS_FORMAT",
    "ACCESS_SYSTEM",
    "AccessRecord",
    "access_event",
    "access_record",
    "unpersistable",
]

#: The events' ``log_format``: the observers format the line only; the
#: other fields are for JSON logs.
ACCESS_FORMAT = "{line}"
#: The events' ``log_system`` ("access" in the text log's system column).
ACCESS_SYSTEM = "access"
_INFO = LogLevel.info

#: One line's fields: ``[log_time, client, method, url (redacted), status,
#: bytes, cache status, duration, front end, shared, completed]``.  A list
#: of JSON values, so that it crosses the control channel unchanged.
AccessRecord = list[Any]


def access_record(exchange: Exchange, when: float) -> AccessRecord:
    """The line of ``exchange``, written at ``when``, as a record."""
    cache = exchange.cache
    return [
        when, exchange.client, exchange.method, redact(exchange.url),
        exchange.status, exchange.bytes_sent, cache or "none", exchange.duration,
        exchange.front_end, exchange.shared and cache == "HIT", exchange.completed,
    ]


def access_event(
    record: AccessRecord, system: str, logger: object, source: object, namespace: str
) -> dict[str, Any]:
    """
    The log event of ``record``, as ``Logger.info`` makes it (its keys in
    the same order), with ``log_system`` ``system`` and the logger's
    ``logger``, ``source`` and ``namespace``.
    """
    when, client, method, url, status, sent, cache, duration, front_end, shared, completed = (
        record
    )
    # The text line is formatted here, once: the log observers format
    # "{line}" only.
    line = f"{client} {method} {url} {status} {sent} {cache} {duration:.3f}s"
    if not completed:
        line += " (client or upstream ended early)"
    if shared:
        line += " (from the shared tier)"
    return {
        "line": line, "log_system": system, "client": client, "method": method,
        "url": url, "status": status, "bytes": sent, "cache": cache,
        "duration": duration, "front_end": front_end, "shared": shared,
        "log_logger": logger, "log_level": _INFO, "log_namespace": namespace,
        "log_source": source, "log_format": ACCESS_FORMAT, "log_time": when,
    }


def unpersistable() -> dict[str, bool]:
    """
    What :func:`twisted.logger.eventFromJSON` gives for an object JSON
    could not carry (the logger and the source of an event from another
    process).
    """
    return {"unpersistable": True}
