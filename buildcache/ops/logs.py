"""
Log output in the format ``--log-format`` asks for.

twistd owns the log file (``--logfile``, ``--nodaemon``) and builds its
log observer from its ``--logger`` option, a dotted name, after the command
line is parsed.  The options point that hook at :func:`text_observer`
(``--log-format text``) or at :func:`json_observer` (``json``, the same
structured events as one JSON object per line, ready for a log shipper).

The text is twistd's own, byte for byte (:class:`ClassicText`), and the
JSON is :func:`twisted.logger.jsonFileLogObserver`'s (:class:`JSONLines`),
made for less: an access line (one per request) skips the generic
formatting's work, and the text's time prefix is made once per second.  Nothing here logs
secrets: the events themselves carry redacted URLs (see
:func:`buildcache.credentials.redact`).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import IO, Any

from attrs import define
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

__all__ = [
    "JSON_OBSERVER",
    "TEXT_OBSERVER",
    "ClassicText",
    "JSONLines",
    "json_observer",
    "text_observer",
    "use_logfile",
]

#: The dotted names twistd's ``logger`` option takes.
JSON_OBSERVER = "buildcache.ops.logs.json_observer"
TEXT_OBSERVER = "buildcache.ops.logs.text_observer"

# Where the observers write: twistd calls the factory without arguments,
# so the --logfile value is recorded here when the options are parsed.
_logfile: str | None = None


def use_logfile(logfile: str | None) -> None:
    global _logfile
    _logfile = logfile


def json_observer() -> ILogObserver:
    """
    JSON lines to the ``--logfile`` given (appended), or to standard
    output when it is empty or ``-``, as ``jsonFileLogObserver(stream,
    recordSeparator="")`` writes them.
    """
    stream: IO[Any]
    if not _logfile or _logfile == "-":
        stream = sys.stdout
    else:
        stream = open(_logfile, "a", encoding="utf-8")
    return FileLogObserver(stream, JSONLines())


def text_observer() -> ILogObserver:
    """
    What twistd makes for ``--logfile`` (on Unix, without ``--syslog``):
    text lines to standard output when the file is empty or ``-``, else to
    a :class:`LogFile` (rotated at 1 MB, and on SIGUSR1 unless that signal
    is taken), each line as :func:`formatEventAsClassicLogText` has it.
    """
    stream: IO[Any]
    if not _logfile or _logfile == "-":
        stream = sys.stdout
    else:
        logfile = LogFile.fromFullPath(_logfile)
        stream = logfile
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(signum: int, frame: object) -> None:
                from twisted.internet import reactor

                reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]

            signal.signal(signal.SIGUSR1, rotate)
    return FileLogObserver(stream, ClassicText())


@define
class ClassicText:
    """
    Formats an event as :func:`formatEventAsClassicLogText` does with
    twistd's time format, for less: the time prefix is made once per
    second (the format has no finer field), and an event whose text is
    one string field, ``"{line}"`` (an access line), is not put through
    the generic formatting.
    """

    _second: float | None = None
    _stamp: str = ""

    def time(self, when: float | None) -> str:
        """``when`` as :func:`formatTime` has it in twistd's format."""
        if when is None:
            return "-"
        second = when // 1
        if second != self._second:
            # The stamp first: a failing format leaves the cache as it was.
            self._stamp = formatTime(when, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        line = event.get("line")
        system = event.get("log_system")
        if (
            line.__class__ is str
            and system.__class__ is str
            and event.get("log_format") == "{line}"
            and "log_failure" not in event
        ):
            if not line:
                return None
            text = f"{self.time(event.get('log_time'))} [{system}] {line}"
            if "\n" in text:
                text = text.replace("\n", "\n\t")
            return text + "\n"
        return formatEventAsClassicLogText(event, formatTime=self.time)


def _json_of(value: object) -> Any:
    # What eventAsJSON writes for value (through Twisted's public API).
    return json.loads(eventAsJSON({"value": value}))["value"]


_INFO = LogLevel.info
#: Values JSON writes as they are, and those eventAsJSON has a form for.
_JSON = (dict, list, tuple, str, int, float, type(None))
_SAVED = (bytes, type(_INFO), Failure)
_INFO_JSON = _json_of(_INFO)
_UNPERSISTABLE = _json_of(object())


@define
class JSONLines:
    """
    Formats an event as :func:`twisted.logger.jsonFileLogObserver` does
    (with no record separator): :func:`eventAsJSON` and a newline.  An
    access line's event (see :mod:`buildcache.ops.access_lines`), whose
    values are plain JSON but for its logger, source and level, is
    written straight away, not through eventAsJSON's per-value hooks and
    the flattening of its format.
    """

    def __call__(self, event: LogEvent) -> str:
        line = event.get("line")
        if (
            line.__class__ is str
            and event.get("log_format") == "{line}"
            and event.get("log_level") is _INFO
            and "log_failure" not in event
        ):
            flat = {"line!s:": line, "line!:": line}
            flattened = event.get("log_flattened", flat)
            if flattened == flat:
                record = dict(event)
                # In place: the keys keep their order.
                record["log_level"] = _INFO_JSON
                for key in ("log_logger", "log_source"):
                    value = record.get(key)
                    if isinstance(value, _SAVED):
                        return eventAsJSON(event) + "\n"
                    if not isinstance(value, _JSON):
                        # A Logger, an Activity: what eventAsJSON writes
                        # for any object it has no form for.
                        record[key] = _UNPERSISTABLE
                # eventAsJSON adds the flattened fields to the event itself.
                event["log_flattened"] = record["log_flattened"] = flattened
                try:
                    return json.dumps(record) + "\n"
                except (TypeError, ValueError):
                    # A value of another kind: eventAsJSON knows them all.
                    pass
        return eventAsJSON(event) + "\n"
