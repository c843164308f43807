"""Shared fixtures: an isolated QJL_HOME, the embedded model converted once, and a scripted fake model.

A test never needs the network: HF_HUB_OFFLINE is set before anything imports huggingface_hub
(which reads it once, at import).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# The automatic document cache is off unless a test turns it on (monkeypatch.setenv("QJL_CACHE", "1")): the
# other tests ask the same documents again and expect them read, and share one converted-model home.
os.environ["QJL_CACHE"] = "0"


@pytest.fixture
def one_thread():
    """Run a test of tiny tensors on one thread: on a loaded 2-core machine MKL's spinning second thread made
    hundreds of small QRs take minutes instead of a second."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def qjl_home(tmp_path, monkeypatch) -> Path:
    """QJL_HOME in a fresh temp dir, so a test never reads or writes the user's converted models and caches."""
    home = tmp_path / "qjl-home"
    monkeypatch.setenv("QJL_HOME", str(home))
    for var in ("QJL_MODEL", "QJL_DEBUG", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def embedded_model_home(tmp_path_factory) -> Path:
    """A QJL_HOME holding the embedded model converted to safetensors, converted once per test session.

    Reuses QJL_HOME from the environment when it already has models/ (a developer's warm home);
    otherwise converts into a session temp dir (about 20-30 s, once).
    """
    env = os.environ.get("QJL_HOME")
    home = Path(env) if env and (Path(env) / "models").is_dir() else tmp_path_factory.mktemp("qjl-home")
    from qjl.models import EMBEDDED, ModelError, resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QJL_HOME", str(home))
        try:
            resolve_model(EMBEDDED)
        except ModelError as e:
            pytest.fail(f"this test needs the embedded model: {e}")
    return home


@pytest.fixture
def embedded_home(qjl_home, embedded_model_home, monkeypatch) -> Path:
    """Point QJL_HOME at the converted embedded model (overrides qjl_home for tests that run the real model)."""
    monkeypatch.setenv("QJL_HOME", str(embedded_model_home))
    return embedded_model_home


# --- the CLI in-process ------------------------------------------------------------------------------
REPORT = "The general manager of the cooperative is Ana Ruiz.\nShe was appointed in 2019.\n"


@pytest.fixture
def doc(tmp_path) -> Path:
    """A two-line report whose answer the fake model scripts (and the embedded model finds)."""
    path = tmp_path / "report.txt"
    path.write_text(REPORT)
    return path


def invoke(*args, **kwargs):
    """Run `qjl ARGS...` in this process with Typer's CliRunner (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from qjl_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def tiny_cache_file(path: Path, extra: dict | None = None, source: dict | None = None):
    """A real .qjl file of a tiny random Llama (80 tokens, default settings) at path, plus `extra` tensors;
    returns the model's config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qjl.attention  # noqa: F401 - registers "qjl"
    from qjl.cache import QJLCache
    from qjl.config import QJLConfig
    from qjl.store import _file_tensors, cache_metadata, write_cache_file

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("qjl")
    cache = QJLCache(cfg, QJLConfig())
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 80)), past_key_values=cache)
    cache.freeze_document()
    meta = cache_metadata(cache, model_name="tiny", identity="tiny", suffix_template="Q: {question}\n", source=source)
    write_cache_file(path, {**_file_tensors(cache), **(extra or {})}, meta)
    return cfg


# --- a scripted fake model for CLI tests -------------------------------------------------------------
@dataclass
class FakeScript:
    """What the fake model does; tests change the fields before invoking the CLI."""

    pieces: list = field(default_factory=lambda: ["The ", "general ", "manager ", "is ", "Ana ", "Ruiz."])
    context_length: int = 8192
    name: str = "fake-model"
    identity: str = "fake"  # the model's identity (a cache file or document-cache entry is for one)
    fail: dict = field(default_factory=dict)  # stage ("load", "session", "prefill", "ask", "save_cache",
    # "load_cache") -> exception to raise
    interrupt_after: int | None = None  # the answer stops (as on Ctrl-C) after this many pieces
    calls: dict = field(default_factory=dict)  # what the CLI passed in, by stage

    def check(self, stage: str) -> None:
        if stage in self.fail:
            raise self.fail[stage]


@dataclass
class FakeLoaded:
    """Implements qjl_cli.seams.LoadedModelLike."""

    name: str
    context_length: int
    identity: str = "fake"
    placement: dict = field(default_factory=lambda: {"cpu": 30})  # {device: decoder layers on it}


class FakeSession:
    """Stands in for qjl.session.Session (implements qjl_cli.seams.SessionLike): counts words as tokens and
    answers with the scripted pieces. A cache file it saves holds only the document's token count."""

    PROMPT_TOKENS = 30  # chat template and instructions around the document

    def __init__(self, script: FakeScript, loaded: FakeLoaded, config):
        self.script, self.loaded, self.config = script, loaded, config
        self.document_tokens = 0
        self.remember = False
        self.turns: list[tuple[str, str, int]] = []  # (question, answer, tokens of the turn)

    def _limit(self, max_new_tokens: int) -> int:
        from qjl.session import QUESTION_RESERVE

        return self.loaded.context_length - QUESTION_RESERVE - max_new_tokens

    def _stats(self, n: int, prefill_s: float):
        from qjl.session import DocumentStats

        fp16 = n * 2 * 30 * 3 * 64 * 2
        bits = 16.0 if self.config.kv == "exact" else 3.0
        return DocumentStats(n, prefill_s, int(fp16 * bits / 16), bits, fp16)

    def _question_tokens(self, question: str) -> int:
        return len(question.split()) + 5

    def load_document(self, document, max_new_tokens=256, chunk=None, progress=None, truncate=None, questions=()):
        from qjl.errors import DocumentTooLongError

        text = document
        self.script.calls["prefill"] = dict(text=text, max_new_tokens=max_new_tokens, chunk=chunk, truncate=truncate)
        longest = max((self._question_tokens(q) for q in questions), default=0)
        if self.PROMPT_TOKENS + longest + max_new_tokens > self.loaded.context_length:
            from qjl.conversation import question_too_long

            raise question_too_long(longest, self.PROMPT_TOKENS, 0, max_new_tokens, self.loaded.context_length)
        n = len(text.split()) + self.PROMPT_TOKENS
        limit = self._limit(max_new_tokens)
        cut = None
        if n > limit and truncate:  # words stand for tokens: keep the head, the tail or both ends
            words, keep = text.split(), limit - self.PROMPT_TOKENS
            kept = {"head": words[:keep], "tail": words[len(words) - keep:],
                    "middle": words[:(keep + 1) // 2] + words[len(words) - keep // 2:]}[truncate]
            self.script.calls["prefill"]["kept"] = " ".join(kept)
            cut = {"mode": truncate, "document_tokens": n, "kept_tokens": limit, "dropped_tokens": n - limit,
                   "dropped_chars": len(text) - len(" ".join(kept)), "limit": limit}
            n = limit
        if n > limit:
            raise DocumentTooLongError(n, limit, self.loaded.context_length)
        self.script.check("prefill")
        if progress:
            progress(n // 2, n)
            progress(n, n)
        self.document_tokens = n
        stats = self._stats(n, 0.5)
        if cut:
            stats.extra["truncated"] = cut
        return stats

    def cache_key(self, document, max_new_tokens=256, truncate=None, questions=()):
        """As Session.cache_key: the text, the model, the settings and the cut (words stand for tokens)."""
        from qjl.cachefile import FORMAT_VERSION
        from qjl.doccache import document_key

        self.script.calls["cache_key"] = dict(truncate=truncate, questions=list(questions))
        n, limit = len(document.split()) + self.PROMPT_TOKENS, self._limit(max_new_tokens)
        cut = f"{truncate}:{limit}" if truncate and n > limit else ""
        return document_key(document, self.loaded.identity, self.config.to_json(), cut, FORMAT_VERSION)

    def save_cache(self, path, source_info=None):
        """Writes the mode and the token count, atomically as the store does (a temp file renamed into place)."""
        self.script.calls["save_cache"] = dict(path=path, source_info=source_info)
        self.script.check("save_cache")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.fake.tmp")
        tmp.write_text(json.dumps({"kv": self.config.kv, "document_tokens": self.document_tokens}))
        os.replace(tmp, path)
        return path

    def load_cache(self, path, max_new_tokens=256, questions=()):
        """Reads what save_cache wrote (the real store.inspect_cache refuses such a file: patch it to get here)."""
        from qjl.config import QJLConfig
        from qjl.errors import CacheFileError, DocumentTooLongError

        self.script.calls["load_cache"] = dict(path=path, max_new_tokens=max_new_tokens, questions=list(questions))
        self.script.check("load_cache")
        try:
            saved = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CacheFileError(f"{path}: not a fake cache file ({e})") from None
        self.config, self.document_tokens = QJLConfig(kv=saved["kv"]), saved["document_tokens"]
        if self.document_tokens > self._limit(max_new_tokens):
            raise DocumentTooLongError(self.document_tokens, self._limit(max_new_tokens), self.loaded.context_length)
        stats = self._stats(self.document_tokens, 0.0)
        stats.extra.update(cache_file=str(path), cache_load_s=0.01)
        return stats

    def rollback(self):
        self.script.calls["rollback"] = self.script.calls.get("rollback", 0) + 1
        self.turns.clear()

    def history(self):
        return [(q, a) for q, a, _ in self.turns]

    def tail_tokens(self):
        return sum(n for _, _, n in self.turns)

    def ask(self, question, max_new_tokens=256, on_text=None):
        """A conversation (`remember`) keeps each turn (question and answer tokens) and drops the oldest when the
        next would not fit the context, as the library does."""
        from qjl.session import Answer

        self.script.calls["ask"] = dict(question=question, max_new_tokens=max_new_tokens, on_text=on_text)
        self.script.calls.setdefault("questions", []).append(question)
        self.script.check("ask")
        q, room = self._question_tokens(question), self.loaded.context_length - self.document_tokens - max_new_tokens
        dropped = 0
        while self.remember and self.turns and self.tail_tokens() + q > room:
            self.turns.pop(0)
            dropped += 1
        if q > room:
            from qjl.conversation import question_too_long

            raise question_too_long(q, self.document_tokens, 0, max_new_tokens, self.loaded.context_length)
        history = self.tail_tokens() if self.remember else 0
        pieces = self.script.pieces[:max_new_tokens]
        stopped = self.script.interrupt_after is not None
        if stopped:
            pieces = pieces[:self.script.interrupt_after]
        for piece in pieces:
            if on_text:
                on_text(piece)
        text = "".join(pieces).strip()
        if self.remember:
            self.turns.append((question, text, q + len(pieces)))
        extra = dict(history_tokens=history, dropped_turns=dropped) if self.remember else {}
        return Answer(text, q, len(pieces), 0.01, 2.0, stopped, **extra)


@pytest.fixture
def fake_model(monkeypatch) -> FakeScript:
    """Replace the CLI's model loading and Session (qjl_cli.seams) with the scripted fake; returns the script."""
    import qjl_cli.seams as seams

    script = FakeScript()

    def load_model(spec, progress=None, placement=None, fit=None):
        script.calls["load"] = dict(spec=spec)
        script.calls["placement"], script.calls["fit"] = placement, fit
        script.check("load")
        return FakeLoaded(script.name, script.context_length, script.identity)

    def new_session(loaded, config):
        script.calls["session"] = dict(config=config)
        script.check("session")
        return FakeSession(script, loaded, config)

    monkeypatch.setattr(seams, "load_model", load_model)
    monkeypatch.setattr(seams, "new_session", new_session)
    monkeypatch.setattr(seams, "context_hint", lambda spec: script.context_length, raising=False)
    return script
