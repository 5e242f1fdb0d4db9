"""
The control channel between the main process and one hit worker.

One AF_UNIX socketpair per worker, the worker's end inherited as a file
descriptor.  Messages are JSON objects in :class:`Int32StringReceiver`
frames (not AMP: a worker's snapshot can exceed AMP's 64 KiB values),
each at most :data:`MAX_MESSAGE` bytes.  A *call* carries an ``id`` and is
answered by a message with the same ``id`` and a ``result`` (or an
``error``); a *notice* has no ``id`` and no answer.

Worker to main (:class:`MainLink` sends, :class:`WorkerLink` answers):

- ``admit {key}`` (call, answers a bool) and ``release {key}``: the
  per-client connection cap, counted in the main process for the whole
  server (:meth:`buildcache.frontends.connections.ClientConnections.admit_remote`);
- ``accesses {accesses}``: the read-only store's access times
  (:meth:`buildcache.store.StoreReader.take_accesses`), applied with
  :meth:`buildcache.store.Store.record_accesses`;
- ``log {events}``: the worker's log events, batched per reactor turn,
  emitted again in the main process's log with ``worker=<n>``.  Each is
  a string (:func:`twisted.logger.eventAsJSON`), or a list: an access
  line's record (:func:`buildcache.ops.access_lines.access_record`), of
  which the main process makes the event the worker would have logged,
  at a fraction of the cost of a whole event's JSON on both sides.

Main to worker: ``snapshot`` (call, answers the worker's
:data:`buildcache.ops.snapshot.Snapshot`) and ``drain``.

This module owns the framing, the calls and their answers, and the two
ends' handlers; what the handlers act on is passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import (
    ILogObserver,
    Logger,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from buildcache.ops.access_lines import (
    ACCESS_SYSTEM,
    AccessRecord,
    access_event,
    unpersistable,
)
from buildcache.ops.activity import Activity

__all__ = [
    "LOG_BATCH_MAX",
    "MAX_MESSAGE",
    "ControlProtocol",
    "LogForwarder",
    "MainLink",
    "WorkerLink",
    "protocol_factory",
]

#: Largest message either side sends or takes (a snapshot is the largest:
#: tens of KiB).
MAX_MESSAGE = 16 * 1024 * 1024
#: Log events a worker holds for one batch; more in one turn are dropped
#: (and counted in the next batch).
LOG_BATCH_MAX = 5000
#: Calls one side may have unanswered; more fail at once (each admitted
#: connection asks once, and the main process answers at once).
MAX_PENDING_CALLS = 65536


class ControlError(Exception):
    """A call failed on the other side, or the channel closed."""


@implementer(IPushProducer)
class ControlProtocol(Int32StringReceiver):
    """
    One end of the control channel: sends calls and notices, answers the
    other side's with ``handlers`` (a name to a function of the message's
    arguments, whose result, or Deferred result, is the answer).
    """

    MAX_LENGTH = MAX_MESSAGE
    log = Logger()

    def __init__(
        self,
        handlers: Mapping[str, Callable[..., Any]],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.handlers = handlers
        self.on_lost = on_lost
        self._next_id = 0
        self._pending: dict[int, Deferred[Any]] = {}
        self.connected_ = False
        #: Whether the other side stopped reading (the transport's buffer
        #: is full): what can be dropped is not sent meanwhile.
        self.backed_up = False

    def connectionMade(self) -> None:
        self.connected_ = True
        # Told when the other side stops taking what is sent (it is busy,
        # or hung): log lines then wait nowhere but are dropped and counted.
        consumer = IConsumer(self.transport)
        consumer.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.backed_up = True

    def resumeProducing(self) -> None:
        self.backed_up = False

    def stopProducing(self) -> None:
        self.backed_up = True

    def notify(self, op: str, **args: Any) -> None:
        """Send a notice (no answer)."""
        self._send({"op": op, "args": args})

    def call(self, op: str, **args: Any) -> Deferred[Any]:
        """Send a call; fires with its answer."""
        if not self.connected_ or self.transport is None:
            return _failed("the control channel is closed")
        if len(self._pending) >= MAX_PENDING_CALLS:
            return _failed("too many control calls unanswered")
        self._next_id += 1
        answer: Deferred[Any] = Deferred()
        self._pending[self._next_id] = answer
        self._send({"op": op, "id": self._next_id, "args": args})
        return answer

    def _send(self, message: Mapping[str, Any]) -> None:
        if not self.connected_ or self.transport is None:
            return
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        if len(data) > self.MAX_LENGTH:
            self.log.error(
                "A control message of {size} bytes is too long: not sent",
                size=len(data), event="control_message_too_long",
            )
            return
        self.sendString(data)

    def stringReceived(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            self.log.error("Unreadable control message: closing the channel")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        if "op" not in message:
            answer = self._pending.pop(message.get("id"), None)
            if answer is None or answer.called:
                # Unknown, or given up on (a snapshot past its timeout).
                return
            if "error" in message:
                answer.errback(ControlError(message["error"]))
            else:
                answer.callback(message.get("result"))
            return
        handler = self.handlers.get(message["op"])
        call_id = message.get("id")
        if handler is None:
            if call_id is not None:
                self._send({"id": call_id, "error": f"unknown op {message['op']!r}"})
            return
        done = maybeDeferred(handler, **message.get("args", {}))
        if call_id is None:
            done.addErrback(self._handler_failed, message["op"])
            return
        done.addCallbacks(
            lambda result: self._send({"id": call_id, "result": result}),
            lambda reason: self._send({"id": call_id, "error": reason.getErrorMessage()}),
        )

    def _handler_failed(self, reason: Failure, op: str) -> None:
        self.log.failure("Control notice {op} failed", reason, op=op)

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.error(
            "A control message of {size} bytes is too long: closing the channel",
            size=length, event="control_message_too_long",
        )
        super().lengthLimitExceeded(length)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected_ = False
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.errback(ControlError("the control channel closed"))
        self.on_lost()


def _failed(message: str) -> Deferred[Any]:
    failed: Deferred[Any] = Deferred()
    failed.errback(ControlError(message))
    return failed


def protocol_factory(protocol: ControlProtocol) -> Factory:
    """A factory giving ``protocol`` (for ``adoptStreamConnection``)."""

    class _One(Factory):
        def buildProtocol(self, addr: object) -> ControlProtocol:
            return protocol

    return _One()


# -- the main process's end ---------------------------------------------------


@attrs.define(eq=False)
class WorkerLink:
    """
    The main process's end of worker ``number``'s channel.

    :ivar admissions: the server's connection table (``admit_remote``,
        ``release_remote``).
    :ivar record_accesses: the writing store's
        :meth:`~buildcache.store.Store.record_accesses`.
    :ivar publisher: where the worker's log events are emitted again.
    """

    number: int
    admissions: Any
    record_accesses: Callable[[Mapping[str, float]], None]
    publisher: LogPublisher | ILogObserver = globalLogPublisher
    on_lost: Callable[[], None] = lambda: None
    #: Told once the worker has adopted its listening sockets and serves.
    on_serving: Callable[[], None] = lambda: None
    protocol: ControlProtocol = attrs.field(init=False)
    #: Log events taken in from the worker, and those it dropped.
    log_events: int = 0
    log_dropped: int = 0

    def __attrs_post_init__(self) -> None:
        self.protocol = ControlProtocol(
            {
                "admit": self._admit,
                "release": self._release,
                "accesses": self._accesses,
                "log": self._log,
                "serving": lambda: self.on_serving(),
            },
            on_lost=lambda: self.on_lost(),
        )

    def _admit(self, key: str) -> bool:
        return bool(self.admissions.admit_remote(self.number, str(key)))

    def _release(self, key: str) -> None:
        self.admissions.release_remote(self.number, str(key))

    def _accesses(self, accesses: Mapping[str, float]) -> None:
        self.record_accesses(
            {str(key): float(when) for key, when in accesses.items()}
        )

    def _log(self, events: list[str | AccessRecord], dropped: int = 0) -> None:
        self.log_dropped += dropped
        number = self.number
        # The main process's text log shows the worker in the system
        # column: "[worker-1,access]".
        access_system = f"worker-{number},{ACCESS_SYSTEM}"
        for item in events:
            if isinstance(item, str):
                event = eventFromJSON(item)
                event["worker"] = number
                event["log_system"] = f"worker-{number},{event.get('log_system', '-')}"
            else:
                event = _worker_access_event(item, access_system, number)
            self.log_events += 1
            self.publisher(event)

    def snapshot(self) -> Deferred[Any]:
        """The worker's snapshot (fails when it does not answer)."""
        return self.protocol.call("snapshot")

    def drain(self) -> None:
        """Ask the worker to finish its responses and exit."""
        self.protocol.notify("drain")


# -- the worker's end ----------------------------------------------------------


@attrs.define(eq=False)
class MainLink:
    """
    A worker's end of its channel: asks admissions (a
    :class:`buildcache.frontends.connections.RemoteAdmitter`), sends
    access times and log events, answers ``snapshot`` and ``drain``.
    """

    snapshot: Callable[[], Any]
    drain: Callable[[], None]
    on_lost: Callable[[], None] = lambda: None
    protocol: ControlProtocol = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.protocol = ControlProtocol(
            {"snapshot": lambda: self.snapshot(), "drain": lambda: self.drain()},
            on_lost=lambda: self.on_lost(),
        )

    def admit(self, key: str) -> Deferred[bool]:
        return self.protocol.call("admit", key=key).addCallback(bool)

    def release(self, key: str) -> None:
        self.protocol.notify("release", key=key)

    @property
    def backed_up(self) -> bool:
        """Whether the main process has stopped taking what is sent."""
        return self.protocol.backed_up

    def send_accesses(self, accesses: Mapping[str, float]) -> None:
        if accesses:
            self.protocol.notify("accesses", accesses=dict(accesses))

    def serving(self) -> None:
        """Tell the main process this worker accepts on its sockets now."""
        self.protocol.notify("serving")

    def send_log(self, events: list[str | AccessRecord], dropped: int) -> bool:
        """Send a batch of log events; whether it was (not while backed up)."""
        if self.protocol.backed_up:
            return False
        self.protocol.notify("log", events=events, dropped=dropped)
        return True


@implementer(ILogObserver)
@attrs.define(eq=False)
class LogForwarder:
    """
    A worker's log observer: each event as JSON, sent in one batch per
    reactor turn (at most :data:`LOG_BATCH_MAX`; more are dropped and
    counted).  The worker's access lines come as records, to
    :meth:`access` (the worker's ``Activity.access_sink``), and go in the
    same batches.
    """

    clock: IReactorTime
    #: Sends a batch and the count dropped before it; False when it could
    #: not (the batch is then dropped and counted too).
    send: Callable[[list[str | AccessRecord], int], bool]
    _batch: list[str | AccessRecord] = attrs.Factory(list)
    _dropped: int = 0
    _scheduled: bool = False

    def __call__(self, event: dict[str, Any]) -> None:
        if len(self._batch) >= LOG_BATCH_MAX:
            self._dropped += 1
            return
        self._add([eventAsJSON(event)])

    def access(self, records: list[AccessRecord]) -> None:
        """One turn's access lines, sent as they are (not as events)."""
        room = max(LOG_BATCH_MAX - len(self._batch), 0)
        if len(records) > room:
            self._dropped += len(records) - room
            records = records[:room]
            if not records:
                return
        self._add(records)

    def _add(self, items: Sequence[str | AccessRecord]) -> None:
        self._batch.extend(items)
        if not self._scheduled:
            self._scheduled = True
            self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._batch and not self._dropped:
            return
        batch, self._batch = self._batch, []
        dropped, self._dropped = self._dropped, 0
        if not self.send(batch, dropped):
            self._dropped = dropped + len(batch)


#: The namespace of the worker's access lines' logger (as the worker's
#: own log would have named it).
_ACCESS_NAMESPACE: str = Activity.log.namespace


def _worker_access_event(record: AccessRecord, system: str, number: int) -> dict[str, Any]:
    """
    The event the worker's access line would have been, taken in through
    its JSON: the logger and source unpersistable, the text flattened
    (see :func:`twisted.logger.eventAsJSON`), ``worker`` added.
    """
    event = access_event(record, system, unpersistable(), unpersistable(), _ACCESS_NAMESPACE)
    line = event["line"]
    event["log_flattened"] = {"line!s:": line, "line!:": line}
    event["worker"] = number
    return event
