"""Tar shards read as a stream: brace expansion of shard URLs, an incremental tar parser, WebDataset grouping."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Final

from aloader.errors import ShardFormatError
from aloader.storage._redact import redact_url

__all__ = ["TarStreamParser", "expand_braces", "split_key"]

_BLOCK: Final = 512
_RANGE: Final = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES: Final = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` (zero-padded to the width of the first bound) and ``{a,b}`` in ``pattern``.

    ``"s3://b/train-{000000..000002}.tar"`` gives three URLs; several braces multiply, left to right.
    """
    match = _RANGE.search(pattern)
    if match is not None:
        first, last = match.group(1), match.group(2)
        start, stop = int(first), int(last)
        if stop < start:
            raise ValueError(f"brace range {match.group(0)} in {pattern!r} counts down; write it low..high")
        width = len(first) if first.startswith("0") else 0
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [url for n in range(start, stop + 1) for url in expand_braces(f"{head}{n:0{width}d}{tail}")]
    match = _ALTERNATIVES.search(pattern)
    if match is not None:
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [url for option in match.group(1).split(",") for url in expand_braces(f"{head}{option}{tail}")]
    return [pattern]


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the extension the rest.

    ``"train/00042.seg.png"`` -> ``("train/00042", "seg.png")``.
    """
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension if dot else ""


class TarStreamParser:
    """Turns tar bytes, fed in chunks of any size, into ``(name, data)`` for each regular file, in order.

    Only what a shard needs is kept in memory: the current member. GNU long names and pax ``path`` records are
    honoured; directories, links and other members are skipped.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._buffer = bytearray()
        self._long_name: str | None = None
        self._ended = False
        self._offset = 0  # where the buffer starts in the shard: error messages say where it broke

    def feed(self, chunk: bytes) -> Iterator[tuple[str, bytes]]:
        """Add ``chunk`` and yield every member it completes."""
        if self._ended:
            return
        self._buffer += chunk
        buffer = self._buffer
        while len(buffer) >= _BLOCK:
            header = bytes(buffer[:_BLOCK])
            if header.count(0) == _BLOCK:  # an end-of-archive block
                self._ended = True
                buffer.clear()
                return
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ShardFormatError(
                    f"{redact_url(self.url)} is not a valid tar stream at byte offset {self._offset} ({exc})", self.url
                ) from None
            padded = -(-info.size // _BLOCK) * _BLOCK
            if len(buffer) < _BLOCK + padded:
                return  # wait for the rest of this member
            data = bytes(buffer[_BLOCK : _BLOCK + info.size])
            del buffer[: _BLOCK + padded]  # bytearray deletes from the front without moving the rest
            self._offset += _BLOCK + padded
            if info.type == tarfile.GNUTYPE_LONGNAME:
                self._long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                self._long_name = _pax_path(data) or self._long_name
            elif info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                name = self._long_name or info.name
                self._long_name = None
                yield name, data
            else:
                self._long_name = None

    def close(self) -> None:
        """The stream ended: fail if it stopped inside a member."""
        if not self._ended and self._buffer.strip(b"\0"):
            member = ""
            if len(self._buffer) >= _BLOCK:
                try:
                    name = tarfile.TarInfo.frombuf(bytes(self._buffer[:_BLOCK]), "utf-8", "surrogateescape").name
                    member = f" {self._long_name or name!r}"
                except tarfile.HeaderError:
                    pass
            raise ShardFormatError(
                f"{redact_url(self.url)} ended at byte offset {self._offset + len(self._buffer)} in the middle of "
                f"the tar member{member} starting at byte offset {self._offset} (truncated shard?)",
                self.url,
            )


def _pax_path(data: bytes) -> str | None:
    # Records are "<length> <key>=<value>\n".
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        length = int(data[position:space])
        record = data[space + 1 : position + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        position += length
    return None
