"""`qjl cache list`, `qjl cache prune` and `qjl cache clear`: the automatic document cache (qjl/doccache.py).

Plugged into `qjl cache` by main.py with `cachestore.register(cache_app)`. Torch-free: an entry's facts come
from its header (qjl/cachefile.py), and only files the store wrote are ever deleted (doccache enforces names).
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Annotated, Optional

import typer

from qjl import doccache
from qjl.cachefile import read_metadata
from qjl.errors import QJLError

from .errors import user_errors
from .options import JsonObject

MaxSize = Annotated[Optional[str], typer.Option(
    "--max-size", metavar="SIZE", show_default=False,
    help="Keep at most this much: bytes with an optional K, M, G or T (powers of 1024), e.g. 2G or 500M. "
         "Default: $QJL_CACHE_MAX, else 2G.")]


def _row(entry: doccache.Entry) -> dict:
    """What `cache list` shows of one entry; an entry whose header cannot be read shows what is known."""
    row = {"key": entry.key, "document": None, "tokens": None, "model": None, "mode": None, "bytes": entry.size,
           "last_used": _dt.datetime.fromtimestamp(entry.last_used).astimezone().isoformat(timespec="seconds"),
           "path": str(entry.path)}
    try:
        meta = read_metadata(entry.path)
        row.update(document=meta.get("source_name") or None, model=meta.get("model_name"),
                   tokens=int(meta["document_tokens"]), mode=json.loads(meta["config"]).get("kv"))
    except (QJLError, KeyError, ValueError, TypeError, AttributeError):
        row["unreadable"] = True
    return row


def _table(rows: list[dict], entries: list[doccache.Entry]) -> str:
    head = ("document", "tokens", "model", "mode", "size", "last used")
    body = [(r["document"] or "?", f"{r['tokens']:,}" if r["tokens"] is not None else "?", r["model"] or "?",
             r["mode"] or "?", f"{r['bytes'] / 1e6:.1f} MB", doccache.age(e.last_used) + " ago")
            for r, e in zip(rows, entries)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]
    return "\n".join(lines)


def cache_list(as_json: JsonObject = False) -> None:
    """The documents in the automatic cache, most recently used first: name, tokens, model, mode, size, last use."""
    with user_errors():
        store = doccache.DocumentCache()
        entries = store.entries()[::-1]
        rows = [_row(e) for e in entries]
        total = sum(e.size for e in entries)
        if as_json:
            typer.echo(json.dumps({"folder": str(store.root), "bytes": total, "max_bytes": doccache.max_bytes(),
                                   "entries": rows}, ensure_ascii=False))
            return
        if not rows:
            typer.echo(f"no cached documents in {store.root}")
            return
        typer.echo(_table(rows, entries))
        typer.echo(f"{len(rows)} documents, {total / 1e6:.1f} MB in {store.root} (cap {_size(doccache.max_bytes())})")


def _size(n: int) -> str:
    for unit, size in (("T", 1024 ** 4), ("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n} bytes"


def _report(store: doccache.DocumentCache, removed: list[doccache.Entry]) -> None:
    left = store.entries()
    typer.echo(f"removed {len(removed)} documents ({sum(e.size for e in removed) / 1e6:.1f} MB); {len(left)} left "
               f"({sum(e.size for e in left) / 1e6:.1f} MB) in {store.root}")


def cache_prune(max_size: MaxSize = None) -> None:
    """Remove the least recently used documents until the cache holds at most --max-size; and the temporary
    files of saves that were killed."""
    with user_errors():
        limit = doccache.parse_size(max_size) if max_size is not None else doccache.max_bytes()
        store = doccache.DocumentCache()
        _report(store, store.prune(limit))


def cache_clear() -> None:
    """Remove every document of the automatic cache (only files it wrote)."""
    with user_errors():
        store = doccache.DocumentCache()
        _report(store, store.clear())


def register(cache_app: typer.Typer) -> None:
    cache_app.command("list")(cache_list)
    cache_app.command("prune")(cache_prune)
    cache_app.command("clear")(cache_clear)
