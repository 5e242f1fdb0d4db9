"""
Log output in the format ``--log-format`` asks for.

twistd owns the log file (``--logfile``, ``--nodaemon``) and builds its
log observer from its ``--logger`` option, a dotted name, after the command
line is parsed.  With ``--log-format json`` the options point that hook at
:func:`json_observer`, which writes the same structured events as one JSON
object per line, ready for a log shipper.  Nothing here logs secrets: the
events themselves carry redacted URLs (see :func:`buildcache.credentials.redact`).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import ILogObserver, jsonFileLogObserver

#: The dotted name twistd's ``logger`` option takes.
JSON_OBSERVER = "buildcache.ops.logs.json_observer"

# Where json_observer writes: twistd calls the factory without arguments,
# so the --logfile value is recorded here when the options are parsed.
_logfile: str | None = None


def use_logfile(logfile: str | None) -> None:
    global _logfile
    _logfile = logfile


def json_observer() -> ILogObserver:
    """
    JSON lines to the ``--logfile`` given (appended), or to standard
    output when it is empty or ``-``.
    """
    stream: IO[Any]
    if not _logfile or _logfile == "-":
        stream = sys.stdout
    else:
        stream = open(_logfile, "a", encoding="utf-8")
    return jsonFileLogObserver(stream, recordSeparator="")
