"""
The S3 client of the shared tier: each request is a URL presigned by
botocore (no network of its own, credentials from the standard AWS chain,
resolved once) and sent with buildcache's own
:class:`~buildcache.fetch.client.UpstreamClient`, so bodies stream both
ways: an upload is read from the stored file with ``os.pread`` as the
connection takes it, and a download is read by the fetcher like any other.

Object names are relative to the location's prefix.  A presigned URL
carries a signature: it is never logged nor put in an error (errors name
the operation and the object).  Every failure of the store is a
:class:`SharedStoreError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from xml.etree import ElementTree

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from buildcache.fetch.client import UpstreamClient, read_bounded
from buildcache.shared.location import S3Location

__all__ = ["ObjectInfo", "ObjectStore", "ObjectStoreAPI", "SharedStoreError", "object_store"]

T = TypeVar("T")

#: How long a presigned URL is valid: long enough for a copy read by a
#: slow client through the fetcher.
URL_LIFETIME = 3600
#: Error bodies, listings: read this much at most.
_ERROR_LIMIT = 16 * 1024
_LIST_LIMIT = 8 * 1024 * 1024
#: An upload's time bound grows with its size: the store must take at
#: least this many bytes a second.
_MIN_UPLOAD_RATE = 1024 * 1024
_CHUNK = 256 * 1024

_log = Logger(namespace="buildcache.shared.s3")

_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class SharedStoreError(Exception):
    """
    The store failed: unreachable, too slow, or an answer other than
    expected (5xx, 403, ...).  The message names the operation and object,
    never a URL.
    """


@frozen
class ObjectInfo:
    #: Relative to the location's prefix.
    name: str
    size: int
    #: Unix seconds.
    last_modified: float
    etag: str | None = None


class ObjectStoreAPI(Protocol):
    """
    What the tier uses of :class:`ObjectStore` (and a test's in-memory
    store implements).
    """

    def get_url(self, name: str) -> str: ...

    async def get_small(
        self, name: str, limit: int, timeout: float | None = None
    ) -> bytes | None: ...

    async def put_small(
        self, name: str, data: bytes, *, if_absent: bool = False,
        timeout: float | None = None,
    ) -> bool: ...

    async def put_file(self, name: str, fd: int, size: int) -> None: ...

    async def head(self, name: str) -> ObjectInfo | None: ...

    async def delete(self, name: str, timeout: float | None = None) -> None: ...

    async def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[list[ObjectInfo], str | None]: ...


@implementer(IBodyProducer)
class _PreadProducer:
    """
    ``size`` bytes of ``fd`` from offset 0, read with ``os.pread`` a chunk
    at a time as the connection takes them (a push producer the
    connection pauses): never the whole body in memory, and the
    descriptor's own offset untouched.
    """

    def __init__(self, fd: int, size: int, clock: IReactorTime) -> None:
        self.length = size
        self._fd = fd
        self._clock = clock
        self._offset = 0
        self._paused = False
        self._stopped = False
        self._call: IDelayedCall | None = None
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._schedule()
        return self._done

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._stopped:
            self._call = self._clock.callLater(0, self._step)

    def _step(self) -> None:
        self._call = None
        if self._paused or self._stopped or self._consumer is None:
            return
        wanted = min(_CHUNK, self.length - self._offset)
        try:
            data = os.pread(self._fd, wanted, self._offset) if wanted else b""
        except OSError as e:
            self._stopped = True
            self._done.errback(e)
            return
        if len(data) != wanted:
            self._stopped = True
            self._done.errback(OSError(f"the file ended at {self._offset + len(data)} bytes"))
            return
        self._offset += wanted
        if data:
            self._consumer.write(data)
        if self._offset >= self.length:
            self._stopped = True
            self._done.callback(None)
            return
        self._schedule()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        # IBodyProducer: the Deferred of startProducing then never fires.
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _describe(error: BaseException) -> str:
    """What failed, without a URL (which would carry a signature)."""
    if isinstance(error, SharedStoreError):
        return str(error)
    if isinstance(error, (TimeoutError, CancelledError)):
        return "timed out"
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons:
        # ResponseNeverReceived and its kin wrap the reason that matters
        # (a certificate this node does not trust, a connection reset).
        inner = [r.value for r in reasons if isinstance(r, Failure)]
        if inner:
            return f"{type(error).__name__}: " + "; ".join(_describe(e) for e in inner)
    name = type(error).__name__
    if type(error).__module__.split(".")[0] in ("OpenSSL", "service_identity"):
        return f"the store's TLS certificate was not accepted ({name}: {error})"[:300]
    # Twisted's connection errors say which host and why; none of them
    # holds the request's URL.
    if isinstance(error, OSError) or "Error" in name:
        text = str(error)
        if "?" in text or "X-Amz" in text:
            return name
        return f"{name}: {text}"[:200]
    return name


@define
class ObjectStore:
    """
    One prefix of one bucket (see the module docstring).  Every method
    fails with :class:`SharedStoreError` only.
    """

    location: S3Location
    http: UpstreamClient
    clock: IReactorTime
    timeout: float = 10.0
    #: ``presign(operation, params, method)``: a presigned URL (botocore,
    #: see :func:`object_store`).  Holds the credentials: never shown.
    _presign: Callable[[str, Mapping[str, Any]], str] = field(
        kw_only=True, repr=False, eq=False
    )

    def _key(self, name: str) -> str:
        return self.location.prefix + name

    def _url(self, operation: str, name: str | None = None, **params: Any) -> str:
        if name is not None:
            params["Key"] = self._key(name)
        return self._presign(operation, {"Bucket": self.location.bucket, **params})

    def get_url(self, name: str) -> str:
        """A presigned GET of object ``name`` (valid :data:`URL_LIFETIME` s)."""
        return self._url("get_object", name)

    async def _bounded(self, work: Deferred[T], what: str, timeout: float | None) -> T:
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            work.cancel()

        timer = self.clock.callLater(self.timeout if timeout is None else timeout, expire)
        try:
            return await work
        except SharedStoreError:
            raise
        except Exception as e:
            # A cancelled request fails as the agent says (often
            # ResponseNeverReceived): the timer says why.
            why = "timed out" if expired else _describe(e)
            raise SharedStoreError(f"{what}: {why}") from None
        finally:
            if timer.active():
                timer.cancel()

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str] | None = None,
        body: IBodyProducer | None = None,
    ) -> IResponse:
        sent = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        response: IResponse = await self.http.request(
            method, url, headers=sent, allow_redirects=False,
            operator_credentials=False, body=body,
        )
        return response

    async def _fail(self, what: str, response: IResponse) -> SharedStoreError:
        body, _ = await read_bounded(response, _ERROR_LIMIT)
        found = _S3_CODE.search(body)
        code = f" {found.group(1).decode()}" if found else ""
        return SharedStoreError(f"{what}: HTTP {response.code}{code}")

    async def _discard(self, response: IResponse) -> None:
        await read_bounded(response, _ERROR_LIMIT)

    # -- operations ---------------------------------------------------------

    async def get_small(
        self, name: str, limit: int, timeout: float | None = None
    ) -> bytes | None:
        """
        Object ``name`` whole, if at most ``limit`` bytes; None when it
        does not exist.  A larger object is an error.
        """
        what = f"GET {name}"

        async def get() -> bytes | None:
            response = await self._send("GET", self._url("get_object", name))
            if response.code == 404:
                error, _ = await read_bounded(response, _ERROR_LIMIT)
                # A missing bucket is the store's failure, not a miss.
                if b"<Code>NoSuchBucket</Code>" in error:
                    raise SharedStoreError(f"{what}: HTTP 404 NoSuchBucket")
                return None
            if response.code != 200:
                raise await self._fail(what, response)
            body, complete = await read_bounded(response, limit)
            if not complete:
                raise SharedStoreError(f"{what}: larger than {limit} bytes")
            return body

        return await self._bounded(Deferred.fromCoroutine(get()), what, timeout)

    async def put_small(
        self, name: str, data: bytes, *, if_absent: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """
        Write object ``name``.  With ``if_absent`` (``If-None-Match: *``),
        False when it exists already (412: a store that does not honour
        the condition overwrites it and answers True).
        """
        what = f"PUT {name}"

        async def put() -> bool:
            headers = {"If-None-Match": "*"} if if_absent else {}
            response = await self._send(
                "PUT", self._url("put_object", name), headers, _BytesProducer(data)
            )
            # 409: a conditional write racing another on the same key.
            if if_absent and response.code in (409, 412):
                await self._discard(response)
                return False
            if response.code != 200:
                raise await self._fail(what, response)
            await self._discard(response)
            return True

        return await self._bounded(Deferred.fromCoroutine(put()), what, timeout)

    async def put_file(self, name: str, fd: int, size: int) -> None:
        """
        Write object ``name`` from the first ``size`` bytes of ``fd``,
        streamed (``os.pread``; the descriptor's offset is not used).
        """
        what = f"PUT {name}"

        async def put() -> None:
            response = await self._send(
                "PUT", self._url("put_object", name), {},
                _PreadProducer(fd, size, self.clock),
            )
            if response.code != 200:
                raise await self._fail(what, response)
            await self._discard(response)

        await self._bounded(
            Deferred.fromCoroutine(put()), what, self.timeout + size / _MIN_UPLOAD_RATE
        )

    async def head(self, name: str) -> ObjectInfo | None:
        """Object ``name``'s size and date; None when it does not exist."""
        what = f"HEAD {name}"

        async def head() -> ObjectInfo | None:
            response = await self._send("HEAD", self._url("head_object", name))
            await self._discard(response)
            if response.code == 404:
                return None
            if response.code != 200:
                raise SharedStoreError(f"{what}: HTTP {response.code}")
            headers = response.headers
            length = headers.getRawHeaders(b"content-length", [b""])[0]
            if not length.isdigit():
                raise SharedStoreError(f"{what}: no Content-Length")
            modified = 0.0
            date = headers.getRawHeaders(b"last-modified", [b""])[0]
            try:
                modified = parsedate_to_datetime(date.decode("latin-1")).timestamp()
            except (TypeError, ValueError):
                pass
            etag = headers.getRawHeaders(b"etag", [None])[0]
            return ObjectInfo(
                name, int(length), modified,
                etag.decode("latin-1") if etag is not None else None,
            )

        return await self._bounded(Deferred.fromCoroutine(head()), what, None)

    async def delete(self, name: str, timeout: float | None = None) -> None:
        """Remove object ``name``; a missing one is fine."""
        what = f"DELETE {name}"

        async def delete() -> None:
            response = await self._send("DELETE", self._url("delete_object", name))
            if response.code not in (200, 204, 404):
                raise await self._fail(what, response)
            await self._discard(response)

        await self._bounded(Deferred.fromCoroutine(delete()), what, timeout)

    async def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[list[ObjectInfo], str | None]:
        """
        One page (up to 1000) of the objects whose names start with
        ``prefix``, and the token of the next page (None: the last).
        """
        what = f"LIST {prefix or '(all)'}"
        params: dict[str, Any] = {"Prefix": self._key(prefix), "MaxKeys": 1000}
        if token is not None:
            params["ContinuationToken"] = token

        async def page() -> tuple[list[ObjectInfo], str | None]:
            response = await self._send("GET", self._url("list_objects_v2", **params))
            if response.code != 200:
                raise await self._fail(what, response)
            body, complete = await read_bounded(response, _LIST_LIMIT)
            if not complete:
                raise SharedStoreError(f"{what}: listing larger than {_LIST_LIMIT} bytes")
            try:
                return self._parse_listing(body)
            except (ElementTree.ParseError, ValueError) as e:
                raise SharedStoreError(f"{what}: unreadable listing ({e})") from None

        return await self._bounded(Deferred.fromCoroutine(page()), what, None)

    def _parse_listing(self, body: bytes) -> tuple[list[ObjectInfo], str | None]:
        root = ElementTree.fromstring(body)

        def local(element: ElementTree.Element) -> str:
            return element.tag.rsplit("}", 1)[-1]

        def text(parent: ElementTree.Element, name: str) -> str | None:
            for child in parent:
                if local(child) == name:
                    return child.text or ""
            return None

        found: list[ObjectInfo] = []
        strip = len(self.location.prefix)
        for element in root:
            if local(element) != "Contents":
                continue
            key = text(element, "Key") or ""
            if not key.startswith(self.location.prefix):
                continue
            modified = text(element, "LastModified") or ""
            try:
                when = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
            except ValueError:
                when = 0.0
            found.append(ObjectInfo(
                key[strip:], int(text(element, "Size") or "0"), when,
                text(element, "ETag"),
            ))
        truncated = (text(root, "IsTruncated") or "").lower() == "true"
        following = text(root, "NextContinuationToken") if truncated else None
        return found, following or None


def object_store(
    location: S3Location, http: UpstreamClient, clock: IReactorTime, timeout: float = 10.0
) -> ObjectStore:
    """
    An :class:`ObjectStore` whose URLs botocore presigns with the
    credentials of the standard AWS chain (the environment, the shared
    files, ...), resolved here, once (a blocking call: at start-up).
    Without any credentials the requests go unsigned.
    """
    import botocore
    import botocore.config
    import botocore.session

    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        _log.warn(
            "No AWS credentials found (environment, shared files): requests to the "
            "shared store {location} go unsigned", location=location.url(),
            event="shared_store_unsigned",
        )
    config = botocore.config.Config(
        signature_version="s3v4" if credentials is not None else botocore.UNSIGNED,
        s3={"addressing_style": "path"},
        region_name=location.region,
    )
    client = session.create_client(
        "s3", endpoint_url=location.endpoint, region_name=location.region, config=config
    )

    def presign(operation: str, params: Mapping[str, Any]) -> str:
        url: str = client.generate_presigned_url(
            operation, Params=dict(params), ExpiresIn=URL_LIFETIME
        )
        return url

    return ObjectStore(location, http, clock, timeout, presign=presign)
