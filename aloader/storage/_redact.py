"""The one place that decides what of a URL or a storage option may be shown: every message, repr and log line
that names a URL or an option goes through here.

Hidden: the values of a URL's query (pre-signed signatures, Azure SAS tokens live there), a URL's userinfo
(``user:password@``), the values of storage options whose names look secret, and the values of the credential
variables of the environment that the clouds' clients read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["REDACTED", "is_secret_option", "option_secrets", "redact", "redact_url"]

REDACTED: Final = "<redacted>"

_SECRET_WORDS: Final = ("secret", "key", "token", "password", "sas", "credential", "signature", "auth")
_ENV_PREFIXES: Final = ("AWS_", "AZURE_", "GOOGLE_", "GCS_", "OBJECT_STORE_")

# A URL inside any text: its scheme, optional userinfo, the rest up to an optional query and fragment.
_URL: Final = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s/?#@'\"<>]*@)?(?P<rest>[^\s?#'\"<>]*)"
    r"(?P<query>\?[^\s#'\"<>]*)?"
)
_QUERY_VALUE: Final = re.compile(r"=([^&;]*)")


def is_secret_option(name: str) -> bool:
    """Whether the storage option (or environment variable) ``name`` looks like it holds a secret."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def option_secrets(options: Mapping[str, Any]) -> list[str]:
    """The values of ``options`` that must never be shown (option values whose names look secret)."""
    return [value for key, value in options.items() if isinstance(value, str) and is_secret_option(key)]


def _environment_secrets() -> list[str]:
    # Read each time: tests and long-running programs change the environment.
    return [
        value
        for name, value in os.environ.items()
        if name.upper().startswith(_ENV_PREFIXES) and is_secret_option(name) and value
    ]


def _redact_match(match: re.Match[str]) -> str:
    shown = match["scheme"]
    if match["userinfo"]:
        shown += f"{REDACTED}@"
    shown += match["rest"]
    query = match["query"]
    if query:
        # Keep the parameter names (they say what kind of URL it is: a SAS, a pre-signed URL), drop every value.
        shown += _QUERY_VALUE.sub(f"={REDACTED}", query) if "=" in query else f"?{REDACTED}"
    return shown


def redact_url(text: str) -> str:
    """``text`` with every URL's userinfo and query values replaced by ``<redacted>``."""
    return _URL.sub(_redact_match, text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` safe to show: URLs redacted, and no value of ``secrets`` or of the environment's credentials."""
    for secret in [*secrets, *_environment_secrets()]:
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return redact_url(text)
