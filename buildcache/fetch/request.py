"""
What a caller asks the fetcher for (:class:`UpstreamRequest`) and what
each client of a download gets back (:class:`UpstreamAnswer`).

A request also says who may share its download (:meth:`UpstreamRequest.may_join`).
Two requests for one key share one download unless their credentials,
conditions or checks differ.  The checks include the digest: a request
that expects a sha256 or size may join a running download that expects
the same, or one that expects none, never one that expects another.  When
it joins one that checks less than it wants (:meth:`UpstreamRequest.checks_beyond`),
the fetcher checks the finished body against the joiner's expectation
before it answers the joiner, and fails that answer with
:class:`buildcache.store.IntegrityError` on a mismatch (or with
:class:`buildcache.fetch.errors.CacheWriteError` when the body could not
be kept whole to be checked); the download itself, and its other clients,
are not affected.  Callers never compare digests themselves.

``Vary`` is judged by a :class:`VariantRule` the request carries: the
HTTP rules live above the fetcher (:mod:`buildcache.engine.variants`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from attrs import Attribute, Factory, field, frozen

from buildcache.store import Store

if TYPE_CHECKING:
    from buildcache.fetch.reader import DownloadBody


class BodyVerifier(Protocol):
    """
    Checks a body while it streams; ``finish`` raises on a mismatch.
    """

    def update(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class VariantRule(Protocol):
    """
    How the responses for one key split into ``Vary`` variants: where a
    response is stored, who may share it, and what goes once it is stored.
    """

    def stored_key(
        self, family: str, secret: bytes, response_headers: Mapping[str, str],
        sent: Mapping[str, str],
    ) -> str | None:
        """
        The key a response (``response_headers``) to a request for
        ``family`` sent with ``sent`` headers is stored under (an HMAC
        under ``secret`` may name the variant), or None when no later
        request can use it (``Vary: *``).
        """

    def same_variant(
        self, response_headers: Mapping[str, str], sent: Mapping[str, str],
        other_sent: Mapping[str, str],
    ) -> bool:
        """
        Whether the response to a request sent with ``other_sent`` headers
        also answers one sent with ``sent``.
        """

    def stored(self, store: Store, family: str, stored_key: str) -> None:
        """
        ``stored_key`` has just been stored: drop the variants of
        ``family`` that should not be kept beside it.
        """


#: Request headers that make an answer belong to that request alone.
_IDENTIFYING_HEADERS = (
    "authorization", "cookie", "if-none-match", "if-modified-since"
)


def _default_storable(status: int, headers: Mapping[str, str]) -> bool:
    return status == 200


def _no_flag(instance: Any, attribute: Attribute[Any], value: Any) -> None:
    if isinstance(value, bool):
        raise TypeError(
            "UpstreamRequest.variants takes a VariantRule (such as"
            " buildcache.engine.variants.URL_VARIANTS) or None, not a bool"
        )


def _compatible(mine: object, theirs: object) -> bool:
    """
    Whether two expectations of one body (a size, a digest) can both hold:
    either is unknown, or they are the same.
    """
    return mine is None or theirs is None or mine == theirs


def _lower(digest: str | None) -> str | None:
    return None if digest is None else digest.lower()


@frozen
class UpstreamRequest:
    """
    What to fetch for a cache key, and how to judge the answer.

    ``verify`` builds a checker for the body from the response headers
    (one against an apk index entry, say; it checks 200 responses only);
    ``expected_sha256``/``expected_size`` come from an index page.  When
    either is given, clients get the response only once the body is
    complete and checked, so a mismatch is a clean 502, never wrong bytes.

    ``stream_before_check`` trades that for speed on large files: clients
    are streamed the body as it arrives except its last
    :data:`buildcache.fetch.download.WITHHELD_TAIL` bytes, which are
    released only once the check passes; on a mismatch the response ends
    incomplete, which no client takes for a whole file.
    """

    key: str
    url: str
    headers: Mapping[str, str] = Factory(dict)
    expected_size: int | None = None
    expected_sha256: str | None = None
    verify: Callable[[Mapping[str, str]], BodyVerifier] | None = None
    #: ``verify`` checks every byte of the body: no sha256 of the whole
    #: body is taken for it but for the shared tier, which names bodies by
    #: theirs (see :meth:`needs_digest`).
    verify_covers_body: bool = False
    storable: Callable[[int, Mapping[str, str]], bool] = _default_storable
    follow_redirects: bool = False
    stream_before_check: bool = False
    #: ``key`` names a family of entries, one per ``Vary`` variant, split
    #: by this rule: the response is stored under its
    #: :meth:`VariantRule.stored_key`, and a request that joins a download
    #: whose response is another variant gets a download of its own.  For
    #: URL keys; None where every request of the key is sent alike.
    variants: VariantRule | None = field(default=None, validator=_no_flag)
    #: The stored entry a conditional request revalidates (a variant of
    #: ``key``): a 304 refreshes that one.
    revalidates: str | None = None
    #: Recorded with the stored body (:attr:`buildcache.store.Entry.source_digest`):
    #: how the index that vouched for it identifies it, so that a later
    #: version of that index can tell whether it still describes it.
    source_digest: str | None = None
    #: Whether the credentials the operator configured for this URL's
    #: origin go with it: for the mirror routes and the index, not for the
    #: forward proxy, where any allowed client names any path of the host.
    operator_credentials: bool = True
    #: The front end the bytes fetched are counted for (see
    #: :meth:`buildcache.fetch.events.FetchObserver.upstream_received`).
    front_end: str = "proxy"
    #: Whether the body may come from, and go to, a shared tier (see
    #: :mod:`buildcache.fetch.shared`): set by the engine for an immutable
    #: file asked without credentials.
    shared: bool = False

    def may_join(self, running: UpstreamRequest) -> bool:
        """
        Whether this request may share the answer of ``running`` (same key):
        not when they carry different credentials (one client's would
        reach another) or conditions (a 304 answers only the conditional
        one), nor a checked request a download nobody checks, nor when
        they expect different digests or sizes (see the module docstring).
        A request with a ``source_digest`` was checked against one version
        of an index entry: it joins only a download checked against that
        same version (a verifier built from an older entry is not its
        check), and gets its own otherwise.  Nor does a request for another
        URL join (a registry's layer is one key whatever repository asks
        for it): another upstream's failure is not its answer.
        (Whether the answer's ``Vary`` lets them share is known only once
        it arrives; see :meth:`buildcache.fetch.fetcher.Fetcher.fetch`.)
        """
        return (
            self.url == running.url
            and all(
                self.headers.get(name) == running.headers.get(name)
                for name in _IDENTIFYING_HEADERS
            )
            and self.revalidates == running.revalidates
            and self.operator_credentials == running.operator_credentials
            and (self.verify is None or running.verify is not None)
            and (self.source_digest is None or self.source_digest == running.source_digest)
            and _compatible(_lower(self.expected_sha256), _lower(running.expected_sha256))
            # A digest this request checks beyond the running one needs
            # that one to take it.
            and not (
                self.expected_sha256 is not None and running.expected_sha256 is None
                and running.verify_covers_body
            )
            and _compatible(self.expected_size, running.expected_size)
        )

    def checks_beyond(self, running: UpstreamRequest) -> bool:
        """
        Whether this request, joining ``running``, expects a digest or size
        that ``running`` does not check: the fetcher then checks the
        finished body for it (see the module docstring).
        """
        return (self.expected_sha256 is not None and running.expected_sha256 is None) or (
            self.expected_size is not None and running.expected_size is None
        )

    def needs_digest(self, shared: bool) -> bool:
        """
        Whether the sha256 of the whole body is to be taken as it is
        written: for a digest to check, for the store's record (which
        ``buildcache verify`` re-checks bodies by) and, when the body goes
        to the shared tier (``shared``), for its name there; not for a body
        its verifier checks whole (an apk package), whose stored copy is
        re-checked the same way.
        """
        return self.expected_sha256 is not None or not self.verify_covers_body or shared

    @property
    def checked(self) -> bool:
        return self.verify is not None or self.expected_sha256 is not None

    @property
    def holds_until_checked(self) -> bool:
        return self.checked and not self.stream_before_check

    @property
    def withholds_tail(self) -> bool:
        return self.checked and self.stream_before_check


@frozen
class UpstreamAnswer:
    """
    What one client of a download receives: the upstream status and
    end-to-end headers (lowercase names), and the body to stream.

    ``body`` is ``None`` for a 304 to a revalidation: the stored copy is
    current, and the caller serves it.
    """

    status: int
    headers: Mapping[str, str] = field(eq=False)
    body: DownloadBody | None
    #: Read from the shared tier, not fetched upstream: no byte of it
    #: crossed the upstream line.
    shared: bool = False
    #: The answer of a download whose body had all arrived, checked, when
    #: this request joined it (its row not yet in the store): nothing was
    #: asked of the upstream, or waited for, for this request.
    already_whole: bool = False

    @property
    def spared_the_line(self) -> bool:
        """
        No byte of it crossed the upstream line for this request: a hit.
        """
        return self.shared or self.already_whole
