"""The one place that says what the CUDA extension is built from and with which flags.

Torch-free at import, so `csrc/build_check.sh` (CI's compile-only step, run in a separate venv with a CUDA
torch) and `qjl/kernels.py` (the JIT build on a GPU machine) use the same list and the same flags.

    python csrc/sources.py --compile-only BUILD_DIR    # compile every kernel for TORCH_CUDA_ARCH_LIST
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent
# Compiled in this order; headers are hashed too (they change what the sources compile to).
SOURCES = ("module.cpp", "attention.cu", "encode.cu")
HEADERS = ("common.cuh",)
NAME = "qjl_kernels"
CXX_FLAGS = ["-O3"]  # the C++ standard: whatever torch adds (c++17 before 2.10, c++20 after)
# No --use_fast_math: the encode kernels must round exactly as torch does (IEEE division, rintf).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]


def source_paths() -> list[str]:
    return [str(CSRC / s) for s in SOURCES]


def source_hash() -> str:
    """sha256 of every source and header and of the flags: part of the build cache key."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    h.update(repr((CXX_FLAGS, NVCC_FLAGS)).encode())
    return h.hexdigest()


def build_key(torch_version: str, arch: str) -> str:
    """The build directory's name: source hash, torch version and GPU architecture (e.g. "9.0")."""
    tv = torch_version.replace("+", "_").replace(".", "_")
    return f"{source_hash()[:16]}-torch{tv}-sm{arch.replace('.', '')}"


def include_paths() -> list[str]:
    """Extra include folders: the CUDA wheels' headers (torch >= 2.9 headers include cusparse.h, which a CUDA
    torch from pip ships in site-packages/nvidia/cu*/include rather than in the toolkit)."""
    out = [str(CSRC)]
    for p in sys.path:
        if not p:
            continue
        nv = Path(p) / "nvidia"
        if nv.is_dir():
            out += [str(d) for d in sorted(nv.glob("cu*/include")) if (d / "cusparse.h").is_file()]
            out += [str(d) for d in sorted(nv.glob("cusparse/include")) if (d / "cusparse.h").is_file()]
    return list(dict.fromkeys(out))


def load(build_dir: str, verbose: bool = False):
    """Build (ninja, incremental) and import the extension; returns the Python module."""
    from torch.utils.cpp_extension import load as _load

    os.makedirs(build_dir, exist_ok=True)
    return _load(name=NAME, sources=source_paths(), extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                 extra_include_paths=include_paths(), build_directory=build_dir, verbose=verbose,
                 with_cuda=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--compile-only":
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        load(argv[1], verbose=True)
    except ImportError as e:  # compiled and linked, but cannot be imported on this machine (no driver)
        print(f"compiled; import skipped: {e}")
    print(f"ok: {NAME} compiled for sm {os.environ['TORCH_CUDA_ARCH_LIST']} in {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
