"""The automatic document cache: a document's compressed cache kept under QJL_HOME, so asking it again needs
no prefill.

An entry is an ordinary `.qjl` cache file (qjl/store.py: atomic, checksummed) named by a hash of everything
that shapes it: the document text as read, the model's identity, the settings, how the document was cut to
fit, the prompt template's version and the file format. Using an entry touches its modification time, so
the least recently used go first when the store outgrows its cap (QJL_CACHE_MAX, default 2 GiB). Only files
whose names this module writes (32 hex digits + .qjl) in its own folder are ever deleted. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ENTRY = re.compile(r"^[0-9a-f]{32}\.qjl$")
# A temporary file of an interrupted save: .NAME.qjl.PID.RANDOM.tmp (qjl/store.py write_cache_file).
TEMP = re.compile(r"^\.(?P<name>.+\.qjl)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$", re.IGNORECASE)
# Bump when the prompt around the document changes (qjl/session.py split_prompt and its templates).
PROMPT_VERSION = "1"
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '4096' -> bytes (powers of 1024); ConfigError for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{text!r} is not a size; give a number of bytes with an optional K, M, G or T (e.g. 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def enabled() -> bool:
    """QJL_CACHE=0 turns the automatic cache off."""
    return os.environ.get("QJL_CACHE", "1").strip() != "0"


def max_bytes() -> int:
    value = os.environ.get("QJL_CACHE_MAX")
    return DEFAULT_MAX_BYTES if value is None or not value.strip() else parse_size(value)


def document_key(text: str, model_identity: str, config_json: str, cut: str = "", format_version: str = "") -> str:
    """The entry name of a document: a hash of every input that shapes its cache."""
    h = hashlib.sha256()
    for part in (format_version, PROMPT_VERSION, model_identity, config_json, cut, text):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:32]


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files of saves whose process is gone (killed mid-save); returns what went."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = TEMP.match(name)
        if m and not pid_alive(int(m.group("pid"))):
            try:
                os.unlink(folder / name)
                removed.append(folder / name)
            except OSError:
                pass
    return removed


@dataclass
class Entry:
    path: Path
    size: int
    last_used: float  # seconds since the epoch

    @property
    def key(self) -> str:
        return self.path.stem


class DocumentCache:
    """The entries under `root` (QJL_HOME/documents by default)."""

    def __init__(self, root: Path | None = None):
        if root is None:
            from .models import qjl_home

            root = qjl_home() / "documents"
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.qjl"

    def lookup(self, key: str) -> Path | None:
        """The entry's path if it is there (and marks it used), else None."""
        path = self.path_for(key)
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def entries(self) -> list[Entry]:
        """Every entry, least recently used first."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return out
        for name in names:
            if ENTRY.match(name):
                try:
                    st = (self.root / name).stat()
                except OSError:
                    continue
                out.append(Entry(self.root / name, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: (e.last_used, e.path.name))

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def remove(self, key_or_path: str | Path) -> bool:
        path = Path(key_or_path) if isinstance(key_or_path, Path) else self.path_for(key_or_path)
        if path.parent != self.root or not ENTRY.match(path.name):
            raise ValueError(f"{path} is not an entry of the document cache")
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def prune(self, limit: int, keep: str | None = None) -> list[Entry]:
        """Remove least recently used entries (never `keep`) until the store holds at most `limit` bytes; stale
        temporary files go too. Returns the entries removed."""
        remove_stale_temps(self.root)
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for e in entries:
            if total <= limit:
                break
            if e.key == keep:
                continue
            if self.remove(e.path):
                removed.append(e)
            total -= e.size
        return removed

    def clear(self) -> list[Entry]:
        return self.prune(-1)

    def store_path(self) -> Path:
        """The folder, created (entries are written into it by store.write_cache_file, atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root


def age(seconds_since_epoch: float) -> str:
    """'3 s', '5 min', '2 h', '4 days' ago."""
    d = max(0.0, time.time() - seconds_since_epoch)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if d >= size:
            return f"{d / size:.0f} {unit}"
    return f"{d:.0f} s"
