#!/usr/bin/env bash
# One-GPU check, under 8 minutes on an H100/H200: CUDA kernel tests at model scale, the loss and
# step benchmarks, then the full Triton test file on CUDA with the time that is left.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default bench/results/)
# Works without installing the package (links the two import packages into a temp dir) and
# installs carried wheels from .whl/ (liger-kernel, the benchmark's baseline) when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=python3
# The device copy of the tree has no .git: record the commit for the CSV rows when we know it.
export SDFT_COMMIT="${SDFT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

if ! $PY -c "import sdft_fast, sdft_kernels" 2>/dev/null; then
    PKG_DIR="$(mktemp -d)"
    ln -s "$PWD/kernels" "$PKG_DIR/sdft_kernels"
    ln -s "$PWD/sdft_fast" "$PKG_DIR/sdft_fast"
    export PYTHONPATH="$PKG_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/sdft_site .whl/*.whl \
        && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/sdft_site"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

echo "== 1. CUDA scale tests (Qwen shape bf16 vs float64, int64 offsets) =="
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_scale.py 2>&1 | tee "$OUT_DIR/gpu_tests_scale.log" | tail -8

echo "== 2. loss benchmark (goal case first: Qwen2.5-7B shape, N=8192, bf16) =="
timeout 200 $PY bench/bench_loss.py --device cuda --out-dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_bench_loss.log" | tail -50

echo "== 3. step benchmark =="
timeout 60 $PY bench/bench_step.py --device cuda --csv "$OUT_DIR/step.csv" --png "$OUT_DIR/step.png" 2>&1 \
    | tee "$OUT_DIR/gpu_bench_step.log" | tail -12

echo "== 4. Triton kernel and loss API tests on CUDA =="
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/sdft_fast/test_loss.py tests/kernels/test_triton_sdft.py 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log" | tail -15
echo "gpu_check done"
