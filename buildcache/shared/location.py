"""
Where the shared tier lives: the bucket, the prefix under it, and the S3
endpoint, parsed from ``--shared-store s3://BUCKET/PREFIX?endpoint=URL``.

Credentials never come from this URL (they come from the standard AWS
environment and files, see :mod:`buildcache.shared.s3`): one written
into it is refused, and the message does not repeat it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from attrs import frozen

__all__ = ["S3Location", "parse_shared_store"]

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9-]{1,32}")


@frozen
class S3Location:
    """
    A prefix of a bucket on an S3-compatible endpoint.
    """

    bucket: str
    #: "" or ending in "/".
    prefix: str
    #: ``http(s)://host[:port]``, without credentials or path.
    endpoint: str
    region: str = "us-east-1"

    def url(self) -> str:
        """The ``s3://`` form, for logs and the status page."""
        return f"s3://{self.bucket}/{self.prefix}?endpoint={self.endpoint}"


def _refuse_userinfo(netloc: str, what: str) -> None:
    if "@" in netloc:
        host = netloc.rsplit("@", 1)[1]
        raise ValueError(
            f"{what} carries credentials (***@{host}): credentials come from the "
            "AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or files, "
            "never from the URL"
        )


def parse_shared_store(text: str) -> S3Location:
    """
    ``s3://BUCKET/PREFIX?endpoint=URL[&region=R]``: the prefix is made to
    end in ``/`` (or is empty); the endpoint is an http(s) URL with a host
    and no path.

    :raises ValueError: with a message fit for the operator (credentials
        masked).
    """
    text = text.strip()
    # Credentials written into it (a secret key holds '/' and '+', which
    # would split it before its '@'): refused before anything is quoted.
    if "@" in text.split("?", 1)[0]:
        raise ValueError(
            "--shared-store: credentials do not go in the URL (they come from"
            " the AWS environment and files): s3://BUCKET/PREFIX?endpoint=URL"
        )
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError("--shared-store: not a URL") from None
    if parts.scheme != "s3":
        raise ValueError("--shared-store must look like s3://BUCKET/PREFIX?endpoint=URL")
    _refuse_userinfo(parts.netloc, "--shared-store")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        # Not quoted: what is not a bucket name may be anything.
        raise ValueError(
            "--shared-store: the part after s3:// is not a bucket name "
            "(3-63 lower-case letters, digits, dots, hyphens)"
        )
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")[:-1]):
        raise ValueError(f"--shared-store: the prefix {prefix!r} has an empty or dot segment")
    if parts.fragment:
        raise ValueError("--shared-store: a URL fragment (#...) means nothing here")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("--shared-store: the query must be endpoint=URL[&region=R]") from None
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ValueError(
            f"--shared-store: unknown parameter(s) {', '.join(sorted(unknown))} "
            "(known: endpoint, region)"
        )
    if any(len(values) != 1 for values in query.values()):
        raise ValueError("--shared-store: endpoint and region may each be given once")
    if "endpoint" not in query:
        raise ValueError("--shared-store needs ?endpoint=URL (the S3 endpoint, http(s)://host:port)")
    endpoint = query["endpoint"][0]
    try:
        where = urlsplit(endpoint)
        where.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError("--shared-store: the endpoint is not a URL") from None
    _refuse_userinfo(where.netloc, "--shared-store's endpoint")
    if where.scheme not in ("http", "https") or not where.hostname:
        raise ValueError("--shared-store: the endpoint must be http(s)://host[:port]")
    if where.path not in ("", "/") or where.query or where.fragment:
        raise ValueError(
            "--shared-store: the endpoint must be http(s)://host[:port], without a path "
            "(the bucket goes in s3://BUCKET/)"
        )
    region = query.get("region", ["us-east-1"])[0]
    if not _REGION.fullmatch(region):
        raise ValueError(f"--shared-store: {region!r} is not a region name")
    return S3Location(
        bucket=bucket, prefix=prefix,
        endpoint=f"{where.scheme}://{where.netloc}", region=region,
    )
