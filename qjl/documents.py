"""Turning a file or stdin into the text of a document.

Plain text and Markdown for now (any suffix other than .pdf is read as text,
provided it is UTF-8); PDF and HTML extraction come later. Every problem with
the input is a `DocumentError` whose message is one line saying what is wrong
and what to do, so the CLI can print it as it is.
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

STDIN = "-"
STDIN_NAME = "<stdin>"
# Far above any context a model here can read (128k tokens are ~0.5 MB of text); a guard against reading
# /dev/zero or a disk image into memory, not a limit a real document meets.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024


class DocumentError(ValueError):
    """The document cannot be read or is not usable text (a user error, not a bug)."""


def read_document(path: str, stdin: BinaryIO | TextIO | None = None) -> tuple[str, str]:
    """Read a .txt/.md file (or stdin for "-") -> (text, display name).

    `stdin` replaces sys.stdin for "-" (binary or text stream). Raises DocumentError.
    """
    if path == STDIN:
        return decode_document(_read_stream(stdin if stdin is not None else sys.stdin), STDIN_NAME), STDIN_NAME
    return decode_document(_read_file(Path(path), path), path), path


def decode_document(data: bytes, name: str) -> str:
    """Bytes -> text, refusing what is not UTF-8 text; newlines normalised, a UTF-8 BOM dropped."""
    if data.startswith(b"%PDF-"):
        raise DocumentError(_pdf_message(name))
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DocumentError(f"{name} is UTF-16 text; convert it to UTF-8 first, "
                            f"e.g. iconv -f UTF-16 -t UTF-8 {_shell(name)} > doc.txt")
    if b"\x00" in data:
        raise DocumentError(f"{name} looks like a binary file (it contains NUL bytes); "
                            f"give a UTF-8 text file (.txt or .md)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"{name} is not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it to UTF-8, "
            f"e.g. iconv -f latin1 -t UTF-8 {_shell(name)} > doc.txt") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError(f"{name} is empty" + ("" if not text else " (only whitespace)")
                            + "; give a document with some text")
    return text


def _read_file(p: Path, name: str) -> bytes:
    if p.suffix.lower() == ".pdf" and p.is_file():
        raise DocumentError(_pdf_message(name))
    try:
        with open(p, "rb") as f:
            return _read_limited(f, name)
    except FileNotFoundError:
        raise DocumentError(f"{name}: no such file; check the path (use - to read the document from stdin)") from None
    except IsADirectoryError:
        raise DocumentError(f"{name} is a directory; give a text file (.txt or .md)") from None
    except PermissionError:
        raise DocumentError(f"{name}: permission denied; check the file's permissions (e.g. chmod u+r)") from None
    except OSError as e:
        if p.is_dir():  # some platforms open a directory and fail on read instead
            raise DocumentError(f"{name} is a directory; give a text file (.txt or .md)") from None
        raise DocumentError(f"cannot read {name}: {e.strerror or e}") from None


def _read_stream(stream: BinaryIO | TextIO) -> bytes:
    binary = getattr(stream, "buffer", stream)  # a text stdin has the bytes under .buffer
    try:
        data = _read_limited(binary, STDIN_NAME)
    except OSError as e:
        raise DocumentError(f"cannot read {STDIN_NAME}: {e.strerror or e}") from None
    if isinstance(data, str):  # a text stream without .buffer (e.g. io.StringIO)
        data = data.encode("utf-8", "surrogateescape")
    return data


def _read_limited(f, name: str) -> bytes:
    data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{name} is larger than {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB, far more than any "
                            f"model's context; give a smaller document or split it")
    return data


def _pdf_message(name: str) -> str:
    return (f"{name} is a PDF; PDF support is not available yet: extract its text first, "
            f"e.g. pdftotext {_shell(name)} doc.txt, and ask about doc.txt")


def _shell(name: str) -> str:
    """A file name as it would be typed in a shell (quoted when it has spaces or quotes)."""
    if name == STDIN_NAME:
        return "FILE"
    safe = all(c.isalnum() or c in "-_./+,:@%" for c in name)
    return name if safe else "'" + name.replace("'", "'\\''") + "'"


__all__ = ["DocumentError", "MAX_DOCUMENT_BYTES", "STDIN", "decode_document", "read_document"]
