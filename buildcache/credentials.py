"""
Credentials the operator configured for upstreams.

This module owns, without network I/O:

- taking the user information off an upstream URL (``http://user:token@host/``)
  when it is configured, so that the URL the rest of the server sees, stores
  in keys, logs and shows carries no secret (:func:`split_userinfo`);
- finding credentials for an upstream in a netrc file (``machine HOST login
  USER password PASS``, the convention pip and curl follow;
  :func:`read_netrc`, :class:`NetrcCredentials`);
- which request gets which credentials (:class:`UpstreamCredentials`): only a
  request to the same origin (scheme, host, port) as the configured
  upstream, hop by hop, so a redirect to another origin never carries them;
- hiding credentials in what is shown: :func:`redact`, :func:`hide_userinfo`,
  :func:`masked_url`, :func:`shown_url`.

Nothing here speaks HTTP: the agent that adds the ``Authorization: Basic``
header is :class:`buildcache.fetch.credentials.CredentialsAgent`.

These are the cache's own credentials: responses fetched with them are
shared by every client, like any other upstream response.  The header is
added below the fetcher, so it is part of no cache key and of no request
the fetcher compares.
"""

from __future__ import annotations

import base64
import netrc
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs

from buildcache.access import InvalidHost, normalize_host

__all__ = [
    "Credentials",
    "Origin",
    "UpstreamCredentials",
    "NetrcCredentials",
    "hide_userinfo",
    "masked_url",
    "read_netrc",
    "readable_by_others",
    "redact",
    "shown_url",
    "split_userinfo",
    "without_userinfo",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}


@attrs.frozen
class Credentials:
    """
    A user name and password for HTTP Basic authentication.  Neither is
    ever part of ``repr()``: a logged object must not leak them.
    """

    username: str = attrs.field(repr=False)
    password: str = attrs.field(repr=False)

    def authorization(self) -> bytes:
        """
        The value of the ``Authorization`` header (RFC 7617, UTF-8).
        """
        pair = f"{self.username}:{self.password}".encode("utf-8")
        return b"Basic " + base64.b64encode(pair)


@attrs.frozen(order=True)
class Origin:
    """
    Where a request goes: scheme, normalised host (see
    :func:`buildcache.access.normalize_host`) and port, the default one filled
    in.
    """

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str | bytes) -> Origin:
        """
        The origin of an absolute http(s) URL.

        :raise ValueError: not an http(s) URL with a host and a valid port.
        """
        if isinstance(url, bytes):
            url = url.decode("latin-1")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError("not an http or https URL with a host")
        port = parts.port
        try:
            host = normalize_host(parts.hostname)
        except InvalidHost as error:
            raise ValueError(str(error)) from None
        return cls(scheme, host, _DEFAULT_PORTS[scheme] if port is None else port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def without_userinfo(url: str) -> str:
    """
    ``url`` with its user information (if any) removed; everything else is
    left as written.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def split_userinfo(url: str) -> tuple[str, Credentials | None]:
    """
    Take the user information off an upstream URL: ``"http://u:t@h/x"``
    gives ``("http://h/x", Credentials("u", "t"))``.  Both parts are
    percent-decoded, as pip does (a ``@`` or ``:`` in a token is written
    ``%40``, ``%3A``).  A URL without user information is returned with
    ``None``; one with a user name and no password gets an empty password.

    :raise ValueError: ``url`` cannot be split as a URL (the message does
        not quote it).
    """
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise ValueError(f"not a valid URL: {error}") from None
    if "@" not in parts.netloc:
        return url, None
    userinfo = parts.netloc.rpartition("@")[0]
    username, _, password = userinfo.partition(":")
    credentials = Credentials(unquote(username), unquote(password))
    return without_userinfo(url), credentials


def read_netrc(path: str) -> NetrcCredentials:
    """
    Read a netrc file.

    :raise ValueError: it cannot be read or parsed; the message gives the
        file and line, never the text there (it may be a password).
    """
    try:
        parsed = netrc.netrc(path)
    except netrc.NetrcParseError as error:
        # Its message quotes the offending token, which may be a password.
        raise ValueError(
            f"{error.filename or path} line {error.lineno}: not in netrc syntax"
            " (machine HOST login USER password PASS)"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read {path!r}: {error.strerror or error}") from None
    return NetrcCredentials.from_entries(parsed.hosts)


def readable_by_others(path: str) -> bool:
    """
    Whether users other than its owner may read the file at ``path`` (a
    netrc file should be mode 0600, as curl and pip expect); False when it
    cannot be examined.
    """
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


@attrs.frozen
class NetrcCredentials:
    """
    The entries of a netrc file: ``machine`` names (lowercase, without
    brackets) to credentials, and the ``default`` entry if there is one.
    """

    machines: Mapping[str, Credentials] = attrs.field(factory=dict, repr=False)
    default: Credentials | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_entries(
        cls, hosts: Mapping[str, tuple[str, str | None, str | None]]
    ) -> NetrcCredentials:
        """
        From ``netrc.netrc().hosts``: ``machine -> (login, account,
        password)``; ``"default"`` is the default entry.
        """
        machines: dict[str, Credentials] = {}
        default = None
        for machine, (login, _account, password) in hosts.items():
            credentials = Credentials(login or "", password or "")
            if machine == "default":
                default = credentials
            else:
                machines[_machine_name(machine)] = credentials
        return cls(machines, default)

    def for_host(self, host: str) -> Credentials | None:
        """
        The credentials of the ``machine`` entry naming ``host``, else those
        of the ``default`` entry, else ``None`` (as curl and pip read a
        netrc file).
        """
        return self.machines.get(_machine_name(host), self.default)


def _machine_name(host: str) -> str:
    try:
        return normalize_host(host)
    except InvalidHost:
        return host.strip().lower()


def _credential_pairs(
    values: Mapping[Origin, Credentials] | Iterable[tuple[Origin, Credentials]],
) -> Mapping[Origin, Credentials]:
    return dict(values.items() if isinstance(values, Mapping) else values)


@attrs.frozen
class UpstreamCredentials:
    """
    The credentials of each configured upstream, by origin.

    A request gets the credentials of its own origin only: a configured
    upstream's scheme, host and port must all match (``http://h`` and
    ``https://h`` are different origins, as are two ports of one host).
    """

    by_origin: Mapping[Origin, Credentials] = attrs.field(
        factory=dict, converter=_credential_pairs, repr=False
    )

    @classmethod
    def build(
        cls,
        urls: Iterable[tuple[str, Credentials | None]],
        netrc_entries: NetrcCredentials | None = None,
    ) -> UpstreamCredentials:
        """
        From configured upstream URLs (without user information) and the
        credentials their user information gave.  A URL's own credentials
        win; an upstream without any gets its host's netrc entry.  The
        first credentials given for an origin are kept.
        """
        table: dict[Origin, Credentials] = {}
        for url, own in urls:
            origin = Origin.of(url)
            credentials = own
            if credentials is None and netrc_entries is not None:
                credentials = netrc_entries.for_host(origin.host)
            if credentials is not None and origin not in table:
                table[origin] = credentials
        return cls(table)

    def __bool__(self) -> bool:
        return bool(self.by_origin)

    def __repr__(self) -> str:
        # The origins only: never the credentials.
        origins = ", ".join(str(origin) for origin in sorted(self.by_origin))
        return f"UpstreamCredentials(origins=[{origins}])"

    def for_url(self, url: str | bytes) -> Credentials | None:
        """
        The credentials to send with a request for ``url``, if any.
        """
        if not self.by_origin:
            return None
        try:
            origin = Origin.of(url)
        except ValueError:
            return None
        return self.by_origin.get(origin)

    def has(self, url: str) -> bool:
        """
        Whether requests for ``url`` are sent with credentials (for the
        status page).
        """
        return self.for_url(url) is not None


#: From a scheme's "//" to the last "@" of the same word: the user
#: information, however badly it was written (a raw "/" or "@" in a
#: token makes the URL parse another way).
_USERINFO_IN_TEXT = re.compile(r"(?<=//)[^\s'\"<>]*@")


def hide_userinfo(text: str) -> str:
    """
    ``text`` (a URL, or a message quoting URLs, well formed or not) with
    everything that could be user information replaced by ``***``: from
    ``//`` to the last ``@`` of the same word.  For error messages, where
    the URL may not even parse; it may hide more than the user
    information (``http://host/a@b`` becomes ``http://***@b``), never less.
    """
    return _USERINFO_IN_TEXT.sub("***@", text)


def masked_url(text: str) -> str:
    """
    ``text``, a URL as it was typed (it may not parse), fit for an error
    message: when it holds an ``@``, everything between ``//`` and its last
    ``@`` is ``***``, whatever characters a token there holds (``http://u:t
    'o k@host:99999/x`` shows as ``http://***@host:99999/x``).
    """
    if "@" not in text:
        return text
    scheme, separator, _ = text.partition("//")
    head = f"{scheme}{separator}" if separator else ""
    return f"{head}***@{text.rpartition('@')[2]}"


def shown_url(url: str, credentials: UpstreamCredentials) -> str:
    """
    A configured upstream URL (without user information) as the status page
    shows it: with ``***@`` before the host when requests to it carry
    credentials.
    """
    if not credentials.has(url):
        return url
    scheme, separator, rest = url.partition("://")
    return f"{scheme}{separator}***@{rest}" if separator else url


_USERINFO = re.compile(r"//[^/@]*@")


#: Query parameters of a presigned object-store URL that sign it or name
#: its key (the shared tier never logs one; this is the second line).
_SIGNED_QUERY = re.compile(
    r"(?i)([?&]X-Amz-(?:Signature|Credential|Security-Token)=)[^&#]*"
)


def redact(url: str) -> str:
    """
    A URL fit for logs and pages: credentials replaced by ``***`` (those
    in its userinfo, and a presigned URL's signature and key).
    """
    if "X-Amz-" in url or "x-amz-" in url:
        url = _SIGNED_QUERY.sub(r"\1***", url)
    if "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("//***@", url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
