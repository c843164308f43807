"""Real PDF files for the tests, written with pypdf itself (no other PDF library is needed).

Each text page gets a Type1 Helvetica font resource and a content stream that shows its lines; an
image-only page has a content stream that paints an inline image and no text at all.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

from pypdf import PdfWriter
from pypdf.generic import DictionaryObject, NameObject, StreamObject


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _text_page(writer: PdfWriter, text: str) -> None:
    page = writer.add_blank_page(612, 792)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in text.splitlines():
        ops.append(f"({_escape(line)}) Tj T*")
    ops.append("ET")
    stream = StreamObject()
    stream.set_data("\n".join(ops).encode("latin-1"))
    page[NameObject("/Contents")] = writer._add_object(stream)


def _image_page(writer: PdfWriter) -> None:
    """A page that paints a 2x2 grey inline image: something to see, nothing to extract."""
    page = writer.add_blank_page(612, 792)
    stream = StreamObject()
    stream.set_data(b"q 200 0 0 200 72 500 cm BI /W 2 /H 2 /CS /G /BPC 8 ID \x00\xff\xff\x00 EI Q")
    page[NameObject("/Contents")] = writer._add_object(stream)


def make_pdf(pages: Sequence[Optional[str]], password: Optional[str] = None, algorithm: str = "RC4-128") -> bytes:
    """A PDF with one page per item: text, or None for an image-only page; encrypted when `password` is given
    (RC4 by default: pypdf decrypts it without the optional `cryptography` package)."""
    writer = PdfWriter()
    for text in pages:
        if text is None:
            _image_page(writer)
        else:
            _text_page(writer, text)
    if password is not None:
        writer.encrypt(user_password=password, owner_password="owner-" + password, algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
