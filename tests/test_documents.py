"""qjl.documents: text in, and a clean one-line DocumentError for everything that is not usable text."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdf_maker import make_pdf
from qjl.documents import DocumentError, decode_document, read_document, read_documents


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
    (b"%PDF-1.4\n", "not a readable PDF"),
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
    with pytest.raises(DocumentError, match="scan.PDF is not a PDF"):
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


# --- PDF ---------------------------------------------------------------------------------------------------
def test_pdf_pages_are_marked(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["Annual report 2023", "Revenue was 4.2 million euros.\nCosts (all) fell.",
                               "Signed by Ana Ruiz."]))
    seen = []
    text, name = read_document(str(path), progress=lambda done, total, what: seen.append((done, total, what)))
    assert name == str(path)
    assert text == ("[page 1]\nAnnual report 2023\n\n[page 2]\nRevenue was 4.2 million euros.\nCosts (all) fell.\n\n"
                    "[page 3]\nSigned by Ana Ruiz.\n")
    assert seen == [(1, 3, str(path)), (2, 3, str(path)), (3, 3, str(path))]


def test_pdf_from_stdin_and_with_an_image_page():
    data = make_pdf(["Text on page one.", None])  # page 2 is an image: marked, empty
    text, name = read_document("-", stdin=io.BytesIO(data))
    assert name == "<stdin>" and text == "[page 1]\nText on page one.\n\n[page 2]\n"


def test_encrypted_pdf(tmp_path):
    path = tmp_path / "secret.pdf"
    path.write_bytes(make_pdf(["The code is 7741."], password="s3cret"))
    with pytest.raises(DocumentError, match=r"secret.pdf is encrypted and needs a password; give it with --password"):
        read_document(str(path))
    with pytest.raises(DocumentError, match="the password given with --password does not open"):
        read_document(str(path), password="wrong")
    assert read_document(str(path), password="s3cret")[0] == "[page 1]\nThe code is 7741.\n"
    # An empty user password (only an owner password set) opens without --password.
    path.write_bytes(make_pdf(["Open to all."], password=""))
    assert read_document(str(path))[0] == "[page 1]\nOpen to all.\n"


def test_aes_pdf_without_cryptography(tmp_path, monkeypatch):
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    def needs_cryptography(self, password):
        raise DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(PdfReader, "decrypt", needs_cryptography)
    path = tmp_path / "aes.pdf"
    path.write_bytes(make_pdf(["x"], password="pw"))
    with pytest.raises(DocumentError, match=r"encrypted with AES.*'cryptography'.*pip install cryptography"):
        read_document(str(path), password="pw")


def test_image_only_pdf(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None, None]))
    with pytest.raises(DocumentError, match=r"scan.pdf has no text layer .*ocrmypdf .*scan.pdf ocr.pdf"):
        read_document(str(path))


def test_damaged_pdf(tmp_path):
    path = tmp_path / "cut.pdf"
    path.write_bytes(make_pdf(["Some text."])[:40])
    with pytest.raises(DocumentError) as e:
        read_document(str(path))
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


# --- HTML and several files -------------------------------------------------------------------------------
PAGE = b"""<!DOCTYPE html><html><head><title>Water &amp; power</title><style>p { color: red }</style>
<script>var secret = "do not read";</script></head>
<body><h1>Cooperative</h1><p>The manager is <b>Ana&nbsp;Ruiz</b>.</p><ul><li>one</li><li>two</li></ul>
<noscript>enable js</noscript><table><tr><td>2023</td><td>4.2 M&euro;</td></tr></table></body></html>"""


def test_html_markup_is_stripped(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(PAGE)
    text, _ = read_document(str(path))
    assert text == "Water & power\n\nCooperative\n\nThe manager is Ana Ruiz.\n\none\n\ntwo\n\n2023 4.2 M\u20ac\n"
    assert "secret" not in text and "color" not in text and "enable js" not in text
    assert read_document("-", stdin=io.BytesIO(PAGE))[0] == text  # stdin: recognised by its doctype
    empty = tmp_path / "empty.htm"
    empty.write_bytes(b"<html><script>x()</script></html>")
    with pytest.raises(DocumentError, match="no text once the HTML markup is removed"):
        read_document(str(empty))


def test_several_documents_each_introduced_by_name(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.pdf"
    a.write_text("Minutes of the meeting.\n")
    b.write_bytes(make_pdf(["Budget: 10 euros."]))
    text, name = read_documents([str(a), str(b), "-"], stdin=io.BytesIO(b"From the pipe."))
    assert name == f"{a}, {b}, <stdin>"
    assert text == (f"=== {a} ===\nMinutes of the meeting.\n\n=== {b} ===\n[page 1]\nBudget: 10 euros.\n\n"
                    f"=== <stdin> ===\nFrom the pipe.\n")
    assert read_documents([str(a)]) == read_document(str(a))
    with pytest.raises(DocumentError, match="more than once"):
        read_documents(["-", "-"])
