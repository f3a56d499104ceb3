"""URL parsing: which backend reads a URL, the store root it belongs to, and the path inside that store."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from aloader.errors import UnsupportedURLError

__all__ = ["Location", "Scheme", "parse_url", "redact_url"]

Scheme = Literal["file", "s3", "gs", "az", "http", "https"]

_REMOTE_ALIASES: dict[str, Scheme] = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "abfs": "az",
    "abfss": "az",
    "http": "http",
    "https": "https",
}


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed URL: ``root`` identifies one store (``s3://bucket``, ``http://host:port``, or ``""`` for local
    files) and ``path`` is the key inside it (for local files, the filesystem path)."""

    url: str
    scheme: Scheme
    root: str
    path: str

    def child(self, path: str) -> str:
        """The URL of ``path`` in the same store, spelled like ``url`` was (``file://`` or a plain path)."""
        if self.scheme == "file":
            return f"file://{path}" if self.url.startswith("file://") else path
        return f"{self.root}/{path}"


def parse_url(url: str) -> Location:
    """Split ``url`` into its store and path; a plain path (no scheme) is a local file."""
    if not isinstance(url, str) or not url:
        raise UnsupportedURLError(f"expected a URL or path string, got {url!r}", str(url))
    if "://" not in url:
        return Location(url, "file", "", url)
    parts = urlsplit(url)
    raw_scheme = parts.scheme.lower()
    if raw_scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsupportedURLError(f"file URLs must be file:///absolute/path, got {redact_url(url)}", url)
        return Location(url, "file", "", unquote(parts.path))
    scheme = _REMOTE_ALIASES.get(raw_scheme)
    if scheme is None:
        raise UnsupportedURLError(
            f"unsupported URL scheme {raw_scheme!r} in {redact_url(url)}: use a local path, file://, s3://, gs://, "
            "az://, http:// or https://",
            url,
        )
    if not parts.netloc:
        raise UnsupportedURLError(f"missing bucket or host in {redact_url(url)}", url)
    path = parts.path.lstrip("/")
    if parts.query or parts.fragment:
        # A query would be dropped by the object-store client; say so rather than read the wrong object.
        raise UnsupportedURLError(f"URLs with a query or fragment are not supported: {redact_url(url)}", url)
    return Location(url, scheme, f"{raw_scheme}://{parts.netloc}", path)


_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact_url(text: str) -> str:
    """``text`` with the query string of every http(s) URL in it replaced: pre-signed URLs carry secrets there."""
    return _QUERY.sub(r"\1?<redacted>", text)
