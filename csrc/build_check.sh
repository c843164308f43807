#!/usr/bin/env bash
# Compile every CUDA kernel of csrc/ for sm_80 and sm_90 against a CUDA build of torch, without a GPU.
# A compile error fails (exit != 0). Used by .ci/run; developers can run it as is.
#
#   csrc/build_check.sh            # venv csrc/.venv-cuda (created once), build dir csrc/build/check
#
# Env: QJL_CUDA_VENV (the venv; default csrc/.venv-cuda), QJL_CUDA_TORCH (default torch==2.14.1, a CUDA 13.0
# build), CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS.
# The sources and flags are csrc/sources.py's, the same the JIT build on a GPU uses (qjl/kernels.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${QJL_CUDA_VENV:-$here/.venv-cuda}"
torch_spec="${QJL_CUDA_TORCH:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
start=$(date +%s)

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, ninja" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --progress-bar off "$torch_spec" ninja
fi
"$venv/bin/python" - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"

# A clean build each time, so that CI compiles every kernel; PATH gives ninja from the venv.
rm -rf "$here/build/check"
PATH="$venv/bin:$PATH" "$venv/bin/python" "$here/sources.py" --compile-only "$here/build/check"
echo "csrc/build_check.sh: ok in $(( $(date +%s) - start )) s"
