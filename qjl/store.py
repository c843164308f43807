"""Cache files: the document segment of a frozen QJLCache as one safetensors file (docs/ARCHITECTURE.md).

Layout of a `.qjl` file:
  tensors   `layers.{i}.{name}` for every document tensor of layer i (codec states, exact window,
            per-layer parameters), from QJLLayer.document_tensors(), and each per-model matrix (projection,
            rotations) once as `{name}s.{seed}`, from QJLCache.shared_matrices(); every tensor's layout is
            in docs/ARCHITECTURE.md, and this module knows none of them;
  metadata  strings only (safetensors' rule): format name and version, QJLConfig JSON, model name and
            identity, geometry, token counts, the prompt's suffix template, source file, creation time,
            and a sha256 checksum over the metadata and every tensor's name, dtype, shape and bytes.

No pickle anywhere: safetensors holds raw bytes and a JSON header, so a file from a stranger cannot run
code. Every problem with a file raises `CacheFileError`, one line that says what to do.

Loading memory-maps the file (qjl/cachefile.py, copy-on-write): the tensors are views of the mapped file (a 200 MB
tensor measured 2 MB of RSS on loading), so the loaded document segment shares pages with the page cache.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .cache import QJLCache, kv_geometry
from .cachefile import (FORMAT_NAME, FORMAT_VERSION, CacheFile, check_checksum, check_header, checksum,  # noqa: F401
                        inspect_cache, meta_int, open_file, parse_config, public_meta)
from .config import QJLConfig
from .doccache import remove_stale_temps
from .errors import CacheFileError  # noqa: F401 - re-exported
# Written in pieces so a huge cache never needs a second copy in a single write call.
_CHUNK_BYTES = 1 << 20
_HALF_DTYPES = (torch.float16, torch.bfloat16)



# --- helpers ---------------------------------------------------------------------------------------
def describe_source(name: str, text: str, path: str | os.PathLike | None = None) -> dict:
    """Source info for a cache file: name, size and sha256 of the file's bytes (of the text for stdin)."""
    if path is not None and str(path) != "-" and Path(path).is_file():
        data = Path(path).read_bytes()
    else:
        data = text.encode("utf-8")
    return {"name": str(name), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _raw(t: torch.Tensor):
    """A tensor's bytes, brought to the CPU alone (a mapped file's are not copied): what is hashed and written."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy() if t.numel() else b""


def _checksum(metadata: dict, tensors: dict[str, torch.Tensor]) -> str:
    """cachefile.checksum's sha256 (metadata without the checksum, then each name, dtype, shape and bytes in name
    order), computed one tensor at a time so that a cache spread over devices is never gathered in one place."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(_raw(t))
    return h.hexdigest()


def _file_tensors(cache: QJLCache) -> dict[str, torch.Tensor]:
    """Every tensor a file stores, by file name (`layers.{i}.{name}`, and each shared matrix once), where it lives
    (each layer's on its own device): no copy is made here."""
    out = {f"layers.{layer.layer_idx}.{name}": t for layer in cache.layers
           for name, t in layer.document_tensors().items()}
    out.update(cache.shared_matrices())
    return out


def _header(tensors: dict[str, torch.Tensor], metadata: dict) -> tuple[bytes, list[str]]:
    """(the safetensors header, padded to 8 bytes as safetensors pads it; the order of the data): the data ordered
    as safetensors orders it (wider dtypes first, then by name), so every tensor starts aligned to its dtype."""
    from .cachefile import DTYPES

    codes = {torch_name: code for code, (torch_name, _) in DTYPES.items()}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata}
    at = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": codes[str(t.dtype)], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


# --- save ------------------------------------------------------------------------------------------
def cache_metadata(cache: QJLCache, *, model_name: str, identity: str, suffix_template: str,
                   source: dict | None = None, dtype: str = "", revision: str = "") -> dict:
    if not isinstance(cache, QJLCache):
        raise CacheFileError("only a compressed cache (--kv qjl or turbo) can be saved to a cache file")
    if not all(layer.frozen for layer in cache.layers):
        raise CacheFileError("the cache holds no finished document (prefill a document before saving)")
    source = source or {}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": cache.config.to_json(),
        "model_name": str(model_name),
        "model_identity": str(identity),
        "model_dtype": str(dtype).removeprefix("torch."),
        "model_revision": str(revision),
        "num_layers": str(cache.num_layers),
        "num_kv_heads": str(cache.num_kv_heads),
        "head_dim": str(cache.head_dim),
        "document_tokens": str(cache.document_tokens),
        "n_compressed": json.dumps([layer.n_compressed for layer in cache.layers]),
        "suffix_template": suffix_template,
        "source_name": str(source.get("name", "")),
        "source_size": str(source.get("size", "")),
        "source_sha256": str(source.get("sha256", "")),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_cache_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write tensors (on any devices) + metadata (with its checksum) as one safetensors file, atomically: a temp file
    in the same folder, written tensor by tensor, fsync, rename."""
    path = Path(path)
    metadata = dict(metadata)
    metadata["checksum"] = _checksum(metadata, tensors)
    head, order = _header(tensors, metadata)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise CacheFileError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for name in order:  # one tensor at a time off its device: no copy of the whole cache anywhere
                view = memoryview(_raw(tensors[name])).cast("B")
                for start in range(0, len(view), _CHUNK_BYTES):
                    f.write(view[start:start + _CHUNK_BYTES])
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CacheFileError(f"cannot write {path}: {e.strerror or e}; check the folder and free space") from None
        raise
    _fsync_dir(folder)
    remove_stale_temps(folder)  # of saves into this folder that were killed (SIGKILL) mid-write
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_cache(path: str | os.PathLike, cache: QJLCache, *, model_name: str, identity: str, suffix_template: str,
               source: dict | None = None, dtype: str = "", revision: str = "") -> Path:
    """Save the document segment of a frozen QJLCache to `path`, with what a later load checks it against."""
    meta = cache_metadata(cache, model_name=model_name, identity=identity, suffix_template=suffix_template,
                          source=source, dtype=dtype, revision=revision)
    return write_cache_file(path, _file_tensors(cache), meta)


# --- read ------------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[dict, dict[str, torch.Tensor], CacheFile]:
    """(metadata, {name: tensor}, the open file): the layout checked by qjl/cachefile.py, every tensor a
    copy-on-write view of the file's memory map."""
    f = open_file(path)
    tensors = {}
    for name, e in f.tensors.items():
        dtype = getattr(torch, e.dtype.removeprefix("torch."))
        if e.nbytes == 0:
            tensors[name] = torch.empty(e.shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(f.map, dtype=dtype, count=e.nbytes // dtype.itemsize,
                                             offset=e.start).view(e.shape)
    return f.metadata, tensors, f


def _compressed_counts(meta: dict, config: QJLConfig, most: int, n_layers: int, path: Path) -> list[int]:
    """Compressed tokens of each layer: whole groups, at most `most` (the document less its sink)."""
    try:
        n_compressed = json.loads(meta["n_compressed"])
        ok = (isinstance(n_compressed, list) and len(n_compressed) == n_layers
              and all(type(n) is int and 0 <= n <= most and n % config.group_size == 0 for n in n_compressed))
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise CacheFileError(f"{path}: its token counts per layer are inconsistent; the file is corrupted, "
                             f"save it again")
    return n_compressed


def _window_layout(tensors: dict, path: Path) -> tuple[int, torch.dtype]:
    """(documents in the batch, the exact tokens' dtype), read off the first layer's window."""
    try:
        window = tensors["layers.0.window_keys"]
        batch, storage_dtype = int(window.shape[0]), window.dtype
    except (KeyError, IndexError):
        raise CacheFileError(f"{path}: tensor layers.0.window_keys is missing or empty; the file is corrupted, "
                             f"save it again") from None
    if storage_dtype not in _HALF_DTYPES or batch < 1:
        raise CacheFileError(f"{path}: the exact window is {storage_dtype} for {batch} documents; the file is "
                             f"corrupted, save it again")
    return batch, storage_dtype


def _check_tensors(tensors: dict, expected: dict, indices: dict[str, bool], head_dim: int, path: Path) -> None:
    """The file's tensors are exactly the expected ones, each of its dtype and shape, and no index in them
    points outside a head (gather would then fail on a forged file)."""
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        what = f"unexpected tensor {extra[0]}" if extra else f"missing tensor {missing[0]}"
        raise CacheFileError(f"{path}: {what}; the file does not match its settings, save the document again")
    for name, (want_dtype, want_shape) in expected.items():
        t = tensors[name]
        if t.dtype != want_dtype or tuple(t.shape) != want_shape:
            raise CacheFileError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected {want_dtype} "
                                 f"{want_shape}; the file does not match the model, save the document again")
    for name, t in tensors.items():
        ascending = indices.get(name.rsplit(".", 1)[-1])
        if ascending is not None and t.numel():
            if int(t.min()) < 0 or int(t.max()) >= head_dim:
                raise CacheFileError(f"{path}: tensor {name} holds channel numbers outside 0..{head_dim - 1}; "
                                     f"the file is corrupted, save the document again")
            if ascending and t.shape[-1] > 1 and not bool((t.diff(dim=-1) > 0).all()):
                raise CacheFileError(f"{path}: tensor {name} repeats or disorders its channels; the file is "
                                     f"corrupted, save the document again")


def _who(meta: dict) -> str:
    """'bfloat16, revision abc123, ' from a file's metadata (or a model's): what tells two models apart."""
    parts = [meta.get("model_dtype") or "", f"revision {meta['model_revision'][:12]}" if meta.get("model_revision")
             else ""]
    return "".join(f"{p}, " for p in parts if p)


def read_cache_file(path: str | os.PathLike, model_config, identity: str, model_name: str = "this model",
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    devices=None, revision: str = "") -> tuple[QJLCache, dict]:
    """Validate a cache file against a model and rebuild its frozen QJLCache -> (cache, metadata).

    Layer i's tensors go to devices[i] (each straight from the file's memory map), else all to `device` (CPU)."""
    model = {"model_dtype": str(dtype).removeprefix("torch.") if dtype else "", "model_revision": revision}
    path = Path(path)
    meta, tensors, f = _open(path)
    check_header(meta, path)
    if meta.get("model_identity") != identity:
        raise CacheFileError(f"{path} was made by model {meta.get('model_name', '?')!r} ({_who(meta)}identity "
                             f"{str(meta.get('model_identity'))[:12]}), not {model_name} ({_who(model)}identity "
                             f"{identity[:12]}); load it with that model (--model) and dtype, or save the document "
                             f"again with this one")
    config = parse_config(meta, path)
    n_layers, n_kv, head_dim = kv_geometry(model_config)
    for key, want in (("num_layers", n_layers), ("num_kv_heads", n_kv), ("head_dim", head_dim)):
        if meta_int(meta, key, path) != want:
            raise CacheFileError(f"{path}: {key} is {meta[key]} but the model has {want}; load it with the model "
                                 f"that saved it")
    tokens = meta_int(meta, "document_tokens", path)
    n_sink = min(config.sink_tokens, tokens)  # the sink fills before anything is compressed
    n_compressed = _compressed_counts(meta, config, tokens - n_sink, n_layers, path)
    batch, storage_dtype = _window_layout(tensors, path)

    cache = QJLCache(model_config, config)
    expected: dict[str, tuple] = {name: (torch.float32, tuple(t.shape)) for name, t in cache.shared_matrices().items()}
    for i, layer in enumerate(cache.layers):
        spec = layer.expected_tensors(batch, n_compressed[i], n_sink, tokens - n_compressed[i] - n_sink, storage_dtype)
        expected.update({f"layers.{i}.{name}": s for name, s in spec.items()})
    _check_tensors(tensors, expected, cache.layers[0].channel_indices(), head_dim, path)
    check_checksum(f)  # after the sizes: a header declaring huge tensors is refused unread

    _fill(cache, tensors, _devices(devices, device, n_layers), dtype)
    info = public_meta(meta, path)
    try:
        info["suffix_template"].format(question="?")
    except (KeyError, IndexError, ValueError, AttributeError):
        raise CacheFileError(f"{path}: its prompt template is unusable; save the document again") from None
    info["config"] = config.to_dict()
    return cache, info


def _devices(devices, device, n_layers: int) -> list[torch.device]:
    if devices is not None:
        return [torch.device(d) for d in devices]
    return [torch.device(device) if device is not None else torch.device("cpu")] * n_layers


def _fill(cache: QJLCache, tensors: dict, devices: list[torch.device], dtype: torch.dtype | None) -> None:
    """Each layer's tensors to its device (a CPU layer keeps the map's views), the shared matrices once a device."""
    shared: dict[tuple[str, torch.device], torch.Tensor] = {}
    names = list(cache.shared_matrices())
    for i, layer in enumerate(cache.layers):
        device, prefix = devices[i], f"layers.{i}."
        for name in names:
            if (name, device) not in shared:
                shared[name, device] = tensors[name].to(device)
        own = {name[len(prefix):]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        layer.load_tensors(own, {n: shared[f"{n}s.{seed}", device] for n, (seed, _) in
                                 layer.shared_matrices().items()}, dtype)


def load_cache(path: str | os.PathLike, loaded_model, device: str | torch.device | None = None
               ) -> tuple[QJLCache, dict]:
    """Load a cache file for `loaded_model` (a qjl.models.LoadedModel) -> (frozen QJLCache, metadata): each
    layer's tensors on that layer's device (qjl/placement.layer_devices), unless `device` names one for all."""
    from .placement import layer_devices

    param = next(loaded_model.model.parameters())
    devices = layer_devices(loaded_model.model) if device is None else None
    return read_cache_file(path, loaded_model.model.config, loaded_model.identity, loaded_model.name,
                           device=device, dtype=param.dtype, devices=devices,
                           revision=getattr(loaded_model, "revision", ""))
