#!/usr/bin/env bash
# One-GPU check: CUDA tests of the kernels, then the loss and step benchmarks.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default bench/results/). Under 8 minutes on an H100/H200.
# Works without installing the package: it links the two import packages into a temp dir.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=python3

if ! $PY -c "import sdft_fast, sdft_kernels" 2>/dev/null; then
    PKG_DIR="$(mktemp -d)"
    ln -s "$PWD/kernels" "$PKG_DIR/sdft_kernels"
    ln -s "$PWD/sdft_fast" "$PKG_DIR/sdft_fast"
    export PYTHONPATH="$PKG_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
# Wheels carried for packages the GPU image lacks (liger-kernel is pure Python).
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/sdft_site .whl/*.whl \
        && export PYTHONPATH="/tmp/sdft_site:$PYTHONPATH"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT_DIR/gpu_env.txt"

echo "== CUDA tests (kernels + loss API) =="
timeout 240 $PY -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_cuda_scale.py tests/kernels/test_triton_sdft.py tests/sdft_fast/test_loss.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25

echo "== loss benchmark (goal case first: Qwen2.5-7B shape, N=8192, bf16) =="
timeout 300 $PY bench/bench_loss.py --device cuda --out-dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_bench_loss.log" | tail -60

if [ -f bench/bench_step.py ]; then
    echo "== step benchmark =="
    timeout 90 $PY bench/bench_step.py --device cuda --out-dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_bench_step.log" | tail -12
fi
echo "gpu_check done"
