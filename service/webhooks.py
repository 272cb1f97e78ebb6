"""Webhook URLs: which a study may name (``study.notify.url``) and how they are matched
against the operator's allow-list (``LSTM_HPO_WEBHOOK_ALLOW``), so a spec cannot make the
server call an internal address. A leaf module: the spec parser, the settings and the
sender (:mod:`service.notify`) share these rules.

Matching is by parts, never by string prefix: the scheme, host and port must be equal
(default ports filled in) and the URL's path must be the prefix's path or lie below it,
by whole segments. So ``https://hooks.example.com/ci`` allows
``https://hooks.example.com/ci/build-7`` but not ``https://hooks.example.com/ci-admin``,
``https://hooks.example.com.evil.net/ci`` or ``https://hooks.example.com@10.0.0.1/ci``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["MAX_URL_LENGTH", "UrlPrefix", "check_webhook_url", "parse_prefix", "url_allowed"]

MAX_URL_LENGTH = 2000
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class UrlPrefix:
    """One allow-list entry, parsed: lower-case scheme and host, the effective port, and a
    path without a trailing slash (``""`` for the whole host)."""

    scheme: str
    host: str
    port: int
    path: str

    def allows(self, url: str) -> bool:
        """Whether ``url`` (checked by :func:`check_webhook_url`) lies under this prefix."""
        try:
            other = _parts(url)
        except ValueError:
            return False
        if (other.scheme, other.host, other.port) != (self.scheme, self.host, self.port):
            return False
        return other.path == self.path or other.path.startswith(self.path + "/")


def _parts(url: str) -> UrlPrefix:
    """Split an absolute http(s) URL; ``ValueError`` saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        raise ValueError("must not contain spaces, control characters or backslashes")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError("has an invalid port") from None
    segments = parts.path.split("/")
    if any(unquote(s) in (".", "..") for s in segments):
        raise ValueError("must not contain '.' or '..' path segments")
    return UrlPrefix(scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))


def check_webhook_url(url: str) -> str:
    """``url`` when it is an absolute http(s) URL with a host, no user info and no dot
    segments; ``ValueError`` (its message is the rule) otherwise."""
    _parts(url)
    return url


def parse_prefix(prefix: str) -> UrlPrefix:
    """One ``LSTM_HPO_WEBHOOK_ALLOW`` entry; ``ValueError`` naming it when it is not an
    http(s) URL with a host, or has a query or fragment (a prefix is scheme, host, port
    and path)."""
    try:
        parsed = _parts(prefix)
    except ValueError as err:
        raise ValueError(f"webhook prefix {prefix!r}: {err}") from None
    parts = urlsplit(prefix)
    if parts.query or parts.fragment:
        raise ValueError(f"webhook prefix {prefix!r}: must not have a query or fragment")
    return parsed


def url_allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` lies under one of ``prefixes`` (an empty list allows nothing)."""
    return any(parse_prefix(prefix).allows(url) for prefix in prefixes)
