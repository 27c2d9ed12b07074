"""Reading one UTF-8 file safely: in blocks of whole lines, so memory stays bounded whatever its size; invalid
UTF-8 reported with its exact byte offset, UTF-16, binary and empty files by name. Every reader of text files
(plain text, CSV, JSON Lines, labelled data, prompts) goes through `decoded_blocks`."""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import DataError, NotFoundError

BLOCK_BYTES = 1 << 20  # bytes read at a time
MAX_PIECE_CHARS = 16 << 20  # a line longer than this is passed on in parts (with split_long_lines)
NUL = b"\x00"


def decoded_blocks(path: Path, errors: str, split_long_lines: bool = False) -> Iterator[str]:
    """Text of `path` in blocks of whole lines; names the byte offset of invalid UTF-8 and rejects binary files.

    With `split_long_lines`, a line longer than MAX_PIECE_CHARS is passed on in parts, so memory stays
    bounded even for text without line breaks.
    """
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; remove it from the inputs")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset, carry = getattr(path, "start", 0), ""  # a FileBlock (data/parts.py) is a byte range of its file
    stop = getattr(path, "stop", None)
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = f.read(BLOCK_BYTES if stop is None else min(BLOCK_BYTES, stop - offset))
            if offset == 0 and block[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(
                    f"{path}: UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8 "
                    "(e.g. iconv -f UTF-16 -t UTF-8), which gptforge reads"
                )
            if NUL in block:
                raise DataError(
                    f"{path}: NUL byte at byte {offset + block.index(NUL)}; this looks like a binary "
                    "file, not text (remove it from the inputs)"
                )
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: invalid UTF-8 at byte {offset - pending + e.start}; "
                    "convert the file to UTF-8 or pass --encoding-errors replace"
                ) from None
            if offset == 0 and text.startswith("\ufeff"):
                text = text[1:]  # byte order mark
            offset += len(block)
            if not block:
                if text:
                    yield text
                break
            cut = text.rfind("\n") + 1
            if not cut and split_long_lines and len(text) > MAX_PIECE_CHARS:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


LINE_END = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def split_lines(block: str) -> list[str]:
    """Lines with their ends, broken at \n, \r\n and \r only: U+2028, U+0085 and the other breaks that
    str.splitlines() knows are text inside a JSON string or a CSV field, not the end of a row."""
    return LINE_END.findall(block)


def read_text_file(path: str | os.PathLike, errors: str = "strict") -> str:
    """A whole UTF-8 text file, with the same checks as every other reader (missing, empty, binary, bad
    UTF-8 with its byte offset, no text at all)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    text = "".join(decoded_blocks(path, errors))
    if not text.strip():
        raise DataError(f"{path}: no text in this file (only blank lines); remove it from the inputs")
    return text


def read_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """The lines of a UTF-8 file (line ends kept), read in blocks with the checks every reader makes (missing,
    empty, binary, bad UTF-8 with its byte offset); for readers of their own formats (data/labelled.py)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    for block in decoded_blocks(path, errors):
        yield from split_lines(block)


def fingerprint(path: Path) -> dict:
    """A file's content hash (not timestamps), so a copied file reuses shards and an edited one rebuilds them."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "blake2b": h.hexdigest()}


__all__ = [
    "BLOCK_BYTES",
    "MAX_PIECE_CHARS",
    "decoded_blocks",
    "fingerprint",
    "split_lines",
    "read_lines",
    "read_text_file",
]
