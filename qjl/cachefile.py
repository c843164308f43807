""".qjl cache files without torch: the header, the metadata, the checksum and `inspect_cache` (docs/ARCHITECTURE.md).

A safetensors file is an 8-byte little-endian header length, a JSON header (`__metadata__`, strings only, and
for every tensor its dtype code, shape and `data_offsets` into the data), then the tensors' raw bytes. This
module reads and checks that layout itself and hashes the bytes through a memory map, so `qjl cache info`,
`qjl cache list` and the automatic document cache's bookkeeping never import torch; qjl/store.py builds tensors
from the same map. The checksum is the one qjl/store.py writes: sha256 over the metadata (without the
checksum) and each tensor's name, torch dtype name (`torch.float16`), shape and bytes, in name order.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .config import QJLConfig
from .errors import CacheFileError

FORMAT_NAME = "qjl-cache"
FORMAT_VERSION = "7"  # 2: exact sink tokens, LS-fitted turbo scales; 3: turbo values from a 4-D codebook;
# 4: the model identity includes its dtype and revision (model_dtype, model_revision in the metadata);
# 5: turbo's 8-bit scales (codes + steps per token group) and 2.25-bit values (9-bit codes, 512-point codebook);
# 6: per-layer turbo bits (config turbo_layer_bits: a format-5 file's config lacks it and would read as layer 1's
# values at 3 bits); format 6's unbiased scales are the same numbers in the same place, read alike;
# 7: --kv qjl's residual signs (config sketch_residual_weight: a format-6 file's config lacks it, and its signs
# and norms would be read against a block-weighted projection)
COMPRESSED_MODES = ("qjl", "turbo")  # = qjl.cache.COMPRESSED_MODES (tests/test_store.py holds them equal)
# safetensors dtype codes -> (the dtype as str(torch.dtype) names it, bytes per element)
DTYPES = {
    "BOOL": ("torch.bool", 1), "U8": ("torch.uint8", 1), "I8": ("torch.int8", 1),
    "F8_E4M3": ("torch.float8_e4m3fn", 1), "F8_E5M2": ("torch.float8_e5m2", 1),
    "I16": ("torch.int16", 2), "U16": ("torch.uint16", 2), "F16": ("torch.float16", 2),
    "BF16": ("torch.bfloat16", 2), "I32": ("torch.int32", 4), "U32": ("torch.uint32", 4),
    "F32": ("torch.float32", 4), "I64": ("torch.int64", 8), "U64": ("torch.uint64", 8), "F64": ("torch.float64", 8),
}
_MAX_HEADER = 100_000_000  # safetensors' own bound on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # torch's name, e.g. "torch.float16"
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class CacheFile:
    """An open cache file: its metadata, its tensors' entries and a copy-on-write memory map of it."""

    def __init__(self, path: Path, metadata: dict, tensors: dict[str, TensorEntry], mapped: mmap.mmap | None):
        self.path, self.metadata, self.tensors, self.map = path, metadata, tensors, mapped

    def data(self, name: str) -> memoryview:
        e = self.tensors[name]
        return memoryview(self.map)[e.start:e.end] if self.map is not None else memoryview(b"")

    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _unreadable(path: Path, detail: str) -> CacheFileError:
    detail = " ".join(str(detail).split())[:160] or "unknown"
    return CacheFileError(f"{path} is not a readable cache file (truncated or corrupted: {detail}); "
                          f"save it again with `qjl cache save`")


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CacheFileError(f"cache file not found: {path}; check the path or save one with `qjl cache save`")
    if not path.is_file():
        raise CacheFileError(f"{path} is not a file; give a .qjl cache file")
    if not os.access(path, os.R_OK):
        raise CacheFileError(f"cannot read {path}: permission denied; check its permissions")


def _entry(name: str, raw, base: int) -> TensorEntry:
    """One tensor's header entry, checked as safetensors checks it (dtype, shape, offsets against the size)."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name}: malformed entry")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"tensor {name}: invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name}: invalid data offsets {offsets!r}")
    numel = 1
    for s in shape:
        numel *= s
    if numel * DTYPES[dtype][1] != offsets[1] - offsets[0]:
        raise ValueError(f"tensor {name}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
    return TensorEntry(DTYPES[dtype][0], tuple(shape), base + offsets[0], base + offsets[1])


def _parse_header(raw: bytes, size: int) -> tuple[dict, dict[str, TensorEntry]]:
    """(metadata, entries) of a safetensors header whose JSON is `raw`, in a file of `size` bytes."""
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the metadata are not strings")
    base = 8 + len(raw)
    tensors = {name: _entry(name, entry, base) for name, entry in header.items()}
    at = base
    for e in sorted(tensors.values(), key=lambda e: (e.start, e.end)):  # contiguous, covering the data
        if e.start != at:
            raise ValueError(f"tensor data at byte {e.start - base}, expected {at - base}")
        at = e.end
    if at != size:
        raise ValueError(f"the tensors cover {at - base} bytes of data, the file holds {size - base}")
    return metadata, tensors


def open_file(path: str | os.PathLike, mapped: bool = True) -> CacheFile:
    """Open and check a cache file's layout (not yet its meaning); every failure a CacheFileError."""
    path = Path(path)
    _check_path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("the header is cut short")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            metadata, tensors = _parse_header(f.read(n), size)
            # Copy-on-write: tensors made from the map may be written to without touching the file.
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if mapped and size > 8 + n else None
    except ValueError as e:  # also JSON and UTF-8 errors
        raise _unreadable(path, str(e)) from None
    except OSError as e:
        raise _unreadable(path, e.strerror or str(e)) from None
    return CacheFile(path, metadata, tensors, view)


def read_metadata(path: str | os.PathLike) -> dict:
    """A cache file's metadata only, without mapping or hashing its data (`qjl cache list`)."""
    return open_file(path, mapped=False).metadata


# --- the checksum ----------------------------------------------------------------------------------
def checksum(metadata: dict, tensors: Iterable[tuple[str, str, list, object]]) -> str:
    """sha256 over the metadata (without the checksum) and every (name, dtype name, shape, bytes), in name order."""
    import hashlib

    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != "checksum"}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        h.update(f"\n{name}:{dtype}:{list(shape)}\n".encode())
        h.update(data)
    return h.hexdigest()


def file_checksum(f: CacheFile) -> str:
    return checksum(f.metadata, ((name, e.dtype, list(e.shape), f.data(name)) for name, e in f.tensors.items()))


def check_checksum(f: CacheFile) -> None:
    if f.metadata.get("checksum") != file_checksum(f):
        raise CacheFileError(f"{f.path} failed its checksum (the file is corrupted); save the document again")


# --- the metadata ----------------------------------------------------------------------------------
def meta_int(meta: dict, key: str, path: Path) -> int:
    try:
        v = int(meta[key])
    except (KeyError, ValueError, TypeError):
        raise CacheFileError(f"{path}: metadata field {key!r} is missing or not a number; the file is "
                             f"corrupted, save it again") from None
    if v < 0:
        raise CacheFileError(f"{path}: metadata field {key!r} is negative; the file is corrupted, save it again")
    return v


def check_header(meta: dict, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CacheFileError(f"{path} is a safetensors file but not a qjl cache file; give a file made by "
                             f"`qjl cache save`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheFileError(f"{path} has cache format version {meta.get('format_version')!r}, this qjl reads "
                             f"version {FORMAT_VERSION}; save the document again with this qjl")


def parse_config(meta: dict, path: Path) -> QJLConfig:
    try:
        d = json.loads(meta["config"])
        if not isinstance(d, dict):
            raise TypeError
        config = QJLConfig.from_dict(d)
    except Exception as e:  # noqa: BLE001 - JSON, unknown fields, bad values, wrong types
        raise CacheFileError(f"{path}: its QJL settings cannot be read ({' '.join(str(e).split())[:120]}); "
                             f"save the document again with this qjl") from None
    if config.kv not in COMPRESSED_MODES:
        raise CacheFileError(f"{path}: not a compressed (--kv qjl or turbo) cache; save the document again")
    return config


def public_meta(meta: dict, path: Path) -> dict:
    return {
        "format": meta.get("format"),
        "format_version": meta.get("format_version"),
        "model_name": meta.get("model_name"),
        "model_identity": meta.get("model_identity"),
        "document_tokens": meta_int(meta, "document_tokens", path),
        "suffix_template": meta.get("suffix_template", ""),
        "source": {"name": meta.get("source_name", ""), "size": meta.get("source_size", ""),
                   "sha256": meta.get("source_sha256", "")},
        "created": meta.get("created", ""),
        "checksum": meta.get("checksum"),
    }


# --- inspect ---------------------------------------------------------------------------------------
def inspect_cache(path: str | os.PathLike) -> dict:
    """What `qjl cache info` shows; needs no model. Validates format, version and checksum."""
    path = Path(path)
    f = open_file(path)
    meta = f.metadata
    check_header(meta, path)
    info = public_meta(meta, path)
    layers, kv_heads, head_dim = (meta_int(meta, k, path) for k in ("num_layers", "num_kv_heads", "head_dim"))
    tokens = info["document_tokens"]
    nbytes = f.tensor_bytes()
    numbers = 2 * tokens * layers * kv_heads * head_dim
    fp16 = 2 * numbers
    # Sizes before the checksum (which reads every byte): no mode stores more than 16 bits a number, plus its
    # per-layer parameters and per-model matrices (a few D x 4D fp32 matrices).
    most = 2 * fp16 + layers * kv_heads * head_dim * 64 + 64 * 16 * head_dim * head_dim + (1 << 20)
    if nbytes > most:
        raise CacheFileError(f"{path}: its tensors hold {nbytes:,} bytes, more than {tokens:,} tokens of this geometry "
                             f"can ({most:,}); the file is corrupted, save the document again")
    check_checksum(f)
    config = parse_config(meta, path)
    size = path.stat().st_size
    info.update({
        "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
        "tensor_bytes": nbytes,
        "bits_per_number": 8 * nbytes / numbers if numbers else 0.0,
        "file_bytes": size,
        "fp16_bytes": fp16,
        "ratio_vs_fp16": size / fp16 if fp16 else 0.0,
        "config": config.to_dict(),
    })
    return info
