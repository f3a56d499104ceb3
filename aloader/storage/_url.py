"""URL parsing: which backend reads a URL, the store root it belongs to, and the path inside that store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from aloader.errors import UnsupportedURLError
from aloader.storage._redact import redact_url

__all__ = ["Location", "Scheme", "parse_url"]

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
    files) and ``path`` is the key inside it (for local files, the filesystem path). ``query`` is the URL's query
    string, kept only where it is a credential: an Azure SAS token (``az://container/key?sv=...&sig=...``) or a
    pre-signed HTTP(S) URL's signature."""

    url: str
    scheme: Scheme
    root: str
    path: str
    query: str = ""

    @property
    def client_url(self) -> str:
        """The URL a client is made for: the store root, or the whole URL of a pre-signed HTTP(S) object (its
        signature is only valid for that one object)."""
        if self.query and self.scheme in ("http", "https"):
            return f"{self.root}/{self.path}?{self.query}"
        return self.root

    @property
    def key(self) -> str:
        """The path to ask the client for (empty for a pre-signed HTTP(S) URL: its client is rooted at it)."""
        if self.query and self.scheme in ("http", "https"):
            return ""
        return self.path

    def child(self, path: str) -> str:
        """The URL of ``path`` in the same store, spelled like ``url`` was (``file://`` or a plain path), with the
        same SAS token when there is one."""
        if self.scheme == "file":
            return f"file://{path}" if self.url.startswith("file://") else path
        return f"{self.root}/{path}" + (f"?{self.query}" if self.query else "")


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
    if parts.fragment:
        raise UnsupportedURLError(f"URLs with a fragment are not supported: {redact_url(url)}", url)
    if parts.query and scheme not in ("az", "http", "https"):
        # A query would be dropped by the object-store client; say so rather than read the wrong object.
        raise UnsupportedURLError(
            f"URLs with a query are not supported for {raw_scheme}:// (only an Azure SAS token on az:// URLs, or a "
            f"pre-signed http(s):// URL): {redact_url(url)}",
            url,
        )
    return Location(url, scheme, f"{raw_scheme}://{parts.netloc}", path, parts.query)
