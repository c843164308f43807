"""Conversations: an interactive session remembers its turns (kept exact in the cache's tail), /reset, /history,
/save; -q questions stay independent unless --chat; a conversation that outgrows the context drops its oldest
turns. The fake model for the CLI, the embedded model for the library and on a pseudo-terminal (slow)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from test_cli_terminal import Terminal, _env

import qjl_cli.repl as repl
from conftest import invoke

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "qjl" / "data" / "sample.txt"


@pytest.fixture(autouse=True)
def _isolated_home(qjl_home):
    return qjl_home



def scripted(monkeypatch, lines):
    feed = iter(lines)

    def read_line(prompt):
        item = next(feed)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(repl, "read_line", read_line)
    import qjl_cli.render as render

    monkeypatch.setattr(render, "is_terminal", lambda stream: stream is not sys.stdout and stream is not sys.stderr)


def test_interactive_session_is_a_conversation(fake_model, doc, monkeypatch, qjl_home, tmp_path):
    saved = tmp_path / "saved.qjl"
    scripted(monkeypatch, ["Who is the manager?", "When was she appointed?", "/history", "/info", "/reset", "/info",
                           f"/save {saved}", "/save nope.txt", EOFError()])
    result = invoke("ask", doc)
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "1. Who is the manager?\n   The general manager is Ana Ruiz." in err
    assert "2. When was she appointed?" in err and "2 turns kept" in err
    infos = re.findall(r"conversation: (\d+) turns kept, (\d+) tokens after the document", err)
    assert infos[0][0] == "2" and int(infos[0][1]) > 0 and infos[1] == ("0", "0")  # /reset: the tail is empty
    assert "conversation forgotten" in err
    assert saved.is_file() and "saved the document's cache" in err and "/save FILE.qjl" in err
    assert (qjl_home / "history").is_file()  # the readline history is kept for the next session


def test_given_questions_are_independent_unless_chat(fake_model, doc):
    plain = invoke("ask", doc, "-q", "Who?", "-q", "When?", "--json")
    rows = [json.loads(line) for line in plain.stdout.splitlines()]
    assert [r["history_tokens"] for r in rows] == [0, 0]
    chat = invoke("ask", doc, "-q", "Who?", "-q", "When?", "--json", "--chat")
    first, second = (json.loads(line) for line in chat.stdout.splitlines())
    assert second["history_tokens"] == first["question_tokens"] + first["generated_tokens"]
    assert second["prompt_tokens"] == second["document_tokens"] + second["history_tokens"] + second["question_tokens"]


def test_a_conversation_drops_its_oldest_turns_with_a_notice(fake_model, doc):
    fake_model.context_length = 44 + 64 + 12  # the document, a question, --max-new-tokens 12: 64 for the turns
    questions = [arg for q in ("Who?", "When?", "Where?", "Why?", "How?", "Whom?") for arg in ("-q", q)]
    result = invoke("ask", doc, "--chat", "--max-new-tokens", 12, *questions)  # 12 tokens a turn
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Ana Ruiz") == 6  # every question answered
    assert "(the oldest turn was dropped to fit the model's context; the document stays)" in result.stderr


# --- the embedded model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_context_session(embedded_model_home):
    """A session of the embedded model whose context is cut to the document + 80 tokens."""
    import os

    os.environ["QJL_HOME"] = str(embedded_model_home)
    from qjl.models import load_model
    from qjl.session import Session

    loaded = load_model(None)
    session = Session(loaded)
    stats = session.load_document("The general manager of the Harrow Valley cooperative is Margaret Oyelaran. "
                                  "She was appointed in 2019.", max_new_tokens=6)
    loaded.model.config.max_position_embeddings = stats.document_tokens + 80
    return session


@pytest.mark.slow
def test_library_conversation_keeps_turns_and_drops_the_oldest(small_context_session):
    session = small_context_session
    session.remember = True
    answers = [session.ask(q, max_new_tokens=6) for q in
               ("Who is the general manager?", "When was she appointed?", "Who appointed her?", "Is she paid?",
                "What does the cooperative do?")]
    assert answers[0].history_tokens == 0
    assert answers[1].history_tokens == answers[0].question_tokens + answers[0].generated_tokens
    assert any(a.dropped_turns for a in answers) and all(a.generated_tokens for a in answers)
    kept = session.history()
    assert kept[-1][0] == "What does the cooperative do?" and len(kept) < 5
    assert session.tail_tokens() > 0
    session.rollback()
    assert session.tail_tokens() == 0 and session.history() == []


@pytest.mark.slow
def test_conversation_on_a_pseudo_terminal(embedded_home, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The general manager of the Harrow Valley cooperative is Margaret Oyelaran. She was appointed "
                    "in 2019 by the board.\n")
    term = Terminal([sys.executable, "-m", "qjl_cli.main", "ask", str(path), "--max-new-tokens", "8"],
                    _env(embedded_home))
    try:
        pos = term.read_until(r"qjl> ", term.read_until(r"tokens read", 0))
        for question in ("Who is the general manager?", "When was she appointed?"):
            term.send(question + "\r")
            pos = term.read_until(r"qjl> ", term.read_until(r"\d+ tokens, first token", pos))
        term.send("/info\r")
        pos = term.read_until(r"qjl> ", term.read_until(r"conversation: 2 turns kept, \d+ tokens", pos))
        term.send("/reset\r/info\r")
        pos = term.read_until(r"conversation: 0 turns kept, 0 tokens after the document", pos)
        term.send("/exit\r")
        assert term.wait(timeout=60) == 0
    finally:
        term.kill()
    history = (embedded_home / "history").read_text()
    assert "When was she appointed?" in history and "Oyelaran" not in history  # questions, not answers


@pytest.mark.slow
def test_second_turn_prompt_counts_the_first(embedded_home, tmp_path):
    import subprocess

    path = tmp_path / "doc.txt"
    path.write_text("The general manager of the Harrow Valley cooperative is Margaret Oyelaran. She was appointed "
                    "in 2019 by the board.\n")
    proc = subprocess.run([sys.executable, "-m", "qjl_cli.main", "ask", str(path), "--chat", "--json",
                           "--max-new-tokens", "8", "-q", "Who is the general manager?", "-q", "When was she appointed?"],
                          capture_output=True, text=True, env=_env(embedded_home), timeout=600)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert second["prompt_tokens"] == (first["document_tokens"] + first["question_tokens"] + first["generated_tokens"]
                                       + second["question_tokens"])
