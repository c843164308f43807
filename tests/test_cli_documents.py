"""`qjl ask` with PDFs, HTML, several documents, --truncate, several questions and the interactive loop (fake model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import qjl_cli.main as cli
import qjl_cli.render as render
import qjl_cli.repl as repl
from pdf_maker import make_pdf
from qjl_cli.main import ExitCode, app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated_home(qjl_home):
    return qjl_home


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert result.stdout == "" and len(lines) == 1 and lines[0].startswith("qjl: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def pdf(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["Annual report 2023", "Revenue was 4.2 million euros.", "Signed by Ana Ruiz."]))
    return path


# --- documents -------------------------------------------------------------------------------------------
def test_pdf_pages_reach_the_model(fake_model, pdf):
    result = invoke("ask", pdf, "Who signed it?")
    assert result.exit_code == 0, result.output
    text = fake_model.calls["prefill"]["text"]
    assert "[page 3]\nSigned by Ana Ruiz." in text and text.startswith("[page 1]\nAnnual report 2023")


def test_encrypted_pdf_and_password(fake_model, tmp_path, monkeypatch):
    path = tmp_path / "secret.pdf"
    path.write_bytes(make_pdf(["The code is 7741."], password="s3cret"))
    one_error(invoke("ask", path, "Code?"), ExitCode.DOCUMENT, "is encrypted and needs a password",
              "--password")
    assert "load" not in fake_model.calls
    one_error(invoke("ask", path, "Code?", "--password", "nope"), ExitCode.DOCUMENT,
              "the password given with --password does not open")
    result = invoke("ask", path, "Code?", "--password", "s3cret")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["prefill"]["text"] == "[page 1]\nThe code is 7741.\n"
    monkeypatch.setenv("QJL_PDF_PASSWORD", "s3cret")
    assert invoke("ask", path, "Code?").exit_code == 0


def test_image_only_pdf(fake_model, tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None]))
    one_error(invoke("ask", path, "Who?"), ExitCode.DOCUMENT, "no text layer", "ocrmypdf")


def test_pdf_and_html_on_stdin(fake_model):
    result = invoke("ask", "-", "Who?", input=make_pdf(["Piped PDF text."]))
    assert result.exit_code == 0, result.output
    assert fake_model.calls["prefill"]["text"] == "[page 1]\nPiped PDF text.\n"
    result = invoke("ask", "-", "Who?", input="<!doctype html><p>Piped <i>page</i></p><script>x</script>")
    assert result.exit_code == 0, result.output
    assert fake_model.calls["prefill"]["text"] == "Piped page\n"


def test_several_documents(fake_model, tmp_path, pdf):
    page = tmp_path / "page.html"
    page.write_text("<html><body><h1>Board</h1><p>Budget approved by Luis.</p></body></html>")
    notes = tmp_path / "notes.txt"
    notes.write_text("Meeting notes.\n")
    result = invoke("ask", notes, pdf, page, "Who approved the budget?")  # the last argument is the question
    assert result.exit_code == 0, result.output
    text = fake_model.calls["prefill"]["text"]
    assert text.index(f"=== {notes} ===") < text.index(f"=== {pdf} ===") < text.index(f"=== {page} ===")
    assert fake_model.calls["ask"]["question"] == "Who approved the budget?"
    result = invoke("ask", notes, page, "-q", "Who?", "--json")  # with -q every argument is a document
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["document"] == f"{notes}, {page}"
    # Two files and no question is not read as a question named like a file.
    one_error(invoke("ask", notes, page), ExitCode.USAGE, "is a file, not a question", "-q")


def test_no_question_when_the_document_is_stdin(fake_model):
    one_error(invoke("ask", "-", input="Some text."), ExitCode.USAGE, "no question", "-q")


# --- context budget --------------------------------------------------------------------------------------
def test_one_token_over_the_limit_then_truncate(fake_model, tmp_path):
    fake_model.context_length = 1024
    limit = 1024 - 64 - 16  # the context less the question reserve and --max-new-tokens
    path = tmp_path / "long.txt"
    path.write_text(" ".join(f"w{i}" for i in range(limit + 1 - 30)))  # 30: the fake's prompt around it
    line = one_error(invoke("ask", path, "Last word?", "--max-new-tokens", 16), ExitCode.TOO_LONG)
    assert line == (f"qjl: error: the document is {limit + 1} tokens but at most {limit} fit (the model's context "
                    f"is 1024 tokens, less room for the question and answer); give --truncate head|tail|middle "
                    f"to keep that much of it, shorten or split the document, lower --max-new-tokens, or use a "
                    f"model with a longer context")
    result = invoke("ask", path, "Last word?", "--max-new-tokens", 16, "--truncate", "tail")
    assert result.exit_code == 0, result.output
    assert result.stdout == "The general manager is Ana Ruiz.\n"
    assert fake_model.calls["prefill"]["truncate"] == "tail"
    assert fake_model.calls["prefill"]["kept"].split()[0] == "w1"  # one token dropped, from the beginning
    assert (f"qjl: warning: --truncate tail: the document is {limit + 1:,} tokens and at most {limit:,} fit; "
            f"dropped 1 tokens (3 characters) from the beginning") in result.stderr
    data = json.loads(invoke("ask", path, "?", "--max-new-tokens", 16, "--truncate", "head", "--json").stdout)
    assert data["truncated"]["mode"] == "head" and data["truncated"]["dropped_tokens"] == 1


# --- several questions -----------------------------------------------------------------------------------
def test_questions_file_gives_json_lines(fake_model, tmp_path, pdf):
    qs = tmp_path / "questions.txt"
    qs.write_text("Who signed it?\n\nWhat was revenue?\nWhich year?\n")
    result = invoke("ask", pdf, "--questions", qs)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in rows] == ["Who signed it?", "What was revenue?", "Which year?"]
    assert all(r["answer"] == "The general manager is Ana Ruiz." for r in rows)
    assert fake_model.calls["questions"] == ["Who signed it?", "What was revenue?", "Which year?"]
    # Questions from stdin with --questions -; a missing file is exit 3.
    result = invoke("ask", pdf, "--questions", "-", input="One?\nTwo?\n")
    assert [json.loads(l)["question"] for l in result.stdout.splitlines()] == ["One?", "Two?"]
    one_error(invoke("ask", pdf, "--questions", tmp_path / "none.txt"), ExitCode.DOCUMENT, "none.txt")
    one_error(invoke("ask", "-", "--questions", "-", input="x"), ExitCode.USAGE, "both the document and")


def test_questions_line_by_line_on_stdin(fake_model, pdf):
    result = invoke("ask", pdf, input="First?\n\nSecond?\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "The general manager is Ana Ruiz.\n" * 2
    assert fake_model.calls["questions"] == ["First?", "Second?"]
    result = invoke("ask", pdf, "--json", input="First?\nSecond?\n")
    assert len([json.loads(l) for l in result.stdout.splitlines()]) == 2
    result = invoke("ask", pdf, "-q", "A?", "-q", "B?")
    assert result.exit_code == 0 and fake_model.calls["questions"][-2:] == ["A?", "B?"]


# --- the interactive loop (scripted lines instead of a terminal) -----------------------------------------
def scripted(monkeypatch, lines, fake_model=None, interrupt_on=None):
    """stdin "is" a terminal and _read_line returns `lines` in turn (an exception is raised instead)."""
    monkeypatch.setattr(render, "is_terminal", lambda stream: stream is not cli.sys.stdout)
    feed = iter(lines)

    def read_line(prompt):
        item = next(feed)
        if isinstance(item, BaseException):
            raise item
        if fake_model is not None:
            fake_model.interrupt_after = 1 if item == interrupt_on else None
        return item

    monkeypatch.setattr(repl, "read_line", read_line)


def test_interactive_loop(fake_model, pdf, monkeypatch):
    scripted(monkeypatch, ["Who signed it?", "/info", "", "Tell me everything", "/reset", "Which year?",
                           KeyboardInterrupt(), "/bogus", "Last?", EOFError()],
             fake_model, interrupt_on="Tell me everything")
    result = invoke("ask", pdf)
    assert result.exit_code == 0, result.output
    assert fake_model.calls["questions"] == ["Who signed it?", "Tell me everything", "Which year?", "Last?"]
    assert result.stdout.splitlines() == ["The general manager is Ana Ruiz.", "The ",
                                          "The general manager is Ana Ruiz.", "The general manager is Ana Ruiz."]
    assert "(answer stopped)" in result.stderr
    assert "tokens" in result.stderr and "bits/number" in result.stderr and "bytes" in result.stderr  # /info
    assert "conversation forgotten" in result.stderr and fake_model.calls["rollback"] == 1
    assert "unknown command /bogus" in result.stderr
    assert fake_model.calls["load"] == {"spec": None}  # one model load, one prefill for all the questions


def test_interactive_exit_command(fake_model, pdf, monkeypatch):
    scripted(monkeypatch, ["One?", "/exit", "never asked"])
    result = invoke("ask", pdf)
    assert result.exit_code == 0, result.output
    assert fake_model.calls["questions"] == ["One?"]
