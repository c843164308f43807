"""The automatic document cache's store (qjl/doccache.py): keys, use order, eviction, what may be deleted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qjl.doccache import DocumentCache, document_key, parse_size, remove_stale_temps
from qjl.errors import ConfigError


@pytest.mark.parametrize("text,want", [("2G", 2 * 1024 ** 3), ("500m", 500 * 1024 ** 2), ("1.5GiB", 3 * 1024 ** 3 // 2),
                                       ("4096", 4096), (" 10 KB ", 10240)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "2X", "-1G", "G", "1e9", "two"])
def test_not_sizes(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_every_input_changes_the_key():
    base = dict(text="doc", model_identity="m", config_json="{}", cut="", format_version="3")
    k = document_key(**base)
    assert len(k) == 32 and k == document_key(**base)
    for field, other in (("text", "doc "), ("model_identity", "n"), ("config_json", '{"kv": "qjl"}'),
                         ("cut", "head"), ("format_version", "4")):
        assert document_key(**(base | {field: other})) != k, field
    # no two inputs run together: moving a character across a boundary changes the key
    assert document_key("ab", "c", "") != document_key("a", "bc", "")


def _entry(cache: DocumentCache, key: str, size: int, when: float):
    path = cache.store_path() / f"{key}.qjl"
    path.write_bytes(b"x" * size)
    os.utime(path, (when, when))
    return path


def test_lookup_marks_use_and_prune_goes_least_recent_first(tmp_path):
    cache = DocumentCache(tmp_path / "documents")
    keys = [f"{i:032x}" for i in range(4)]
    for i, k in enumerate(keys):
        _entry(cache, k, 100, 1000 + i)
    other = cache.store_path() / "notes.qjl"
    other.write_bytes(b"y" * 1000)  # not a name the store writes: never deleted
    assert cache.lookup(keys[0]) == cache.path_for(keys[0])  # now the most recent
    assert cache.lookup("f" * 32) is None
    assert [e.key for e in cache.entries()] == keys[1:] + keys[:1]
    removed = cache.prune(250, keep=keys[1])
    assert [e.key for e in removed] == keys[2:4]
    assert {e.key for e in cache.entries()} == {keys[0], keys[1]} and other.exists()
    assert [e.key for e in cache.clear()] and cache.entries() == [] and other.exists()


def test_remove_refuses_what_is_not_an_entry(tmp_path):
    cache = DocumentCache(tmp_path)
    with pytest.raises(ValueError):
        cache.remove(tmp_path / "report.qjl")


def test_stale_temporary_files_of_dead_processes_go(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".doc.qjl.{dead}.abc123.tmp"
    live = tmp_path / f".doc.qjl.{os.getpid()}.def456.tmp"
    unrelated = tmp_path / ".doc.qjl.tmp"
    for p in (stale, live, unrelated):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and unrelated.exists()
