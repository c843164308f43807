"""What the CLI needs from a model and a session, and the two functions that make them.

The commands call `seams.load_model` and `seams.new_session` through this module, so tests replace
both with a scripted fake (tests/conftest.py) that implements the same Protocols. Both import torch
and transformers only when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, runtime_checkable

from qjl.config import QJLConfig

if TYPE_CHECKING:  # the real classes import torch
    from qjl.results import Answer, DocumentStats


@runtime_checkable
class LoadedModelLike(Protocol):
    """A loaded model as the CLI sees it: qjl.models.LoadedModel."""

    @property
    def name(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def identity(self) -> str: ...

    @property
    def placement(self) -> dict[str, int]: ...  # {device: decoder layers on it}


@runtime_checkable
class SessionLike(Protocol):
    """A question-answering session as the CLI sees it: qjl.session.Session."""

    config: QJLConfig  # after load_cache, the settings the file was saved with
    remember: bool  # True: a conversation (each answer sees the kept turns), else independent questions

    def load_document(self, document: str, max_new_tokens: int = 256, chunk: Optional[int] = None,
                      progress: Optional[Callable[[int, int], None]] = None,
                      truncate: Optional[str] = None, questions: Sequence[str] = ()) -> DocumentStats: ...

    def load_cache(self, path, max_new_tokens: int = 256, questions: Sequence[str] = ()) -> DocumentStats: ...

    def cache_key(self, document: str, max_new_tokens: int = 256, truncate: Optional[str] = None,
                  questions: Sequence[str] = ()) -> str: ...

    def save_cache(self, path, source_info: Optional[dict] = None) -> Path: ...

    def ask(self, question: str, max_new_tokens: int = 256,
            on_text: Optional[Callable[[str], None]] = None) -> Answer: ...

    def rollback(self) -> None: ...

    def history(self) -> list[tuple[str, str]]: ...

    def tail_tokens(self) -> int: ...


def context_hint(spec: Optional[str]) -> Optional[int]:
    """The model's context in tokens without loading it (torch-free; None when unknown): bounds the text read."""
    from qjl.models import context_hint as _hint

    return _hint(spec)


def load_model(spec: Optional[str], progress: Optional[Callable[[str], None]] = None, placement=None,
               fit=None) -> LoadedModelLike:
    """Load the model (imports torch/transformers only now). placement: qjl.placement.Placement (one device or
    accelerate's device map); fit: (document text or tokens, kv mode), checked against --max-memory first."""
    # transformers' and the hub's own tqdm bars ("Loading weights", "Converting and de-quantizing GGUF tensors",
    # downloads) would print on stderr even off a terminal and fight the Rich spinner on one, which shows the
    # elapsed time instead. The GGUF bar uses tqdm directly, so only tqdm's TQDM_DISABLE (read when tqdm is
    # first imported, i.e. below) silences it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    from qjl.models import load_model as _load_model

    hf_logging.disable_progress_bar()
    return _load_model(spec, progress=progress, placement=placement, fit=fit)


def new_session(loaded: LoadedModelLike, config: QJLConfig) -> SessionLike:
    from qjl.session import Session

    return Session(loaded, config)
