#!/usr/bin/env bash
# One prepared GPU check of the fused loss (issue #9), under 8 minutes on one H100/H200; every
# step runs under `timeout` and logs to OUT_DIR, and the last line is PASS/FAIL against the goals.
#
#   bash bench/gpu_check.sh [OUT_DIR]             # default bench/results/gpu_check
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]   # no GPU: every step on CPU (Triton interpreter,
#                                                 # tiny shapes) to check the script itself
#
# Steps (timeouts in seconds):
#   0 environment: GPU, SM count, memory, driver, torch / triton / liger versions, commit     (20)
#   1 correctness vs float64 on the GPU, bf16: three regimes x alpha 0 / 0.5 / 1 x both designs,
#     7B-shape chunks, int64 offsets (tests/kernels/test_cuda_scale.py)                     (120)
#   2 per-phase CUDA-event times, 7B head, N = 8192 (bench/loss_phases.py)                   (35)
#   3 chunk-size sweep c = 128 ... 1024: ms and MiB (bench/loss_phases.py --sweep)          (35)
#   4 head-to-head: naive, Liger chunked / fused, ours (default, 3-GEMM, fused) at the 7B,
#     0.5B and 135M heads x N = 8192 / 4096 / 1024, CUDA events, 10 interleaved rounds     (130)
#   5 JSD (alpha 0.5) and full fine-tuning (dW) at the 7B head, N = 8192                   (2 x 30)
#   6 the step benchmark (bench/bench_step.py)                                               (35)
#   7 with the time left: the Triton kernel and loss API tests on CUDA        (up to 450 s in all)
#   8 goals: PASS/FAIL per goal and overall, the last line (bench/gpu_goals.py)              (15)
# Steps 0-6 take at most 435 s, step 7 what is left of 450 s, so with the wheels' install (20)
# and the goals (15) the whole run stays under 470 s; exit status 0 only when every goal passes.
# Figures for the README: OUT_DIR/loss.json and OUT_DIR/*.log.
#
# Runs as-is on a copy of the repository without .git and without the package installed: the
# tree's two import packages are linked into a temporary directory put first on PYTHONPATH;
# carried wheels in .whl/ (e.g. liger-kernel) are installed into a temporary site directory.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
OUT_DIR="${1:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=python3
START=$SECONDS
# The device copy of the tree has no .git: record the commit for the CSV rows when we know it.
export SDFT_COMMIT="${SDFT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

# This tree's packages first, whatever else is installed: the check measures this code.
PKG_DIR="$(mktemp -d)"
ln -s "$PWD/kernels" "$PKG_DIR/sdft_kernels"
ln -s "$PWD/sdft_fast" "$PKG_DIR/sdft_fast"
export PYTHONPATH="$PKG_DIR${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE_DIR="$(mktemp -d)"
    timeout 20 $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE_DIR" .whl/*.whl \
        && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE_DIR"
fi

if [ "$DRY" = 1 ]; then
    # The same steps on CPU: Triton kernels in the interpreter, a tiny head, fewer repeats,
    # Liger's fused Triton kernel left out (minutes in the interpreter), timeouts x 3.
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    DEVICE=cpu
    SCALE=3
    OURS=(ours_triton ours_gemm ours_fused)
    LOSS_ARGS=(--device cpu --in-process --shapes tiny --tokens 16 --repeats 2 --chunk-rows 8
        --methods naive liger_chunked "${OURS[@]}")
    EXTRA=(--shapes tiny --tokens 16 --methods naive liger_chunked ours_triton)
    PHASE_ARGS=(--device cpu --shape tiny --tokens 16 --repeats 1)
    STEP_ARGS=(--device cpu --models SmolLM2-135M --layers 1 --batch 2 --prompt 8 --demo 8 --completion 8
        --repeats 1)
    SCALE_TESTS=(tests/kernels/test_triton_rows.py -k prescale)
    UNIT_TESTS=(tests/kernels/test_triton_configs.py)
else
    unset TRITON_INTERPRET
    DEVICE=cuda
    SCALE=1
    LOSS_ARGS=(--device cuda --repeats 10)
    EXTRA=(--shapes Qwen2.5-7B --tokens 8192 --methods naive liger_chunked liger_fused ours_triton)
    PHASE_ARGS=(--device cuda --shape Qwen2.5-7B --tokens 8192 --repeats 10)
    STEP_ARGS=(--device cuda)
    SCALE_TESTS=(tests/kernels/test_cuda_scale.py)
    UNIT_TESTS=(tests/kernels/test_triton_rows.py tests/kernels/test_gemm_sdft.py tests/sdft_fast/test_loss.py
        tests/kernels/test_triton_sdft.py)
fi

# run NAME SECONDS COMMAND...: the command under `timeout`, output to OUT_DIR/NAME.log (and the
# tail to the console); its exit status goes to OUT_DIR/status.txt and to $RC.
RC=0
run() {
    local name=$1 seconds=$2
    shift 2
    local began=$SECONDS
    seconds=$((seconds * SCALE))
    echo "== $name (timeout ${seconds}s; $((SECONDS - START))s elapsed) =="
    timeout "$seconds" "$@" >"$OUT_DIR/$name.log" 2>&1
    RC=$?
    tail -n 40 "$OUT_DIR/$name.log"
    echo "$name exit=$RC seconds=$((SECONDS - began))" | tee -a "$OUT_DIR/status.txt"
}
: >"$OUT_DIR/status.txt"

run 0_environment 20 $PY - "$DEVICE" <<'EOF'
import platform, subprocess, sys
import torch, triton
device = sys.argv[1]
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
try:
    import liger_kernel
    from importlib.metadata import version
    print("liger-kernel", version("liger-kernel"))
except Exception as error:
    print("liger-kernel missing:", error)
from sdft_kernels import gemm_sdft
print("fp32-result bf16 GEMMs (torch.mm out_dtype):", gemm_sdft.HAS_FP32_OUT_GEMM)
if device == "cuda":
    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name}: {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
          f"compute capability {props.major}.{props.minor}")
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
else:
    print("dry run: no GPU, Triton interpreter on CPU")
EOF

run 1_correctness 120 $PY -m pytest -q -p no:cacheprovider -rA "${SCALE_TESTS[@]}"
CORRECTNESS_RC=$RC

run 2_phases 35 $PY bench/loss_phases.py "${PHASE_ARGS[@]}" --csv "$OUT_DIR/loss_phases.csv"
run 3_chunk_sweep 35 $PY bench/loss_phases.py "${PHASE_ARGS[@]}" --sweep --csv "$OUT_DIR/loss_phases.csv"
run 4_head_to_head 130 $PY bench/bench_loss.py "${LOSS_ARGS[@]}" --out-dir "$OUT_DIR" --json "$OUT_DIR/loss.json"
# own folders: their CSV rows and plots stay apart from step 4's
run 5a_jsd 30 $PY bench/bench_loss.py "${LOSS_ARGS[@]}" "${EXTRA[@]}" --alpha 0.5 --out-dir "$OUT_DIR/jsd"
run 5b_full_finetuning 30 $PY bench/bench_loss.py "${LOSS_ARGS[@]}" "${EXTRA[@]}" --head --out-dir "$OUT_DIR/head"
run 6_step 35 $PY bench/bench_step.py "${STEP_ARGS[@]}" --csv "$OUT_DIR/step.csv" --png "$OUT_DIR/step.png"

LEFT=$((450 * SCALE - (SECONDS - START)))
if [ "$LEFT" -gt 30 ]; then
    run 7_unit_tests_on_device $((LEFT / SCALE)) $PY -m pytest -q -p no:cacheprovider -x "${UNIT_TESTS[@]}"
else
    echo "7_unit_tests_on_device skipped: ${LEFT}s left" | tee -a "$OUT_DIR/status.txt"
fi

echo "== 8_goals ($((SECONDS - START))s elapsed; logs in $OUT_DIR) =="
if [ "$DRY" = 1 ]; then
    echo "(dry run: tiny CPU shapes, no GPU figures; the verdict below only exercises the script)"
fi
timeout $((15 * SCALE)) $PY bench/gpu_goals.py --loss-json "$OUT_DIR/loss.json" --correctness-rc "$CORRECTNESS_RC" \
    >"$OUT_DIR/goals.txt" 2>&1
GOALS_RC=$?
cat "$OUT_DIR/goals.txt"
if ! tail -n 1 "$OUT_DIR/goals.txt" | grep -q '^GOALS: '; then  # the goal script itself failed
    echo "GOALS: FAIL (bench/gpu_goals.py exit=$GOALS_RC; see $OUT_DIR/goals.txt)" | tee -a "$OUT_DIR/goals.txt"
    GOALS_RC=1
fi
exit "$GOALS_RC"
