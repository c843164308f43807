"""The real `qjl` process with the embedded model: a shell pipeline, and the interactive loop on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "qjl" / "data" / "sample.txt"
QJL = f"{sys.executable} -m qjl_cli.main"


@pytest.fixture
def overview(tmp_path) -> Path:
    """The title and overview of the sample report: about 250 tokens with the prompt."""
    path = tmp_path / "doc.txt"
    path.write_text(SAMPLE.read_text().split("2. Water supply")[0])
    return path


def _env(home: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "QJL_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("QJL_MODEL", None)
    return env


@pytest.mark.slow
def test_pipeline_json_and_questions_file(embedded_home, overview, tmp_path):
    reader = (f"{sys.executable} -c \"import json, sys; d = json.load(sys.stdin); "
              f"print(d['document'], d['document_tokens'] > 100, bool(d['answer']))\"")
    proc = subprocess.run(f"cat {overview} | {QJL} ask - 'Who is the general manager?' --json --max-new-tokens 8 "
                          f"| {reader}", shell=True, capture_output=True, text=True, env=_env(embedded_home),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "<stdin> True True\n"

    questions = tmp_path / "questions.txt"
    questions.write_text("Who is the general manager?\nWhat does the cooperative do?\n")
    proc = subprocess.run(f"{QJL} ask {overview} --questions {questions} --max-new-tokens 8", shell=True,
                          capture_output=True, text=True, env=_env(embedded_home), timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["question"] for r in rows] == questions.read_text().splitlines()
    assert rows[0]["document_tokens"] == rows[1]["document_tokens"] and all(r["generated_tokens"] for r in rows)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|[\r\x08]")


class Terminal:
    """A child process on a pseudo-terminal; read() collects its output (ANSI sequences removed)."""

    def __init__(self, argv: list[str], env: dict):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is SIGINT
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.text = ""

    def read_until(self, pattern: str, start: int, timeout: float = 300) -> int:
        """Read until `pattern` (a regex) appears after offset `start`; returns the offset after it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, start)
            if m:
                return m.end()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {timeout} s; output so far: {self.text[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"the process ended before {pattern!r}; output: {self.text[-2000:]!r}")
                self.text += _ANSI.sub("", data.decode("utf-8", "replace"))

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain what is left so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.text += _ANSI.sub("", os.read(self.fd, 4096).decode("utf-8", "replace"))
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise TimeoutError(f"the process did not end; output: {self.text[-2000:]!r}")

    def kill(self) -> None:
        """Make sure the child is gone (a test that failed midway leaves it waiting at the prompt)."""
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.slow
def test_interactive_session_on_a_pseudo_terminal(embedded_home, overview):
    term = Terminal([sys.executable, "-m", "qjl_cli.main", "ask", str(overview), "--max-new-tokens", "12"],
                    _env(embedded_home))
    try:
        pos = term.read_until(r"tokens read\. Ask questions", 0)
        pos = term.read_until(r"qjl> ", pos)
        for question in ("Who is the general manager?", "What does the cooperative do?", "Where is it?"):
            term.send(question + "\r")
            pos = term.read_until(re.escape(question), pos)  # the terminal's echo
            pos = term.read_until(r"\d+ tokens, first token [\d.]+ s", pos)  # answered in full
            pos = term.read_until(r"qjl> ", pos)
        answered = term.text
        # Ctrl-C as soon as the answer has begun: that answer stops, the session goes on.
        term.send("Describe everything in the document in detail.\r")
        pos = term.read_until(r"in detail\.", pos)
        pos = term.read_until(r"Answering", pos)  # the question was taken; the answer follows the spinner
        pos = _until_answer_text(term, pos)
        term.send("\x03")
        pos = term.read_until(r"\(answer stopped\)", pos)
        pos = term.read_until(r"qjl> ", pos)
        term.send("Who is the general manager?\r")
        pos = term.read_until(r"\d+ tokens, first token [\d.]+ s", pos)
        pos = term.read_until(r"qjl> ", pos)
        # Ctrl-D leaves. Typed before readline has the terminal in its own mode, an end-of-file can be lost (a
        # user does not type ahead of the prompt); so wait a little, and send it again if it was.
        code = None
        for _ in range(5):
            time.sleep(0.5)
            term.send("\x04")
            try:
                code = term.wait(timeout=3)
                break
            except TimeoutError:
                continue
        assert code is not None, term.text[-2000:]
    finally:
        term.kill()
    assert code == 0, term.text[-2000:]
    assert answered.count("tokens read") == 1  # one prefill for every question
    assert "interrupted" not in term.text and "Traceback" not in term.text


def _until_answer_text(term: Terminal, pos: int, timeout: float = 300) -> int:
    """Wait for the first answer characters after `pos` (not the "Answering..." spinner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rest = re.sub(r"[^\s]?\s*Answering\.\.\.( \d+ tokens)?", "", term.text[pos:])
        if re.search(r"[A-Za-z0-9]", rest):
            return len(term.text)
        ready, _, _ = select.select([term.fd], [], [], 0.05)
        if ready:
            term.text += _ANSI.sub("", os.read(term.fd, 4096).decode("utf-8", "replace"))
    raise AssertionError(f"no answer began; output: {term.text[-2000:]!r}")
