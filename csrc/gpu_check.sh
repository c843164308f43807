#!/usr/bin/env bash
# On a GPU machine: build the kernels, run every GPU test, the self-test cases under compute-sanitizer memcheck,
# `qjl kernels check`, the attention benchmark and `qjl bench --shape llama-3.1-8b` (whole on the GPU, and with
# half its layers offloaded to the CPU); logs under $OUT (default ./gpu-check-out).
#
#   csrc/gpu_check.sh              # everything (about 10 minutes on an H100, most of it the first build)
#   csrc/gpu_check.sh tests        # build + GPU tests + sanitizer only
#
# Run from the repository root with the project's venv active (pip install -e '.[test]' and a CUDA torch).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export QJL_HOME="${QJL_HOME:-$OUT/qjl-home}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
what="${1:-all}"
status=0
step() { echo "== $1"; shift; "$@"; rc=$?; echo "== rc $rc"; [ $rc -eq 0 ] || status=1; return 0; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"
step build python -c "import qjl.kernels as K, time; t=time.time(); K.build(verbose=True); print(K.status(), round(time.time()-t,1))" \
  > "$OUT/build.log" 2>&1
tail -3 "$OUT/build.log"
step gpu-tests python -m pytest -q -m gpu tests/test_gpu_kernels.py tests/test_gpu.py -rs > "$OUT/gpu-tests.log" 2>&1
tail -5 "$OUT/gpu-tests.log"
# memcheck over the self-test cases (every op, dtype and head_dim), the caching allocator off so that each
# tensor's bounds are the allocation's.
step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python -c "import qjl.kernels as K; K.ensure_loaded(self_test=False); rows = K.parity(K.cases('self-test'), timing=False); print(K.format_table(rows)); raise SystemExit(0 if all(r.ok for r in rows) else 1)" \
  > "$OUT/memcheck.log" 2>&1
tail -3 "$OUT/memcheck.log"
if [ "$what" = "all" ]; then
  step check python -c "from qjl_cli import kernels as k; import typer; app = typer.Typer(); app.callback()(lambda: None); k.register(app); app(['kernels', 'check'])" \
    > "$OUT/check.txt" 2>&1
  tail -4 "$OUT/check.txt"
  step bench python csrc/bench_attention.py --tokens 4k,16k,32k,64k,128k --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  cat "$OUT/attention.txt"
  # the headline: a random-weight Llama-3.1-8B in bf16, whole prefill, decode and peak memory vs exact
  step model-bench qjl bench --shape llama-3.1-8b --context 4k,16k --modes turbo,qjl,exact --repeat 3 \
    --json "$OUT/bench-8b.json" > "$OUT/bench-8b.log" 2>&1
  python scripts/bench_markdown.py "$OUT/bench-8b.json" > "$OUT/bench-8b.md" 2>&1; cat "$OUT/bench-8b.md"
  # issue 15: the same shape with about half its layers offloaded to CPU memory by accelerate, against the GPU
  step split-bench qjl bench --shape llama-3.1-8b --context 16k --modes turbo,exact --repeat 1 \
    --max-memory "0=9GiB,cpu=64GiB" --json "$OUT/bench-8b-split.json" > "$OUT/bench-8b-split.log" 2>&1
  python scripts/bench_markdown.py "$OUT/bench-8b-split.json" > "$OUT/bench-8b-split.md" 2>&1
  cat "$OUT/bench-8b-split.md"
fi
echo "gpu_check: $([ $status -eq 0 ] && echo ok || echo FAILED); logs in $OUT"
exit $status
