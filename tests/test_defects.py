"""Issue 13's defects, each reproduced: inputs that cannot hurt, and exits that name the environment's problem.

Most use the scripted fake model (tests/conftest.py) or a real `qjl` process that stops before the model
loads; the ones marked slow run the embedded model (or its conversion).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from qjl_cli.main import ExitCode
from conftest import invoke, tiny_cache_file

REPO = Path(__file__).resolve().parents[1]
QJL = [sys.executable, "-m", "qjl_cli.main"]


@pytest.fixture(autouse=True)
def _isolated_home(qjl_home):
    return qjl_home



def one_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qjl: error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _env(home: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "QJL_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}
    env.pop("QJL_MODEL", None) if "QJL_MODEL" not in extra else None
    return env


def text_bomb(pages: int = 1, repeats: int = 12000) -> bytes:
    """A small PDF whose content stream repeats one text operator: each page extracts to repeats x 200 chars."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for _ in range(pages):
        page = writer.add_blank_page(612, 792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
        stream = DecodedStreamObject()
        stream.set_data(b"BT /F1 12 Tf 72 720 Td\n" + (b"(" + b"bomb " * 40 + b") Tj\n") * repeats + b"ET")
        page[NameObject("/Contents")] = writer._add_object(stream.flate_encode(level=9))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# --- 1. a long question as the last argument ------------------------------------------------------------
def test_question_longer_than_a_file_name(fake_model, doc):
    question = "why " * 80  # 320 bytes: is_file() raised ENAMETOOLONG
    result = invoke("ask", doc, question)
    assert result.exit_code == 0, result.output
    assert fake_model.calls["questions"] == [question]


# --- 2. every question against the context, before the prefill ---------------------------------------------
def test_question_too_long_for_the_context(fake_model, doc):
    line = one_error(invoke("ask", doc, "-q", "tell me more " * 2800, "--max-new-tokens", 8, "--json"),
                     ExitCode.TOO_LONG, "8,405 tokens", "8,192")
    assert "prefill" not in fake_model.calls or "questions" not in fake_model.calls
    assert "-" not in line.split("error:")[1].replace("--max-new-tokens", "")  # no negative count


# --- 3. a PDF text bomb ----------------------------------------------------------------------------------
def test_pdf_text_bomb_is_bounded(fake_model, tmp_path):
    fake_model.context_length = 1024  # 32,768 characters at most
    bomb = tmp_path / "bomb.pdf"
    bomb.write_bytes(text_bomb(pages=3))
    assert bomb.stat().st_size < 64_000  # 3 x 2.4 MB of text
    t0 = time.perf_counter()
    one_error(invoke("ask", bomb, "q"), ExitCode.TOO_LONG, "--truncate", "32,768 characters")
    result = invoke("ask", bomb, "q", "--truncate", "head")
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - t0 < 30
    kept = fake_model.calls["prefill"]["text"]
    assert len(kept) <= 32_768 and kept.startswith("[page 1]\nbomb bomb")
    assert "32,768 characters" in result.stderr  # the cut is reported


def test_pdf_text_bomb_library_bound():
    from qjl.documents import Bound, TextTooLongError, pdf_text

    data = text_bomb(pages=2)
    with pytest.raises(TextTooLongError, match="--truncate"):
        pdf_text(data, "bomb.pdf", bound=Bound(10_000))
    for keep in ("head", "tail", "middle"):
        bound = Bound(10_000, keep)
        text = pdf_text(data, "bomb.pdf", bound=bound)
        assert len(text) <= 10_000 and bound.cut > 0
    assert pdf_text(data, "bomb.pdf", bound=Bound(10_000, "head")).startswith("[page 1]")
    assert len(pdf_text(data, "bomb.pdf", bound=Bound(10_000, "tail"))) == 10_000


# --- 4. --max-new-tokens past the context ---------------------------------------------------------------
def test_max_new_tokens_past_the_context_is_a_usage_error(fake_model, doc):
    line = one_error(invoke("ask", doc, "Who?", "--max-new-tokens", 1_000_000_000), ExitCode.USAGE,
                     "--max-new-tokens", "8,192")
    assert "-999" not in line and "load" not in fake_model.calls


# --- 5. the environment: closed stdin and stdout, QJL_HOME ------------------------------------------------
def test_stdin_closed(tmp_path):
    proc = subprocess.run(["bash", "-c", 'exec 0<&-; exec "$@"', "qjl", *QJL, "ask", "-", "q"], capture_output=True,
                          text=True, env=_env(tmp_path / "home"), timeout=120)
    assert proc.returncode == ExitCode.DOCUMENT, proc.stderr
    assert "stdin is closed" in proc.stderr and "Traceback" not in proc.stderr


def test_stdout_closed_is_found_before_the_model(tmp_path, doc):
    proc = subprocess.run(["bash", "-c", 'exec 1>&-; exec "$@"', "qjl", *QJL, "ask", str(doc), "q"],
                          capture_output=False, stderr=subprocess.PIPE, text=True,
                          env=_env(tmp_path / "home", QJL_MODEL=str(tmp_path / "no-model.gguf")), timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "stdout is closed" in proc.stderr


def test_qjl_home_is_a_file(tmp_path, doc):
    home = tmp_path / "home"
    home.write_text("not a folder")
    proc = subprocess.run([*QJL, "ask", str(doc), "q"], capture_output=True, text=True, env=_env(home), timeout=300)
    assert proc.returncode == ExitCode.MODEL, proc.stderr
    assert f"QJL_HOME ({home}) is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_qjl_home_not_writable(tmp_path, monkeypatch):
    from qjl.models import ModelError, _conversion_folder

    def deny(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", deny)
    with pytest.raises(ModelError, match="cannot write under QJL_HOME .*writable folder"):
        _conversion_folder(tmp_path / "home" / "models")


# --- 6. SIGTERM, and conversions left by a killed process --------------------------------------------------
def test_stale_conversion_folders_are_removed(tmp_path):
    from qjl.models import ModelError, resolve_model

    models = Path(os.environ["QJL_HOME"]) / "models"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, old = models / ".convert-dead", models / ".convert-live", models / ".convert-unowned"
    for folder, owner in ((stale, dead.pid), (live, os.getpid()), (old, None)):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        if owner is not None:
            (folder / "owner.pid").write_text(str(owner))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with pytest.raises(ModelError):
        resolve_model(str(tmp_path / "no-such-model"))  # any run that resolves a model cleans up first
    assert not stale.exists() and not old.exists() and live.exists()


@pytest.mark.slow
def test_sigterm_during_the_conversion_cleans_up(tmp_path, doc):
    home = tmp_path / "home"
    proc = subprocess.Popen([*QJL, "ask", str(doc), "q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(home))
    try:
        deadline = time.monotonic() + 120
        while not list((home / "models").glob(".convert-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        folder = next((home / "models").glob(".convert-*"))
        assert (folder / "owner.pid").read_text() == str(proc.pid)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.TERMINATED, err
    assert "qjl: terminated" in err and "Traceback" not in err
    assert not list((home / "models").glob(".convert-*"))


# --- 7. smaller ones -------------------------------------------------------------------------------------------
def test_cache_save_checks_the_output_before_the_prefill(fake_model, doc, tmp_path):
    one_error(invoke("cache", "save", doc, "-o", tmp_path / "missing" / "doc.qjl"), ExitCode.CACHE_FILE,
              "does not exist")
    one_error(invoke("cache", "save", doc, "-o", tmp_path), ExitCode.USAGE, ".qjl")
    (tmp_path / "dir.qjl").mkdir()
    one_error(invoke("cache", "save", doc, "-o", tmp_path / "dir.qjl"), ExitCode.CACHE_FILE, "is a folder")
    assert "prefill" not in fake_model.calls and "load" not in fake_model.calls


def test_kv_other_than_the_files_mode(fake_model, doc, tmp_path, monkeypatch):
    import qjl_cli.answers as answers

    out = tmp_path / "doc.qjl"
    assert invoke("cache", "save", doc, "-o", out, "--kv", "qjl").exit_code == 0
    monkeypatch.setattr(answers, "inspect_cache", lambda file: {"config": {"kv": "qjl"}})
    one_error(invoke("ask", out, "Who?", "--kv", "turbo"), ExitCode.USAGE, "--kv qjl")
    assert invoke("ask", out, "Who?", "--kv", "qjl").exit_code == 0
    assert invoke("ask", out, "Who?").exit_code == 0


def test_document_and_questions_both_from_stdin(tmp_path):
    proc = subprocess.run([*QJL, "ask", "-", "--questions", "/dev/stdin"], input="A document.\n", capture_output=True,
                          text=True, env=_env(tmp_path / "home"), timeout=120)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "stdin cannot be both" in proc.stderr


def test_cache_file_sizes_are_checked_before_the_checksum(tmp_path, monkeypatch):
    import torch

    import qjl.cachefile as cachefile
    import qjl.store as store

    path = tmp_path / "huge.qjl"
    cfg = tiny_cache_file(path, {"layers.0.huge": torch.zeros(4 << 20)})  # 16 MB the geometry has no room for

    def hashed(*args):
        raise AssertionError("the whole file was hashed before its sizes were checked")

    monkeypatch.setattr(cachefile, "file_checksum", hashed)  # the torch-free reader hashes through this
    monkeypatch.setattr(store, "_checksum", hashed)
    with pytest.raises(store.CacheFileError, match="more than"):
        store.inspect_cache(path)
    with pytest.raises(store.CacheFileError, match="unexpected tensor layers.0.huge"):
        store.read_cache_file(path, cfg, "tiny", device="cpu", dtype=torch.float32)
