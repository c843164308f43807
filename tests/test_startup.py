"""Start-up: the commands that need no model import no torch (issue 12), checked in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_cache_file

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, sys
from qjl_cli.main import run
codes = []
for args in json.loads(sys.argv[1]):  # each command in turn, as `qjl ARGS...` would run it
    sys.argv = ["qjl", *args]
    try:
        run()
    except SystemExit as e:
        codes.append(e.code or 0)
    else:
        codes.append(0)
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules)
print("\nPROBE", json.dumps({"codes": codes, "heavy": heavy}))
"""


def _probe(commands: list[list[str]], home: Path) -> dict:
    env = {**os.environ, "QJL_HOME": str(home), "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], env=env, capture_output=True,
                          text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, (proc.stdout, proc.stderr)
    return json.loads(line[-1][len("PROBE "):])


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    """A real .qjl file of a tiny random model."""
    path = tmp_path_factory.mktemp("startup") / "doc.qjl"
    tiny_cache_file(path)
    return path


def test_commands_without_a_model_import_no_torch(cache_file, tmp_path):
    """--help, --version, cache info/list/prune/clear: no torch, transformers, safetensors or numpy."""
    bad = tmp_path / "bad.qjl"
    bad.write_bytes(cache_file.read_bytes()[:-10])
    commands = [["--help"], ["--version"], ["cache", "--help"], ["ask", "--help"], ["cache", "list"],
                ["cache", "list", "--json"], ["cache", "prune"], ["cache", "prune", "--max-size", "1G"],
                ["cache", "clear"], ["cache", "info", str(cache_file)], ["cache", "info", str(cache_file), "--json"],
                ["cache", "info", str(bad)]]
    assert _probe(commands, tmp_path / "home") == {"codes": [0] * 11 + [5], "heavy": []}
    assert _probe([["--help"]], tmp_path / "home") == {"codes": [0], "heavy": []}  # alone, as `qjl --help` runs


def test_the_torch_free_reader_agrees_with_the_store(cache_file):
    """cachefile's checksum over the mapped bytes is the store's over the tensors; the modes match the cache's."""
    import torch

    from qjl import cachefile, store
    from qjl.cache import COMPRESSED_MODES

    assert cachefile.COMPRESSED_MODES == COMPRESSED_MODES
    f = cachefile.open_file(cache_file)
    meta, tensors, _ = store._open(cache_file)
    assert cachefile.file_checksum(f) == store._checksum(meta, tensors) == meta["checksum"]
    assert {n: (e.dtype, e.shape) for n, e in f.tensors.items()} == {
        n: (str(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    assert all(str(getattr(torch, code[0].removeprefix("torch."))) == code[0] for code in cachefile.DTYPES.values())


def test_sizes_are_checked_before_the_checksum(cache_file, tmp_path, monkeypatch):
    import torch

    from qjl import cachefile
    from qjl.store import _open, write_cache_file

    meta, tensors, _ = _open(cache_file)
    path = write_cache_file(tmp_path / "huge.qjl", {**tensors, "layers.0.huge": torch.zeros(4 << 20)},
                            {k: v for k, v in meta.items() if k != "checksum"})

    def hashed(*args):
        raise AssertionError("the whole file was hashed before its sizes were checked")

    monkeypatch.setattr(cachefile, "file_checksum", hashed)
    with pytest.raises(cachefile.CacheFileError, match="more than"):
        cachefile.inspect_cache(path)
