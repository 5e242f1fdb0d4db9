"""
What the kernel tells of a client's progress in taking a response (the
send-stall deadline of :class:`buildcache.frontends.channel.ProxyChannel`):
:class:`SendCounters`, read through ``ISystemHandle.getHandle``.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

import attrs

__all__ = ["SEND_STALL_TIMEOUT", "SendCounters", "send_counters", "send_progressed"]

#: Seconds a response may wait while the client takes none of the bytes
#: sent to it; a client that stops reading is then disconnected.
SEND_STALL_TIMEOUT = 60.0

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a __u64 at this offset
# since Linux 4.2; older kernels return a shorter struct.
_TCPI_BYTES_ACKED = 120
_TCP_INFO_SIZE = _TCPI_BYTES_ACKED + 8


@attrs.frozen
class SendCounters:
    """
    What the kernel tells of the bytes sent to a client, each None when it
    cannot be told.

    :ivar acknowledged: bytes the client's TCP has acknowledged since the
        connection opened (``TCP_INFO``'s ``tcpi_bytes_acked``, Linux;
        None on other sockets).
    :ivar queued: bytes in the socket's send queue (``SIOCOUTQ``, Linux).
    """

    acknowledged: int | None
    queued: int | None


def send_progressed(before: SendCounters, now: SendCounters) -> bool:
    """
    Whether a client took some of a response over a stall period: its TCP
    acknowledged more bytes, or the socket's send queue shrank (the one
    signal a UNIX socket gives).  Twisted resumes a paused response only
    once its own buffer is empty, which a slow reader may take longer than
    a period to allow; these counts move as soon as the client takes
    anything.  Unknown counts show no progress.
    """
    if (
        before.acknowledged is not None
        and now.acknowledged is not None
        and now.acknowledged > before.acknowledged
    ):
        return True
    return (
        before.queued is not None
        and now.queued is not None
        and now.queued < before.queued
    )


def send_counters(transport: Any) -> SendCounters:
    """
    The :class:`SendCounters` of ``transport``'s socket, reached through
    ``ISystemHandle.getHandle``; both None for a transport without one.
    """
    try:
        handle = transport.getHandle()
        descriptor = handle.fileno()
    except (AttributeError, OSError, ValueError):
        return SendCounters(None, None)
    acknowledged: int | None
    try:
        info = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        acknowledged = (
            struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0]
            if len(info) >= _TCP_INFO_SIZE
            else None
        )
    except (AttributeError, OSError, TypeError, ValueError):
        acknowledged = None
    queued: int | None
    try:
        reply = fcntl.ioctl(descriptor, termios.TIOCOUTQ, b"\0" * 4)
        queued = struct.unpack("i", reply)[0]
    except (OSError, TypeError, ValueError):
        queued = None
    return SendCounters(acknowledged, queued)
