"""qjl.documents: text in, and a clean one-line DocumentError for everything that is not usable text."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjl.documents import DocumentError, decode_document, read_document


def test_text_and_markdown(tmp_path):
    for name in ("notes.txt", "notes.md", "notes.rst"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf# Title\r\nBody caf\xc3\xa9.\r\n")  # BOM and CRLF
        text, display = read_document(str(path))
        assert text == "# Title\nBody café.\n" and display == str(path)


def test_stdin_binary_and_text_streams():
    assert read_document("-", stdin=io.BytesIO(b"from a pipe\n")) == ("from a pipe\n", "<stdin>")
    assert read_document("-", stdin=io.StringIO("typed text")) == ("typed text", "<stdin>")
    with pytest.raises(DocumentError, match="<stdin> is empty"):
        read_document("-", stdin=io.BytesIO(b""))


@pytest.mark.parametrize("data, fragment", [
    (b"", "is empty; give a document"),
    (b" \n\n\t ", "only whitespace"),
    (b"\x00\x01\x02", "binary"),
    (b"abc\xffdef", "byte 0xff at offset 3"),
    (b"%PDF-1.4\n", "PDF support is not available yet"),
    (b"\xfe\xff\x00h", "UTF-16"),
])
def test_unusable_bytes(data, fragment):
    with pytest.raises(DocumentError, match=fragment.replace("(", r"\(")):
        decode_document(data, "doc.txt")


def test_file_problems(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        read_document(str(tmp_path / "missing.md"))
    with pytest.raises(DocumentError, match="is a directory"):
        read_document(str(tmp_path))
    pdf = tmp_path / "scan.PDF"
    pdf.write_bytes(b"not even a real pdf")
    with pytest.raises(DocumentError, match="PDF support is not available yet"):
        read_document(str(pdf))


def test_size_guard(tmp_path, monkeypatch):
    import qjl.documents as documents

    monkeypatch.setattr(documents, "MAX_DOCUMENT_BYTES", 10)
    path = tmp_path / "big.txt"
    path.write_text("x" * 11)
    with pytest.raises(DocumentError, match="larger than"):
        read_document(str(path))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_hostile_bytes_give_text_or_a_one_line_error(data):
    try:
        text = decode_document(data, "doc.txt")
    except DocumentError as e:
        assert "\n" not in str(e) and str(e).startswith("doc.txt")
    else:
        assert text.strip() and "\x00" not in text and "\r" not in text


def _without_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1).filter(lambda t: _without_bom(t).strip() and "\x00" not in t))
def test_utf8_text_round_trips(text):
    expected = _without_bom(text).replace("\r\n", "\n").replace("\r", "\n")
    assert decode_document(text.encode("utf-8"), "doc.txt") == expected
