"""QJL_HOME: where converted models, cached documents, compiled kernels and the server's socket live (torch-free,
imported by the thin client of `qjl serve` too)."""

from __future__ import annotations

import os
from pathlib import Path


def qjl_home() -> Path:
    """QJL_HOME, else the user cache dir's qjl folder."""
    env = os.environ.get("QJL_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qjl"))
