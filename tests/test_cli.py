"""The `qjl` command through Typer's CliRunner: outputs, options, and one exit code and one line per error.

Most tests use the scripted fake model (conftest.fake_model); tests marked slow run the embedded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qjl_cli.render as render
from qjl.config import ConfigError
from qjl_cli.main import ExitCode
from conftest import invoke

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "qjl" / "data" / "sample.txt"
JSON_FIELDS = {"answer", "model", "kv", "document_tokens", "prompt_tokens", "generated_tokens", "kv_bytes",
               "fp16_bytes", "bits_per_number", "prefill_s", "prefill_tokens_per_s", "first_token_s",
               "decode_ms_per_token"}



@pytest.fixture(autouse=True)
def _isolated_home(qjl_home):
    """Every CLI test gets its own QJL_HOME; tests of the real model override it with embedded_home."""
    return qjl_home



def assert_error(result, code: int, *fragments: str) -> str:
    """One `qjl: error:` line on stderr, nothing on stdout, the exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qjl: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- answers and output formats (fake model) -----------------------------------------------------------
def test_answer_alone_on_stdout(fake_model, doc):
    result = invoke("ask", doc, "Who is the general manager?")
    assert result.exit_code == 0, result.output
    assert result.stdout == "The general manager is Ana Ruiz.\n"
    assert "fake-model" in result.stderr and "bits/number" in result.stderr  # timings go to stderr
    assert fake_model.calls["load"]["spec"] is None
    assert fake_model.calls["ask"]["on_text"] is None  # stdout is not a terminal: printed at the end


def test_json_is_one_object_and_nothing_else(fake_model, doc):
    result = invoke("ask", doc, "Who is the general manager?", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole of stdout parses: nothing else was printed there
    assert JSON_FIELDS <= set(data)
    assert data["answer"] == "The general manager is Ana Ruiz."
    assert data["model"] == "fake-model" and data["kv"] == "turbo"
    assert data["prompt_tokens"] == data["document_tokens"] + data["question_tokens"] > data["document_tokens"]
    assert data["generated_tokens"] == 6 and data["bits_per_number"] == 3.0
    assert result.stderr == ""


def test_stdin_as_document(fake_model):
    result = invoke("ask", "-", "Who?", input="Minutes of the meeting.\nAna Ruiz chaired it.\n")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["prefill"]["text"] == "Minutes of the meeting.\nAna Ruiz chaired it.\n"
    assert "<stdin>" in json.loads(invoke("ask", "-", "Who?", "--json", input="Text.").stdout)["document"]


def test_options_reach_the_session(fake_model, doc):
    result = invoke("ask", doc, "Who?", "--kv", "exact", "--max-new-tokens", 3, "--prefill-chunk", 64,
                    "-m", "some/model", "--json")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["load"]["spec"] == "some/model"
    assert fake_model.calls["session"]["config"].kv == "exact"
    assert fake_model.calls["prefill"]["chunk"] == 64
    assert fake_model.calls["prefill"]["max_new_tokens"] == 3
    assert fake_model.calls["ask"]["max_new_tokens"] == 3
    data = json.loads(result.stdout)
    assert data["kv"] == "exact" and data["generated_tokens"] == 3
    assert result.stderr.startswith("qjl: warning: the answer stopped at --max-new-tokens 3")  # never cut silently


def test_streams_on_a_terminal(fake_model, doc, monkeypatch):
    monkeypatch.setattr(render, "is_terminal", lambda stream: True)  # stdout and stderr "are" terminals
    result = invoke("ask", doc, "Who?")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["ask"]["on_text"] is not None
    assert result.stdout == "The general manager is Ana Ruiz.\n"
    assert "Loaded fake-model" in result.stderr  # the progress path ran (bars are transient)

    result = invoke("ask", doc, "Who?", "--no-stream")  # a spinner counts the tokens; the answer comes at the end
    assert result.exit_code == 0, result.output
    assert result.stdout == "The general manager is Ana Ruiz.\n"


def test_version_and_help():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("qjl ")
    for args in (["--help"], ["ask", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "Exit codes" in text and "130 interrupted" in text and "6 document too long" in text
    text = invoke("ask", "--help").stdout
    assert "qjl ask report.pdf" in text and "--truncate" in text and "QJL_MODEL" in text and ".gguf" in text


# --- bad input documents: exit 3 ----------------------------------------------------------------------
def test_missing_file(fake_model, tmp_path):
    assert_error(invoke("ask", tmp_path / "nope.txt", "Who?"), ExitCode.DOCUMENT, "nope.txt", "no such file")
    assert "load" not in fake_model.calls  # input errors come before the (slow) model load


def test_directory(fake_model, tmp_path):
    assert_error(invoke("ask", tmp_path, "Who?"), ExitCode.DOCUMENT, "is a directory")


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    (b"  \n\t\r\n", "is empty"),
    (b"caf\xe9 au lait\n", "not valid UTF-8"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary"),
    (b"\xff\xfeh\x00i\x00", "UTF-16"),
])
def test_unusable_text(fake_model, tmp_path, content, fragment):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    assert_error(invoke("ask", path, "Who?"), ExitCode.DOCUMENT, fragment)


def test_binary_file_with_text_suffix(fake_model, tmp_path):
    path = tmp_path / "image.md"
    path.write_bytes(bytes(range(256)) * 4)
    assert_error(invoke("ask", path, "Who?"), ExitCode.DOCUMENT, "binary")


def test_damaged_pdf(fake_model, tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    assert_error(invoke("ask", path, "Who?"), ExitCode.DOCUMENT, "report.pdf is not a readable PDF")
    assert "load" not in fake_model.calls


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(fake_model, doc):
    doc.chmod(0)
    assert_error(invoke("ask", doc, "Who?"), ExitCode.DOCUMENT, "permission denied")


def test_unreadable_file_simulated(fake_model, doc, monkeypatch):
    import builtins

    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if str(path) == str(doc):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    assert_error(invoke("ask", doc, "Who?"), ExitCode.DOCUMENT, "permission denied")


def test_empty_stdin(fake_model):
    assert_error(invoke("ask", "-", "Who?", input=""), ExitCode.DOCUMENT, "<stdin>", "empty")


# --- bad arguments: exit 2 ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--kv", "bogus"], "--kv"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "many"], "--max-new-tokens"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--no-such-option"], "--no-such-option"),
])
def test_bad_option_values(fake_model, doc, args, fragment):
    assert_error(invoke("ask", doc, "Who?", *args), ExitCode.USAGE, fragment)
    assert "load" not in fake_model.calls


def test_missing_question_and_empty_question(fake_model, doc):
    assert_error(invoke("ask", doc), ExitCode.USAGE, "question")
    assert_error(invoke("ask", doc, "   "), ExitCode.USAGE, "question is empty")


def test_config_error_is_a_usage_error(fake_model, doc):
    fake_model.fail["session"] = ConfigError("value_group 48 does not divide head_dim 64")
    assert_error(invoke("ask", doc, "Who?"), ExitCode.USAGE, "value_group 48")


def test_unknown_command():
    assert_error(invoke("nosuch"), ExitCode.USAGE, "nosuch")


# --- model problems: exit 4 ---------------------------------------------------------------------------
def test_unknown_hub_model_fails_fast_offline(doc, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = assert_error(invoke("ask", doc, "Who?", "--model", "nosuch/thing"), ExitCode.MODEL, "nosuch/thing")
    assert len(line) < 400


def test_missing_gguf(doc):
    assert_error(invoke("ask", doc, "Who?", "--model", "/nonexistent.gguf"), ExitCode.MODEL,
                 "/nonexistent.gguf", "not found")


def test_not_a_model_folder(doc, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    assert_error(invoke("ask", doc, "Who?", "-m", folder), ExitCode.MODEL, "config.json")


def test_model_error_from_loading(fake_model, doc):
    from qjl.models import ModelError

    fake_model.fail["load"] = ModelError("the embedded model is not installed; run: pip install ...")
    assert_error(invoke("ask", doc, "Who?"), ExitCode.MODEL, "not installed")


# --- too long: exit 6 ---------------------------------------------------------------------------------
def test_document_too_long_fake(fake_model, doc, tmp_path):
    fake_model.context_length = 512
    path = tmp_path / "long.txt"
    path.write_text("word " * 1000)
    line = assert_error(invoke("ask", path, "Who?"), ExitCode.TOO_LONG, "1030 tokens", "192", "512")
    assert "--max-new-tokens" in line


# --- interrupts and unexpected errors -----------------------------------------------------------------
def test_interrupted_answer_keeps_the_partial_text(fake_model, doc):
    fake_model.interrupt_after = 2
    result = invoke("ask", doc, "Who?")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.stdout == "The general\n"
    assert result.stderr.strip().splitlines()[-1] == "qjl: interrupted"


def test_interrupted_while_loading(fake_model, doc):
    fake_model.fail["load"] = KeyboardInterrupt()
    result = invoke("ask", doc, "Who?")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert result.stderr.strip() == "qjl: interrupted" and result.stdout == ""


def test_unexpected_error_is_one_line_without_traceback(fake_model, doc, monkeypatch):
    fake_model.fail["ask"] = RuntimeError("boom\nsecond line")
    line = assert_error(invoke("ask", doc, "Who?"), ExitCode.UNEXPECTED, "RuntimeError: boom second line")
    assert line.endswith("(set QJL_DEBUG=1 for a traceback)")

    monkeypatch.setenv("QJL_DEBUG", "1")
    result = invoke("ask", doc, "Who?")
    assert result.exit_code == ExitCode.UNEXPECTED and "Traceback" in result.stderr


def test_console_script_entry_point(tmp_path):
    """`python -m qjl_cli.main` goes through run(): the exit code and one line, no traceback, no torch import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    missing = tmp_path / "missing.txt"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qjl_cli.main", "ask", str(missing), "Who?"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == ExitCode.DOCUMENT
    assert proc.stdout == ""
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("import time:")]
    assert lines == [f"qjl: error: {missing}: no such file; check the path (use - to read the document from stdin)"]
    assert "torch" not in {l.split("|")[-1].strip() for l in proc.stderr.splitlines() if l.startswith("import time:")}


def test_help_and_version_import_no_torch(tmp_path):
    """The app imports, and --help and --version answer, without torch or transformers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from qjl_cli.main import app\n"
            "for args in (['--help'], ['--version'], ['ask', '--help'], ['cache', '--help'], ['cache', 'load', '-h']):\n"
            "    result = CliRunner().invoke(app, args)\n"
            "    assert result.exit_code == 0, (args, result.output)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the seams: the fake implements what the CLI needs, as the library does ------------------------------
def test_the_fake_and_the_library_implement_the_seams(fake_model):
    import inspect

    from conftest import FakeLoaded, FakeSession
    from qjl.config import QJLConfig
    from qjl.session import Session
    from qjl_cli.seams import LoadedModelLike, SessionLike

    loaded = FakeLoaded("fake", 8192)
    assert isinstance(loaded, LoadedModelLike)
    assert isinstance(FakeSession(fake_model, loaded, QJLConfig()), SessionLike)
    for name in ("load_document", "load_cache", "save_cache", "ask", "rollback", "history", "tail_tokens"):
        wanted = list(inspect.signature(getattr(SessionLike, name)).parameters)
        for cls in (Session, FakeSession):
            assert list(inspect.signature(getattr(cls, name)).parameters) == wanted, (cls.__name__, name)


def test_ask_and_cache_load_answer_from_a_cache_file_alike(fake_model, doc, tmp_path, monkeypatch):
    import qjl_cli.answers as answers

    out = tmp_path / "report.qjl"
    saved = invoke("cache", "save", doc, "-o", out, "--kv", "qjl")
    assert saved.exit_code == 0, saved.output
    assert saved.stdout == "" and saved.stderr.startswith("Saved 44 document tokens to")
    monkeypatch.setattr(answers, "inspect_cache", lambda file: {})  # the real check refuses the fake's file
    results = [invoke("ask", out, "Who?", "--json"), invoke("cache", "load", out, "-q", "Who?", "--json")]
    for result in results:
        assert result.exit_code == 0, result.output
    first, second = (json.loads(r.stdout) for r in results)
    assert first == second
    assert first["kv"] == "qjl" and first["document"] == str(out) and first["document_tokens"] == 44
    assert first["cache_file"] == str(out) and "cache_load_s" in first  # measured by the session
    assert fake_model.calls["load_cache"]["max_new_tokens"] == 256

    text = invoke("cache", "load", out, "-q", "Who?")
    assert text.stdout == "The general manager is Ana Ruiz.\n" and "loaded from" in text.stderr
    fake_model.context_length = 300  # the session's own fit check: 44 tokens, room for 300 - 64 - 256 < 0
    assert_error(invoke("ask", out, "Who?"), ExitCode.TOO_LONG, "44 tokens")
    assert_error(invoke("cache", "load", out, "-q", "Who?"), ExitCode.TOO_LONG, "44 tokens")
    assert_error(invoke("ask", out, "Who?", "--kv", "exact"), ExitCode.USAGE, "--kv exact")


# --- the real embedded model --------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_json_with_the_embedded_model(embedded_home, tmp_path):
    # The title and overview of the sample report: about 250 tokens with the prompt.
    text = SAMPLE.read_text().split("2. Water supply")[0]
    path = tmp_path / "overview.md"
    path.write_text(text)
    result = invoke("ask", path, "Who is the general manager of the cooperative?", "--json",
                    "--max-new-tokens", 24)
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert JSON_FIELDS <= set(data)
    assert "SmolLM2" in data["model"] and data["kv"] == "turbo"
    assert 100 < data["document_tokens"] < 400
    assert data["prompt_tokens"] == data["document_tokens"] + data["question_tokens"] > data["document_tokens"]
    assert 1 <= data["generated_tokens"] <= 24
    assert isinstance(data["answer"], str) and data["answer"]
    assert 0 < data["bits_per_number"] < 16
    assert 0 < data["kv_bytes"] < data["fp16_bytes"]
    assert data["prefill_s"] > 0 and data["prefill_tokens_per_s"] > 0 and data["first_token_s"] > 0


@pytest.mark.slow
def test_document_too_long_with_the_embedded_model(embedded_home, tmp_path):
    # Well past the 8192-token context; the check runs on token counts before any prefill, so this is quick.
    path = tmp_path / "long.txt"
    path.write_text("The cooperative delivered water to every household in the valley. " * 1200)
    line = assert_error(invoke("ask", path, "Who?"), ExitCode.TOO_LONG, "8192")
    tokens = [int(w) for w in line.replace("(", " ").split() if w.isdigit()]
    assert tokens[0] > 8192 and tokens[1] < 8192  # the document's tokens, then the limit
