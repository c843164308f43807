"""Turning files or stdin into the text of a document.

Plain text and Markdown (any suffix that is not PDF or HTML is read as text, provided it is UTF-8);
PDF through pypdf, one "[page N]" marker before each page's text so answers can name pages; HTML with
the markup stripped by the standard library's html.parser (script and style dropped). Several files
make one document, each introduced by its name. Every problem with the input is a `DocumentError`
whose message is one line saying what is wrong and what to do, so the CLI can print it as it is.
"""

from __future__ import annotations

import codecs
import html.parser
import io
import logging
import re
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence, TextIO

from .errors import DocumentError  # noqa: F401 - re-exported
from .truncation import Bound, TextTooLongError, max_chars_for  # noqa: F401 - re-exported

STDIN = "-"
STDIN_NAME = "<stdin>"
# Far above any context a model here can read (128k tokens are ~0.5 MB of text); a guard against reading
# /dev/zero or a disk image into memory, not a limit a real document meets. PDFs are mostly images and
# fonts, so they get more room.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_PDF_BYTES = 512 * 1024 * 1024
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
# progress(done, total, what): pages of a PDF extracted so far.
Progress = Callable[[int, int, str], None]
# A page's content stream is parsed only up to CONTENT_BYTES_PER_CHAR bytes per character still wanted (pypdf
# takes microseconds a byte); past that the page is cut and its text counts as over the bound (qjl/truncation.py).
CONTENT_BYTES_PER_CHAR = 4


def read_document(path: str, stdin: BinaryIO | TextIO | None = None, password: Optional[str] = None,
                  progress: Optional[Progress] = None, bound: Optional[Bound] = None) -> tuple[str, str]:
    """Read a .txt/.md/.pdf/.html file (or stdin for "-") -> (text, display name).

    `stdin` replaces sys.stdin for "-" (binary or text stream); `password` opens an encrypted PDF;
    `progress(done, total, name)` is called per PDF page; `bound` limits the text (a PDF's pages are not read
    past it). Raises DocumentError (TextTooLongError past the bound without `bound.keep`).
    """
    bound = bound or Bound()
    if path == STDIN:
        stream = stdin if stdin is not None else sys.stdin
        if stream is None:  # fd 0 closed (`exec 0<&-`): Python has no sys.stdin
            raise DocumentError("- reads the document from stdin, but stdin is closed; pipe the document in or "
                                "give its file name")
        data = _read_stream(stream)
        text = document_text(data, STDIN_NAME, password=password, progress=progress, bound=bound)
        return bound.apply(text, STDIN_NAME), STDIN_NAME
    p = Path(path)
    limit = MAX_PDF_BYTES if p.suffix.lower() == ".pdf" else MAX_DOCUMENT_BYTES
    data = _read_file(p, path, limit)
    text = document_text(data, path, suffix=p.suffix.lower(), password=password, progress=progress, bound=bound)
    return bound.apply(text, path), path


def read_documents(paths: Sequence[str], stdin: BinaryIO | TextIO | None = None, password: Optional[str] = None,
                   progress: Optional[Progress] = None, bound: Optional[Bound] = None) -> tuple[str, str]:
    """Several documents as one: each introduced by a line `=== NAME ===`; one path is read_document's text.

    `bound` applies to each document and to them all together."""
    if not paths:
        raise DocumentError("no document given; name a file, or - for stdin")
    if list(paths).count(STDIN) > 1:
        raise DocumentError("- (stdin) is given more than once; stdin can be read only once")
    bound = bound or Bound()
    if len(paths) == 1:
        return read_document(paths[0], stdin=stdin, password=password, progress=progress, bound=bound)
    parts, names = [], []
    for path in paths:
        text, name = read_document(path, stdin=stdin, password=password, progress=progress, bound=bound)
        parts.append(f"=== {name} ===\n{text.strip()}\n")
        names.append(name)
    names_text = ", ".join(names)
    return bound.apply("\n".join(parts), names_text), names_text


def document_text(data: bytes, name: str, suffix: str = "", password: Optional[str] = None,
                  progress: Optional[Progress] = None, bound: Optional[Bound] = None) -> str:
    """The bytes of one document -> its text, by content (PDF magic) or suffix (.pdf, .html)."""
    if data.startswith(b"%PDF-") or (suffix == ".pdf" and data.lstrip()[:5] == b"%PDF-"):
        return pdf_text(data, name, password=password, progress=progress, bound=bound)
    if suffix == ".pdf":
        if not data.strip():
            raise DocumentError(f"{name} is empty; give a document with some text")
        raise DocumentError(f"{name} is not a PDF (it does not start with %PDF-); check the file, or rename it "
                            f"if it is text")
    if suffix in HTML_SUFFIXES or (suffix == "" and _looks_like_html(data)):
        return html_text(data, name)
    return decode_document(data, name)


def decode_document(data: bytes, name: str) -> str:
    """Bytes -> text, refusing what is not UTF-8 text; newlines normalised, a UTF-8 BOM dropped."""
    if data.startswith(b"%PDF-"):
        return pdf_text(data, name)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DocumentError(f"{name} is UTF-16 text; convert it to UTF-8 first, "
                            f"e.g. iconv -f UTF-16 -t UTF-8 {_shell(name)} > doc.txt")
    if b"\x00" in data:
        raise DocumentError(f"{name} looks like a binary file (it contains NUL bytes); "
                            f"give a text, Markdown, HTML or PDF file")
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


# --- PDF -----------------------------------------------------------------------------------------------
def pdf_text(data: bytes, name: str, password: Optional[str] = None, progress: Optional[Progress] = None,
             bound: Optional[Bound] = None) -> str:
    """Text of every page, each after a "[page N]" line. Encrypted: the empty password, else `password`.

    With a `bound`, pages past it are not read, and a page's content is parsed only as far as the bound needs."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    pdf_logger = logging.getLogger("pypdf")
    level = pdf_logger.level
    pdf_logger.setLevel(logging.ERROR)  # pypdf warns about every repaired xref; that is not the user's business
    try:
        try:
            reader = PdfReader(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - pypdf raises many types for damaged files
            raise DocumentError(f"{name} is not a readable PDF ({_one_line(e)}); check that the file is complete, "
                                f"or extract its text with another tool (e.g. pdftotext) and ask about that") from None
        if reader.is_encrypted:  # a password for a PDF that needs none is ignored: it does no harm
            _decrypt(reader, name, password)
        try:
            n = len(reader.pages)
        except DependencyError:
            raise DocumentError(_aes_message(name)) from None
        except Exception as e:  # noqa: BLE001
            raise DocumentError(f"{name} is not a readable PDF ({_one_line(e)}); check that the file is "
                                f"complete") from None
        if n == 0:
            raise DocumentError(f"{name} is a PDF with no pages; give a document with some text")
        text, with_text = _pages_text(reader, n, name, progress, bound or Bound())
    finally:
        pdf_logger.setLevel(level)
    if not with_text:
        pages = "its page has" if n == 1 else f"none of its {n} pages has"
        raise DocumentError(f"{name} has no text layer ({pages} any text; a scan or images?); run OCR on it "
                            f"first, e.g. ocrmypdf {_shell(name)} ocr.pdf, and ask about ocr.pdf")
    return text


def _pages_text(reader, n: int, name: str, progress: Optional[Progress], bound: Bound) -> tuple[str, int]:
    """(text of the pages within the bound, pages with text). Past the bound: head stops reading, tail and
    middle keep reading with the text cut back to the bound as it goes (memory stays proportional to it)."""
    parts, with_text, total, limit = [], 0, 0, bound.max_chars
    for i in range(n):
        want = None
        if limit is not None:
            want = limit + 1 - total if bound.keep in (None, "head") else limit + 1
        text, clipped = _page_text(reader, i, name, want)
        with_text += bool(text)
        part = f"[page {i + 1}]\n{text}\n" if text else f"[page {i + 1}]\n"
        parts.append(part)
        total += len(part) + 1
        if progress:
            progress(i + 1, n, name)
        if limit is None or not (clipped or total > (limit if bound.keep in (None, "head") else 2 * limit)):
            continue
        if bound.keep in (None, "head"):
            return bound.apply("\n".join(parts), name, more=True), with_text
        parts = [bound.apply("\n".join(parts), name, more=clipped)]
        total = len(parts[0]) + 1
    return "\n".join(parts), with_text


def _page_text(reader, i: int, name: str, want: Optional[int]) -> tuple[str, bool]:
    """(text of page i, clipped): with `want`, at most that many characters, and a content stream longer than
    CONTENT_BYTES_PER_CHAR x want bytes is cut there first (clipped: some of the page was not read)."""
    from pypdf.errors import DependencyError
    from pypdf.generic import DecodedStreamObject, NameObject

    clipped = False
    try:
        page = reader.pages[i]
        if want is not None:
            contents = page.get_contents()
            data = contents.get_data() if contents is not None else b""
            cap = CONTENT_BYTES_PER_CHAR * max(want, 0) + 4096
            if len(data) > cap:
                stream = DecodedStreamObject()
                stream.set_data(_clip(data, cap))
                page[NameObject("/Contents")] = stream
                clipped = True
        text = page.extract_text() or ""
    except DependencyError:
        raise DocumentError(_aes_message(name)) from None
    except Exception as e:  # noqa: BLE001
        if clipped:  # the cut content does not parse: the page is past the bound anyway
            return "", True
        raise DocumentError(f"cannot extract the text of page {i + 1} of {name} ({_one_line(e)}); "
                            f"extract it with another tool (e.g. pdftotext) and ask about that") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
    if want is not None and len(text) > want:
        text, clipped = text[:max(want, 0)], True
    return text, clipped


def _clip(data: bytes, cap: int) -> bytes:
    """The first `cap` bytes of a content stream or less, ending after a text operator (a token boundary)."""
    window = data[max(0, cap - 65536):cap]
    ends = [m.end() for m in re.finditer(rb"(?:Tj|TJ|ET|T\*|Td|TD|Tm)\s", window)]
    return data[:max(0, cap - 65536) + ends[-1]] if ends else data[:cap]


def _decrypt(reader, name: str, password: Optional[str]) -> None:
    from pypdf.errors import DependencyError

    try:
        ok = reader.decrypt(password if password is not None else "")
    except DependencyError:
        raise DocumentError(_aes_message(name)) from None
    except Exception as e:  # noqa: BLE001
        raise DocumentError(f"cannot decrypt {name} ({_one_line(e)}); decrypt it with another tool first, "
                            f"e.g. qpdf --decrypt") from None
    if not ok:
        if password is None:
            raise DocumentError(f"{name} is encrypted and needs a password; give it with --password")
        raise DocumentError(f"the password given with --password does not open {name}; check it")


def _aes_message(name: str) -> str:
    return (f"{name} is encrypted with AES, which needs the Python package 'cryptography'; install it "
            f"(pip install cryptography) or decrypt the file first, e.g. qpdf --decrypt {_shell(name)} plain.pdf")


# --- HTML ----------------------------------------------------------------------------------------------
_SKIP = {"script", "style", "noscript", "template", "svg", "head"}
_BLOCK = {"address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure",
          "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
          "pre", "section", "table", "tr", "ul", "title", "caption", "details", "summary"}


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.skip:
            self.parts.append(data)


def html_text(data: bytes, name: str) -> str:
    """Visible text of an HTML page (the title first); script, style and the rest of <head> dropped."""
    source = decode_document(data, name)
    parser = _TextExtractor()
    try:
        parser.feed(source)
        parser.close()
    except Exception as e:  # noqa: BLE001 - html.parser is lenient; this is a last resort
        raise DocumentError(f"cannot parse {name} as HTML ({_one_line(e)}); save the page as text and ask "
                            f"about that") from None
    lines = [" ".join(line.split()) for line in "".join(parser.parts).split("\n")]
    body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    title = " ".join("".join(parser.title).split())
    text = f"{title}\n\n{body}" if title and body else title or body
    if not text:
        raise DocumentError(f"{name} has no text once the HTML markup is removed; give a page with some text")
    return text + "\n"


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"\xef\xbb\xbf<!doctype html", b"\xef\xbb\xbf<html"))


# --- reading bytes ---------------------------------------------------------------------------------------
def _read_file(p: Path, name: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    try:
        with open(p, "rb") as f:
            return _read_limited(f, name, limit)
    except FileNotFoundError:
        raise DocumentError(f"{name}: no such file; check the path (use - to read the document from stdin)") from None
    except IsADirectoryError:
        raise DocumentError(f"{name} is a directory; give a text, Markdown, HTML or PDF file") from None
    except PermissionError:
        raise DocumentError(f"{name}: permission denied; check the file's permissions (e.g. chmod u+r)") from None
    except OSError as e:
        if p.is_dir():  # some platforms open a directory and fail on read instead
            raise DocumentError(f"{name} is a directory; give a text, Markdown, HTML or PDF file") from None
        raise DocumentError(f"cannot read {name}: {e.strerror or e}") from None


def _read_stream(stream: BinaryIO | TextIO) -> bytes:
    binary = getattr(stream, "buffer", stream)  # a text stdin has the bytes under .buffer
    try:
        data = _read_limited(binary, STDIN_NAME, MAX_PDF_BYTES)
    except OSError as e:
        raise DocumentError(f"cannot read {STDIN_NAME}: {e.strerror or e}") from None
    data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data  # io.StringIO
    if len(data) > MAX_DOCUMENT_BYTES and not data.startswith(b"%PDF-"):
        _too_large(STDIN_NAME, MAX_DOCUMENT_BYTES)
    return data


def _read_limited(f, name: str, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        _too_large(name, limit)
    return data


def _too_large(name: str, limit: int):
    raise DocumentError(f"{name} is larger than {limit // (1024 * 1024)} MiB, far more than any "
                        f"model's context; give a smaller document or split it")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _shell(name: str) -> str:
    """A file name as it would be typed in a shell (quoted when it has spaces or quotes)."""
    if name == STDIN_NAME:
        return "FILE"
    safe = all(c.isalnum() or c in "-_./+,:@%" for c in name)
    return name if safe else "'" + name.replace("'", "'\\''") + "'"


__all__ = ["Bound", "DocumentError", "MAX_DOCUMENT_BYTES", "STDIN", "TextTooLongError", "decode_document",
           "document_text", "html_text", "max_chars_for", "pdf_text", "read_document", "read_documents"]
