"""
Answering a ``twisted.web`` request with a stored object or an upstream
answer: status, replayed headers, ``X-Cache``, conditional 304, single byte
ranges, HEAD, and the streamed body.  Every front end answers through here
(mostly by way of :meth:`buildcache.engine.core.Engine.respond`), so every
cached response behaves the same whichever port served it; the cache
status sent is also the one accounting records (:func:`set_cache_status`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from twisted.web.http_headers import Headers
from twisted.web.server import Request

from buildcache.engine.body import BodySender, BodySource, StoredBody, send_now
from buildcache.engine.conditional import RangeOutcome, not_modified, parse_range
from buildcache.engine.exchanges import CacheStatus, client_gone, exchange_of
from buildcache.engine.hot import remember
from buildcache.fetch.fetcher import REPLAYED_HEADERS, UpstreamAnswer
from buildcache.store import StoredObject

#: Upstream headers passed to clients: those stored with an object, and
#: those that give meaning to an error or redirect (which are not stored).
_PASSED_ON = (REPLAYED_HEADERS - {"date"}) | {"location", "retry-after", "www-authenticate"}


#: Sent with a stale answer instead of the usual lifetime: the client (uv,
#: a downstream cache) should come back as soon as it can, by when the
#: upstream may answer again.
STALE_CACHE_CONTROL = "max-age=0"


def request_headers(request: Request) -> dict[str, str]:
    """
    The request's headers as one lowercase-keyed dict (see
    :func:`joined_header`).
    """
    result: dict[str, str] = {}
    for raw_name, values in request.requestHeaders.getAllRawHeaders():
        name = raw_name.decode("latin-1").lower()
        result[name] = joined_header(name, [v.decode("latin-1") for v in values])
    return result


def joined_header(name: str, values: list[str]) -> str:
    """
    The one value of a header field sent on several lines: joined with
    ``", "`` (RFC 9110 section 5.3), except ``Cookie``, whose pairs are
    separated by ``"; "`` (RFC 6265 section 5.4: a comma would run two
    cookies into one value).
    """
    return ("; " if name.lower() == "cookie" else ", ").join(values)


def set_cache_status(request: Request, status: CacheStatus) -> None:
    """
    Say how ``request`` is being served: ``X-Cache`` for the client, and
    the record accounting reads (see :mod:`buildcache.engine.exchanges`).
    For a front end that renders its answer itself (the pip index's pages);
    the ``serve_*`` functions call it.
    """
    request.setHeader("x-cache", status.value)
    record = exchange_of(request)
    if record is not None:
        record.served(status)


def _set_headers(
    request: Request,
    headers: Mapping[str, str],
    status: CacheStatus,
    cache_control: str | None,
    extra: Mapping[str, str],
) -> None:
    for name, value in headers.items():
        if name in _PASSED_ON:
            request.setHeader(name, value)
    if cache_control is not None:
        request.setHeader("cache-control", cache_control)
    set_cache_status(request, status)
    for name, value in extra.items():
        request.setHeader(name, value)


def _send(
    request: Request,
    source: BodySource,
    size: int | None,
    headers: Mapping[str, str],
    stored_at: float | None,
) -> None:
    """
    Send ``source`` (``size`` bytes, or unknown) honouring conditionals,
    Range and HEAD; headers other than length and range are already set.
    """
    wanted = request_headers(request)
    if not_modified(wanted, headers, stored_at):
        request.setResponseCode(304)
        source.close()
        request.finish()
        return
    if size is None:
        # Length unknown until the download ends: whole body, chunked.
        BodySender(
            request, source, 0, None, refuse=_refuse_unsent(request)
        ).start()
        return
    request.setHeader("accept-ranges", "bytes")
    ranged = parse_range(
        wanted.get("range"), size, if_range=wanted.get("if-range"),
        stored_headers=headers,
    )
    if ranged.outcome is RangeOutcome.UNSATISFIABLE:
        # Not the object: none of its headers, and nothing to keep.
        for name in (*_PASSED_ON, "content-type"):
            request.responseHeaders.removeHeader(name)
        request.setHeader("cache-control", "no-store")
        request.setResponseCode(416)
        request.setHeader("content-range", ranged.content_range or "")
        request.setHeader("content-length", "0")
        source.close()
        request.finish()
        return
    if ranged.outcome is RangeOutcome.PARTIAL:
        request.setResponseCode(206)
        request.setHeader("content-range", ranged.content_range or "")
    request.setHeader("content-length", str(ranged.length))
    if request.method == b"HEAD" or ranged.length == 0:
        source.close()
        request.finish()
        return
    start, end = ranged.start, ranged.end + 1
    if isinstance(source, StoredBody):
        # A hit: usually all of it goes out at once, here.
        reached = send_now(request, source, start, end)
        if reached == end:
            source.close()
            request.finish()
            return
        if reached is not None:
            start = reached
    BodySender(request, source, start, end, refuse=_refuse_unsent(request)).start()


def _refuse_unsent(request: Request) -> Callable[[str], None]:
    """
    What a body that fails before anything went out is answered with: a
    clean 502 (not the headers of the answer it could not give), rather than
    a connection closed without a response.
    """
    def refuse(why: str) -> None:
        request.responseHeaders = Headers()
        send_error(request, 502, f"the upstream body failed: {why}")

    return refuse


def serve_stored(
    request: Request,
    stored: StoredObject,
    status: CacheStatus,
    cache_control: str | None = None,
    extra_headers: Mapping[str, str] = {},
    repeatable: bool = False,
) -> None:
    """
    Answer from the store (a HIT, REVALIDATED or STALE response).
    ``repeatable``: the same request would be answered the same while the
    store does not change (a hit of an immutable, unprivate entry), so
    its answer may be remembered (see :mod:`buildcache.engine.hot`).
    """
    if client_gone(request):
        stored.close()
        return
    if status is CacheStatus.STALE:
        cache_control = STALE_CACHE_CONTROL
    entry = stored.entry
    body = StoredBody(stored)
    request.setResponseCode(200)
    if not extra_headers and _sent_whole(request, body, status, cache_control, repeatable):
        return
    _set_headers(request, entry.headers, status, cache_control, extra_headers)
    _send(request, body, entry.size, entry.headers, entry.fetched_at)


#: Request headers that make a stored answer other than the whole body.
_SHAPING = (b"range", b"if-none-match", b"if-modified-since")
#: The passed-on stored headers of recent entries, as Twisted writes them,
#: by the id of the entry's headers mapping (kept alive beside them): at
#: most BLOCKS_KEPT of them and BLOCKS_BYTES_KEPT bytes of fields (an entry
#: may store 64 KiB of headers), per process, so at most 8 times that in a
#: server of 8 workers.
_BLOCKS: dict[int, tuple[Mapping[str, str], tuple[tuple[bytes, bytes], ...]]] = {}
BLOCKS_KEPT = 4096
BLOCKS_BYTES_KEPT = 4 * 1024 * 1024
#: Bytes of the fields in _BLOCKS (one counter, mutated in place).
_blocks_bytes = [0]


def _stored_block(headers: Mapping[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    """
    ``headers``' fields passed on to clients, with names and values exactly
    as Twisted's ``Headers`` holds and writes them; made once per stored
    entry (bounded) instead of once per hit.
    """
    kept = _BLOCKS.get(id(headers))
    if kept is not None and kept[0] is headers:
        return kept[1]
    scratch = Headers()
    for name, value in headers.items():
        if name in _PASSED_ON:
            scratch.setRawHeaders(name, [value])
    block = tuple(
        (name, value) for name, values in scratch.getAllRawHeaders() for value in values
    )
    size = sum(len(name) + len(value) for name, value in block)
    if len(_BLOCKS) >= BLOCKS_KEPT or _blocks_bytes[0] + size > BLOCKS_BYTES_KEPT:
        _BLOCKS.clear()
        _blocks_bytes[0] = 0
    _BLOCKS[id(headers)] = (headers, block)
    _blocks_bytes[0] += size
    return block


def _sent_whole(
    request: Request, body: StoredBody, status: CacheStatus, cache_control: str | None,
    repeatable: bool,
) -> bool:
    """
    Send a stored hit's whole body, with a head made from the entry's
    precomputed header block, when it can go straight to the socket (see
    :func:`buildcache.engine.body.send_now`) and nothing shapes the answer
    (a range, a conditional, HEAD).  The head is byte for byte the one the
    ordinary path writes.  False, with nothing sent or set, otherwise.
    """
    size = body.available()
    if request.method != b"GET" or size == 0:
        return False
    asked = request.requestHeaders
    for name in _SHAPING:
        if asked.hasHeader(name):
            return False
    fields: dict[bytes, Sequence[bytes]] = dict(request.responseHeaders.getAllRawHeaders())
    for name, value in _stored_block(body.stored.entry.headers):
        fields[name] = [value]
    if cache_control is not None:
        fields[b"Cache-Control"] = [b" ".join(cache_control.encode().splitlines())]
    fields[b"X-Cache"] = [status.value.encode()]
    fields[b"Accept-Ranges"] = [b"bytes"]
    fields[b"Content-Length"] = [b"%d" % (size,)]
    parts = [
        request.clientproto, b" 200 ", request.code_message, b"\r\n",
    ]
    for name, values in fields.items():
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    reached = send_now(request, body, 0, size, head=head)
    if reached is None:
        return False
    record = exchange_of(request)
    if record is not None:
        record.served(status)
    if reached < size:
        BodySender(request, body, reached, size).start()
        return True
    if repeatable:
        remember(request, head, body.stored.entry)
    body.close()
    request.finish()
    return True


def serve_answer(
    request: Request,
    answer: UpstreamAnswer,
    cache: CacheStatus,
    cache_control: str | None = None,
    extra_headers: Mapping[str, str] = {},
) -> None:
    """
    Answer with a download (``cache`` says which: a MISS, or a HIT when
    no byte crossed the line for it, see
    :attr:`~buildcache.fetch.request.UpstreamAnswer.spared_the_line`),
    streaming it as it arrives.

    A 200 gets the same conditional and range handling as a hit: the
    whole object is being fetched into the cache and the requested range is
    served from it as soon as those bytes are there.  Other statuses pass
    through unchanged.
    """
    assert answer.body is not None
    if client_gone(request):
        answer.body.close()
        return
    headers = answer.headers
    _set_headers(request, headers, cache, cache_control, extra_headers)
    request.setResponseCode(answer.status)
    length = headers.get("content-length")
    size = int(length) if length is not None and length.isdigit() else None
    if answer.status != 200:
        if size is not None:
            request.setHeader("content-length", str(size))
        if request.method == b"HEAD":
            answer.body.close()
            request.finish()
            return
        BodySender(
            request, answer.body, 0, size, refuse=_refuse_unsent(request)
        ).start()
        return
    _send(request, answer.body, size, headers, None)


def serve_head(
    request: Request,
    answer: UpstreamAnswer,
    cache: CacheStatus,
    cache_control: str | None = None,
    extra_headers: Mapping[str, str] = {},
) -> None:
    """
    Answer a HEAD that missed with the upstream's answer to a HEAD (a
    MISS; a HIT when the shared tier's record answered it, as ``cache``
    says): its status and headers, its ``Content-Length``, no body.
    """
    if client_gone(request):
        return
    headers = answer.headers
    _set_headers(request, headers, cache, cache_control, extra_headers)
    length = headers.get("content-length")
    if answer.status == 200 and not_modified(request_headers(request), headers, None):
        request.setResponseCode(304)
        request.finish()
        return
    request.setResponseCode(answer.status)
    if length is not None and length.isdigit():
        request.setHeader("content-length", length)
        if answer.status == 200:
            # What a GET of it would offer (uv reads wheels by ranges).
            request.setHeader("accept-ranges", "bytes")
    request.finish()


def send_error(request: Request, code: int, message: str) -> None:
    """
    Finish ``request`` with ``code`` and a one-line explanation: in the
    form its front end chose when it began the request (see
    :meth:`buildcache.engine.exchanges.Exchanges.begin`), else plain text.
    """
    record = exchange_of(request)
    if record is not None and record.errors is not None:
        content_type, body = record.errors(code, message)
        send_text(request, code, body, content_type=content_type)
        return
    send_text(request, code, f"{code} {message}\n".encode("utf-8", "replace"))


def send_text(
    request: Request, code: int, body: bytes, cache_control: str = "no-store",
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    """
    Finish ``request`` with a small body (plain text unless said otherwise).
    """
    if client_gone(request):
        return
    record = exchange_of(request)
    if record is not None:
        record.failed()
    request.setResponseCode(code)
    request.setHeader("content-type", content_type)
    request.setHeader("content-length", str(len(body)))
    request.setHeader("cache-control", cache_control)
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
