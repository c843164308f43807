"""The thin side of `qjl serve`: a command that needs the model is handed to a running server, which answers on
this process's own stdin, stdout and stderr (passed over the socket), so nothing here imports torch,
transformers or even the CLI.

Protocol (a Unix socket, QJL_HOME/serve.sock, only the user's own): the client sends one frame (4-byte big-endian
length + JSON {"argv", "cwd", "env"}) with its file descriptors 0, 1 and 2 attached; the server answers ACK when it
takes the request (a busy server answers later), then, once the command is over, the exit code as 4 bytes (or
LOCAL: run it here, e.g. an interactive session, which needs the terminal's foreground). While it waits the
client sends INTERRUPT on Ctrl-C and TERMINATE on SIGTERM; the server raises them in the command as the local
process would. See docs/ARCHITECTURE.md, "qjl serve".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Optional

ACK = b"a"
INTERRUPT = b"i"
TERMINATE = b"t"
LOCAL = -1  # exit-code word: the server will not run this one; run it in this process
SOCKET_NAME = "serve.sock"
MAX_PATH = 100  # sun_path holds 108 bytes on Linux
FORWARDED = (("ask",), ("cache", "save"), ("cache", "load"))  # the commands that load a model


class RunLocally(BaseException):
    """Raised inside a served command that must run in the client's own process (an interactive session); a
    BaseException, so the commands' error handling lets it through to the server."""


serving = False  # True inside the server's process: interactive sessions raise RunLocally


def refuse_interactive() -> None:
    if serving:
        raise RunLocally


def socket_path() -> Path:
    from qjl.home import qjl_home

    return qjl_home() / SOCKET_NAME


def disabled() -> bool:
    return os.environ.get("QJL_SERVER", "").strip().lower() in ("0", "off", "no", "false")


def forwardable(argv: list[str]) -> bool:
    """A command that loads a model, not asking for help."""
    if any(a in ("-h", "--help") for a in argv):
        return False
    return any(tuple(argv[:len(cmd)]) == cmd for cmd in FORWARDED)


def forward(argv: list[str]) -> Optional[int]:
    """Run `qjl ARGV` in the server when one is running -> its exit code; None: run it here (no server, QJL_SERVER=0,
    a command the server does not take, or the server asked for it)."""
    if disabled() or not forwardable(argv):
        return None
    path = socket_path()
    if not path.is_socket():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(sock, [struct.pack(">I", len(payload)) + payload], [0, 1, 2])
    except OSError:  # a socket left by a server that died, or a closed standard stream: run here
        sock.close()
        return None
    with sock:
        code = _wait(sock)
    return None if code == LOCAL else code


def _wait(sock: socket.socket) -> int:
    """Relay Ctrl-C and SIGTERM to the server until it sends the exit code."""
    def relay(signum, frame):
        try:
            sock.sendall(TERMINATE if signum == signal.SIGTERM else INTERRUPT)
        except OSError:
            pass

    old = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sock.settimeout(1.0)
        try:
            first = _recv_exact(sock, 1)
        except TimeoutError:
            print("qjl: waiting for `qjl serve` (busy with another command)", file=sys.stderr, flush=True)
            sock.settimeout(None)
            first = _recv_exact(sock, 1)
        sock.settimeout(None)
        if first != ACK:
            raise ConnectionError("unexpected reply")
        return struct.unpack(">i", _recv_exact(sock, 4))[0]
    except (ConnectionError, OSError):
        print("qjl: error: the server (`qjl serve`) stopped before the command ended", file=sys.stderr)
        return 1
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def run() -> None:
    """Console-script entry point: a running server answers the command; else the CLI runs in this process."""
    code = forward(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .main import run as run_here

    run_here()


if __name__ == "__main__":
    run()
