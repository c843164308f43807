"""The automatic document cache on the `qjl ask DOC...` path; the store itself is qjl/doccache.py.

The entry of exactly this input (text, model, settings, prompt, cut: `Session.cache_key`) is loaded when it is
there (`cache: hit, 0.02 s` on stderr), else the document is read and the entry stored (`cache: stored 24.7 MB`)
and the store pruned to its cap (QJL_CACHE_MAX). A damaged or stale entry is removed and rebuilt with one
warning; an entry that cannot be stored (QJL_HOME unwritable or full) is one warning. Neither stops the answer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from rich.console import Console

from qjl import doccache
from qjl.cachefile import COMPRESSED_MODES
from qjl.config import QJLConfig
from qjl.errors import CacheFileError, QJLError

from . import progress, render

if TYPE_CHECKING:
    from qjl.results import DocumentStats

    from .seams import SessionLike


def wanted(config: QJLConfig) -> bool:
    """Whether an ask without --no-cache uses the cache: not QJL_CACHE=0, a compressed mode (only those have
    files). A QJL_CACHE_MAX that is not a size is a usage error now, before anything slow."""
    if not doccache.enabled() or config.kv not in COMPRESSED_MODES:
        return False
    doccache.max_bytes()
    return True


def fill(session: SessionLike, text: str, max_new_tokens: int, truncate: str | None, questions: Sequence[str],
         console: Console, prefill: Callable[[], DocumentStats], source: Callable[[], dict]) -> DocumentStats:
    """The document's cache in `session`: loaded from its entry, or `prefill()`ed and stored as a new entry."""
    store = doccache.DocumentCache()
    key = session.cache_key(text, max_new_tokens, truncate, questions)
    path = store.lookup(key)
    if path is not None:
        stats = _load(session, store, key, path, max_new_tokens, questions, console)
        if stats is not None:
            return stats
    stats = prefill()
    _store(session, store, key, source, console)
    return stats


def _load(session: SessionLike, store: doccache.DocumentCache, key: str, path: Path, max_new_tokens: int,
          questions: Sequence[str], console: Console) -> DocumentStats | None:
    t0 = time.perf_counter()
    try:
        stats = progress.load_cache(session, str(path), max_new_tokens, console, questions)
    except CacheFileError as e:
        render.warn(console, f"the cached copy of this document was unusable and is read again ({e})")
        try:
            store.remove(key)
        except OSError:
            pass
        return None
    stats.extra["cache"] = "hit"
    render.say(console, f"cache: hit, {time.perf_counter() - t0:.2f} s", style="dim")
    return stats


def _store(session: SessionLike, store: doccache.DocumentCache, key: str, source: Callable[[], dict],
           console: Console) -> None:
    try:
        folder = store.store_path()
        path = session.save_cache(folder / f"{key}.qjl", source())
        size = os.path.getsize(path)
        store.prune(doccache.max_bytes(), keep=key)
    except (QJLError, OSError) as e:
        reason = " ".join(str(e).split()) if isinstance(e, QJLError) else f"{store.root}: {e.strerror or e}"
        render.warn(console, f"the document cache could not be stored ({reason}); the answer comes without it")
        return
    render.say(console, f"cache: stored {size / 1e6:.1f} MB", style="dim")
