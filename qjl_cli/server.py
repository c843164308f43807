"""`qjl serve`: one process that keeps torch, transformers and the model loaded, and runs the `ask` and
`cache save/load` commands of thin clients (qjl_cli/client.py has the protocol) one at a time, each on the
client's own stdin/stdout/stderr, in the client's folder and environment, so a command answers exactly as it
would alone but without the start-up. The automatic document cache then makes a second question about a document
cost the cache load and the answer.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from . import client, options, seams

REQUEST_LIMIT = 1 << 22  # a request is argv + cwd + environment: far below 4 MiB


class ServeError(Exception):
    """`qjl serve` cannot start (another server answers, the socket path is unusable)."""


def check_free(path: Path) -> None:
    if len(os.fsencode(path)) > client.MAX_PATH:
        raise ServeError(f"the socket path {path} is too long for a Unix socket; set QJL_HOME to a shorter folder")
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left by a server that died
        else:
            raise ServeError(f"a server already answers on {path}; stop it first (Ctrl-C in its terminal, or kill it)")
        finally:
            probe.close()
    elif path.exists():
        raise ServeError(f"{path} exists and is not a socket; remove it or set QJL_HOME elsewhere")


def listen(path: Path) -> socket.socket:
    """The server's socket, readable and writable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def keep_models() -> None:
    """seams.load_model, memoised: the last model loaded stays loaded for the next command that names the same
    model and placement (a --max-memory load is always redone: its fit check depends on the document)."""
    load = seams.load_model
    kept: dict = {}

    def load_kept(spec, progress=None, placement=None, fit=None):
        key = (os.path.abspath(spec) if spec and os.path.exists(spec) else spec or os.environ.get("QJL_MODEL"),
               placement)
        if key in kept:
            if progress:
                progress("model already loaded (qjl serve)")
            return kept[key]
        loaded = load(spec, progress=progress, placement=placement, fit=fit)
        kept.clear()
        if placement is None or not getattr(placement, "max_memory", None):
            kept[key] = loaded
        return loaded

    seams.load_model = load_kept


def serve(sock: socket.socket, idle: Optional[float], say) -> None:
    """Take one command at a time until Ctrl-C, SIGTERM or `idle` seconds without a command."""
    client.serving = True
    sock.settimeout(idle)
    me = os.getuid()
    stopping = threading.Event()

    def on_term(signum, frame):  # the server's own SIGTERM stops it, even inside a command (which ends with 143)
        from .errors import mark_terminated

        stopping.set()
        mark_terminated()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    while not stopping.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            say(f"qjl serve: no command for {idle:.0f} s; stopping")
            return
        with conn:
            if _peer_uid(conn) not in (None, me):  # the socket's mode already refuses others; a second lock
                continue
            try:
                handle(conn, say)
            except KeyboardInterrupt:  # a client's Ctrl-C that arrived as its command ended
                pass
    raise KeyboardInterrupt  # SIGTERM during a command: stop as SIGTERM stops any command (exit 143)


def _peer_uid(conn: socket.socket) -> Optional[int]:
    """The connecting process's uid (Linux's SO_PEERCRED; None where the platform has no such option)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))[1]


def handle(conn: socket.socket, say) -> None:
    conn.settimeout(None)
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError) as e:
        say(f"qjl serve: a request could not be read ({e})")
        return
    t0 = time.perf_counter()
    conn.sendall(client.ACK)
    done = threading.Event()
    threading.Thread(target=_relay_signals, args=(conn, done), daemon=True).start()
    try:
        if not os.path.isdir(request["cwd"]):  # a folder this process cannot enter: the client runs it itself
            code = client.LOCAL
        else:
            with _as_client(request, fds):
                code = run_command(request["argv"])
    finally:
        done.set()
        for fd in fds:
            _close(fd)
    try:
        conn.sendall(struct.pack(">i", code))
    except OSError:
        pass
    shown = code if code != client.LOCAL else "run by the client"
    say(f"qjl serve: {' '.join(['qjl', *request['argv'][:1]])} ... exit {shown}, {time.perf_counter() - t0:.2f} s")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """(request, the client's fds 0-2); a ValueError (the fds closed) for anything that is not a qjl request."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    try:
        if len(fds) != 3 or len(data) < 4:
            raise ValueError("no standard streams were passed")
        size = struct.unpack(">I", data[:4])[0]
        if size > REQUEST_LIMIT:
            raise ValueError("request too large")
        body = data[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        try:
            request = json.loads(body)
        except ValueError:
            raise ValueError("not a qjl request") from None
        if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                and all(isinstance(a, str) for a in request["argv"])
                and isinstance(request.get("cwd"), str) and isinstance(request.get("env"), dict)):
            raise ValueError("not a qjl request")
    except (ValueError, OSError):
        for fd in fds:
            _close(fd)
        raise
    return request, fds


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # already closed (installed as 0-2 and closed there)
        pass


def _relay_signals(conn: socket.socket, done: threading.Event) -> None:
    """The client's Ctrl-C / SIGTERM (or its disappearance) becomes a KeyboardInterrupt in the command."""
    from .errors import mark_terminated

    while not done.is_set():
        try:
            byte = conn.recv(1)
        except OSError:
            byte = b""
        if done.is_set():
            return
        if byte == client.TERMINATE:
            mark_terminated()
        if byte in (client.INTERRUPT, client.TERMINATE, b""):
            main = threading.main_thread().ident
            while _importing(main) and not done.is_set():  # a module half imported would stay broken in
                time.sleep(0.02)  # sys.modules for every later command: let the import finish first
            if not done.is_set():  # a real SIGINT to the main thread: a blocking read or sleep there ends too
                signal.pthread_kill(main, signal.SIGINT)
        if not byte:
            return


def _importing(thread_id: int) -> bool:
    """Whether that thread is executing an import (a frame of importlib's bootstrap on its stack)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextmanager
def _as_client(request: dict, fds: list[int]) -> Iterator[None]:
    """The client's stdin/stdout/stderr on fds 0-2 (fresh Python streams over them), folder and environment, for
    one command; the server's own restored afterwards."""
    streams = (sys.stdin, sys.stdout, sys.stderr)
    for s in streams[1:]:
        _flush(s)
    saved_fds = [os.dup(i) for i in range(3)]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=streams[0].encoding, errors="replace")
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(i, "w", closefd=False), encoding=s.encoding,
                                               errors=s.errors, line_buffering=os.isatty(i) or i == 2,
                                               write_through=i == 2)
                              for i, s in ((1, streams[1]), (2, streams[2])))
    try:
        os.environ.clear()
        os.environ.update(request["env"])  # _receive checked both
        os.chdir(request["cwd"])
        yield
    finally:
        for s in (sys.stdout, sys.stderr):
            _flush(s)
        sys.stdin, sys.stdout, sys.stderr = streams
        for i, fd in enumerate(saved_fds):
            os.dup2(fd, i)
            os.close(fd)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):  # the client's pipe closed: what is left has nowhere to go
        pass


def run_command(argv: list[str]) -> int:
    """Run `qjl ARGV` here as the console script would -> its exit code (LOCAL: the client must run it)."""
    from .errors import ExitCode, interrupt_code, interrupted, reset_terminated
    from .main import app

    reset_terminated()
    try:
        app(args=argv, prog_name="qjl")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else ExitCode.UNEXPECTED)
    except client.RunLocally:
        return client.LOCAL
    except KeyboardInterrupt:
        interrupted()
        return interrupt_code()
    return ExitCode.OK


# --- the command ------------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h' -> seconds (> 0)."""
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        seconds = float(t[:-1] if unit else t) * _UNITS.get(unit, 1)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        import typer

        raise typer.BadParameter(f"{text!r} is not a duration: give seconds, or e.g. 90s, 30m, 2h",
                                 param_hint="'--idle'")
    return seconds


SERVE_EPILOG = """\
Examples:
  qjl serve &                                  (then, in any shell of this user:)
  qjl ask report.pdf "Who signed it?"          (loads nothing: the server has the model)
  qjl ask report.pdf "When?"                   (the document cache's entry: no prefill either)
  qjl serve --idle 30m -m ./SmolLM2-360M.gguf  (stops after 30 minutes without a command)
  QJL_SERVER=0 qjl ask report.pdf "q"          (run alone, as without a server)

A command runs in the server with the client's stdin, stdout, stderr, folder and environment, one at a
time; interactive sessions run in the client. The socket is QJL_HOME/serve.sock, this user's only."""


def register(app) -> None:
    """Add `qjl serve` to the app."""
    @app.command("serve", epilog=SERVE_EPILOG)
    def serve_command(model: options.Model = None, idle: options.Idle = None, device: options.Device = None,
                      device_map: options.DeviceMap = None, max_memory: options.MaxMemory = None) -> None:
        """Keep the model loaded, and run `qjl ask` and `qjl cache save/load` of other shells here: no start-up."""
        from qjl.errors import QJLError
        from qjl.placement import make_placement

        from . import progress, render
        from .errors import user_errors

        with user_errors():
            seconds = parse_duration(idle) if idle else None
            placement = make_placement(device, device_map, max_memory)
            console = render.stderr_console()
            path = client.socket_path()
            try:
                sock = listen(path)
            except ServeError as e:
                raise QJLError(str(e)) from None
            try:
                keep_models()
                loaded = progress.load_model(model, console, placement)
                render.say(console, f"qjl serve: {loaded.name} loaded; ready on {path}. `qjl ask` and `qjl cache "
                                    f"save/load` of this user now run here (QJL_SERVER=0: alone). Ctrl-C stops.")
                serve(sock, seconds, lambda message: render.say(console, message))
            finally:
                sock.close()
                path.unlink(missing_ok=True)
