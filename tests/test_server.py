"""`qjl serve` and its thin client: a command runs in the server on the client's own streams, folder and
environment, with the client's exit code; the model is loaded once; interactive sessions and QJL_SERVER=0 run in
the client; Ctrl-C reaches the command; one server per QJL_HOME. The server runs the scripted fake model
(tests/conftest.py) in a subprocess, so these tests take seconds."""

from __future__ import annotations

import os
import signal
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qjl_cli import client, server
from qjl_cli.errors import ExitCode

TESTS = Path(__file__).parent
BOOT = """
import os, sys, time
sys.path.insert(0, {tests!r})
import conftest
import qjl_cli.seams as seams

script = conftest.FakeScript()
loads = {loads!r}

def load_model(spec, progress=None, placement=None, fit=None):
    with open(loads, "a") as f:
        f.write("load\\n")
    return conftest.FakeLoaded(script.name, script.context_length, script.identity)

class Session(conftest.FakeSession):
    def ask(self, question, max_new_tokens=256, on_text=None):
        if os.environ.get("QJL_TEST_SLOW"):  # the client's environment, applied per command
            open(os.environ["QJL_TEST_SLOW"], "w").close()
            time.sleep(60)
        return super().ask(question, max_new_tokens, on_text)

seams.load_model = load_model
seams.new_session = lambda loaded, config: Session(script, loaded, config)
seams.context_hint = lambda spec: script.context_length
from qjl_cli.main import run
sys.argv = ["qjl", "serve", *sys.argv[1:]]
run()
"""


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QJL_")}
    env.update(QJL_HOME=str(home), **extra)
    return env


def _start(home: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    boot = tmp_path / "boot.py"
    boot.write_text(BOOT.format(tests=str(TESTS), loads=str(tmp_path / "loads.txt")))
    return subprocess.Popen([sys.executable, str(boot), *args], env=_env(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def served(tmp_path):
    """(QJL_HOME, the server process), the server ready; stopped with SIGTERM afterwards. QJL_HOME is a short
    folder of its own: a socket's path must stay under about 100 bytes."""
    home = Path(tempfile.mkdtemp(prefix="qjl-serve-"))
    proc = _start(home, tmp_path)
    deadline = time.monotonic() + 60
    while not ((home / client.SOCKET_NAME).is_socket() and (tmp_path / "loads.txt").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()}")
        time.sleep(0.05)
    yield home, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not (home / client.SOCKET_NAME).exists()  # a stopped server removes its socket
    shutil.rmtree(home, ignore_errors=True)


def _ask(home: Path, *args: str, cwd: Path, python=(), **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python, "-m", "qjl_cli.client", *args], env=_env(home, **env), cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def test_asks_run_in_the_server_on_the_client_streams_and_folder(served, tmp_path):
    home, proc = served
    (tmp_path / "d.txt").write_text("The general manager of the cooperative is Ana Ruiz. " * 5)
    first = _ask(home, "ask", "d.txt", "Who is the manager?", cwd=tmp_path, python=("-X", "importtime"))
    second = _ask(home, "ask", "d.txt", "Who is the manager?", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "The general manager is Ana Ruiz."
    assert second.returncode == 0 and '"answer": "The general manager is Ana Ruiz."' in second.stdout
    assert "model already loaded (qjl serve)" in second.stderr
    imported = [line.split("|")[-1].strip() for line in first.stderr.splitlines() if line.startswith("import time:")]
    assert "qjl.home" in imported  # the client imports neither torch nor the CLI (typer, rich)
    assert not {"torch", "typer", "rich", "qjl_cli.main"} & {name.split(".")[0] if name != "qjl_cli.main" else name
                                                            for name in imported}
    assert (tmp_path / "loads.txt").read_text().count("load") == 1  # loaded once, at the server's start


def test_the_client_exit_code_and_one_line_error(served, tmp_path):
    home, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # not a request: logged and dropped
        raw.connect(str(home / client.SOCKET_NAME))
        socket.send_fds(raw, [struct.pack(">I", 5) + b"hello"], [0, 1, 2])
    result = _ask(home, "ask", "missing.txt", "Who?", cwd=tmp_path)
    assert result.returncode == ExitCode.DOCUMENT
    assert result.stdout == "" and [line for line in result.stderr.splitlines() if "error" in line] == [
        line for line in result.stderr.splitlines() if line.startswith("qjl: error:")]


def test_document_cache_hit_through_the_server(served, tmp_path):
    home, _ = served
    (tmp_path / "d.txt").write_text("Ana Ruiz manages the cooperative. " * 5)
    first = _ask(home, "ask", "d.txt", "Who?", cwd=tmp_path, QJL_CACHE="1")
    second = _ask(home, "ask", "d.txt", "Who?", cwd=tmp_path, QJL_CACHE="1")
    assert "cache: stored" in first.stderr, first.stderr
    assert "loaded from the document cache" in second.stderr and second.stdout == first.stdout


def test_ctrl_c_in_the_client_stops_the_command_not_the_server(served, tmp_path):
    home, proc = served
    (tmp_path / "d.txt").write_text("Ana Ruiz manages the cooperative.")
    slow = subprocess.Popen([sys.executable, "-m", "qjl_cli.client", "ask", "d.txt", "Who?"], cwd=tmp_path,
                            env=_env(home, QJL_TEST_SLOW=str(tmp_path / "asking")), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "asking").exists() and time.monotonic() < deadline:  # the answer has begun
        time.sleep(0.05)
    slow.send_signal(signal.SIGINT)
    out, err = slow.communicate(timeout=30)
    assert slow.returncode == ExitCode.INTERRUPTED, err
    assert proc.poll() is None
    assert _ask(home, "ask", "d.txt", "Who?", cwd=tmp_path).returncode == 0  # the server still answers


def test_a_second_server_is_refused(served, tmp_path):
    home, _ = served
    (tmp_path / "second").mkdir()
    other = _start(home, tmp_path / "second")
    _, err = other.communicate(timeout=60)
    assert other.returncode == ExitCode.USAGE and "already answers" in err


def test_forwarding_rules(tmp_path, monkeypatch):
    assert client.forwardable(["ask", "d.txt", "q"]) and client.forwardable(["cache", "save", "d", "-o", "d.qjl"])
    assert not client.forwardable(["ask", "--help"]) and not client.forwardable(["cache", "info", "d.qjl"])
    assert not client.forwardable(["bench"]) and not client.forwardable(["serve"])
    monkeypatch.setenv("QJL_HOME", str(tmp_path))
    assert client.forward(["ask", "d.txt", "q"]) is None  # no server
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / client.SOCKET_NAME))  # a socket nobody listens on (a server that died)
    stale.close()
    assert client.forward(["ask", "d.txt", "q"]) is None
    server.check_free(tmp_path / client.SOCKET_NAME)  # a new server removes it
    assert not (tmp_path / client.SOCKET_NAME).exists()
    monkeypatch.setenv("QJL_SERVER", "0")
    assert client.disabled()


def test_interactive_sessions_run_in_the_client(fake_model, doc, monkeypatch):
    from qjl_cli import render

    monkeypatch.setattr(client, "serving", True)
    monkeypatch.setattr(render, "is_terminal", lambda stream: True)
    assert server.run_command(["ask", str(doc)]) == client.LOCAL
    assert "load" not in fake_model.calls  # refused before the model


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("0.5m", 30)])
def test_durations(text, seconds):
    assert server.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1m", "abc", "5d", ""])
def test_bad_durations(text):
    import typer

    with pytest.raises(typer.BadParameter):
        server.parse_duration(text)


def test_bad_idle_is_one_line_and_exit_2(qjl_home):
    from conftest import invoke

    result = invoke("serve", "--idle", "soon")
    assert result.exit_code == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qjl: error: ") and "--idle" in lines[0]
    assert not (qjl_home / client.SOCKET_NAME).exists()  # refused before the socket or the model
