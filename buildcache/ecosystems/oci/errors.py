"""
The registry port's error bodies, in the distribution spec's form::

    {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "...", "detail": {}}]}

:class:`OciErrors` is the port's ``ErrorFormat`` (see
:meth:`buildcache.engine.core.Engine.begin`): every error the engine or the
front end sends for a request of this port goes through it, so a client
(docker, containerd, skopeo) reads the code it knows instead of a line of
text.  The code follows the status, and a 404 names what was not found
(a manifest, a blob, a repository).
"""

from __future__ import annotations

import json

from attrs import frozen

__all__ = [
    "CONTENT_TYPE",
    "OciErrors",
    "code_for",
    "error_body",
    "MANIFEST_UNKNOWN",
    "BLOB_UNKNOWN",
    "NAME_UNKNOWN",
    "NAME_INVALID",
    "DIGEST_INVALID",
    "TOOMANYREQUESTS",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "UNAVAILABLE",
    "UNKNOWN",
]

CONTENT_TYPE = "application/json; charset=utf-8"

MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
BLOB_UNKNOWN = "BLOB_UNKNOWN"
NAME_UNKNOWN = "NAME_UNKNOWN"
NAME_INVALID = "NAME_INVALID"
DIGEST_INVALID = "DIGEST_INVALID"
TOOMANYREQUESTS = "TOOMANYREQUESTS"
UNAUTHORIZED = "UNAUTHORIZED"
DENIED = "DENIED"
UNSUPPORTED = "UNSUPPORTED"
UNAVAILABLE = "UNAVAILABLE"
UNKNOWN = "UNKNOWN"

#: Status -> code, for statuses whose code does not depend on the request.
_BY_STATUS = {
    400: NAME_INVALID,
    401: UNAUTHORIZED,
    403: DENIED,
    405: UNSUPPORTED,
    406: MANIFEST_UNKNOWN,
    416: BLOB_UNKNOWN,
    429: TOOMANYREQUESTS,
    500: UNKNOWN,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

#: Longest message put in a body (messages may quote what a client sent).
MAX_MESSAGE = 400


def code_for(status: int, not_found: str = NAME_UNKNOWN) -> str:
    """
    The spec's code for ``status``; a 404 is ``not_found`` (what the
    request was for), another unlisted status UNKNOWN.
    """
    if status == 404:
        return not_found
    return _BY_STATUS.get(status, UNAVAILABLE if status >= 500 else UNKNOWN)


def error_body(code: str, message: str, detail: object = None) -> bytes:
    """One error in the spec's JSON form."""
    entry = {
        "code": code,
        "message": message[:MAX_MESSAGE],
        "detail": detail if detail is not None else {},
    }
    return (json.dumps({"errors": [entry]}) + "\n").encode("utf-8")


@frozen
class OciErrors:
    """
    An ``ErrorFormat``: ``(status, message) -> (content type, body)``.

    ``not_found`` is the code of a 404 (MANIFEST_UNKNOWN for a manifest
    request, BLOB_UNKNOWN for a blob, NAME_UNKNOWN otherwise); ``code``,
    when given, is used whatever the status (a refusal the front end
    decided before answering, such as DIGEST_INVALID).
    """

    not_found: str = NAME_UNKNOWN
    code: str | None = None

    def __call__(self, status: int, message: str) -> tuple[str, bytes]:
        code = self.code if self.code is not None else code_for(status, self.not_found)
        return CONTENT_TYPE, error_body(code, message)
