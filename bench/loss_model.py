"""Analytical time and memory of the fused loss's two Triton designs, beside the H200 measurements.

Arithmetic, not a measurement: the predictions that the next GPU run (bench/gpu_check.sh)
confirms or refutes. bf16 inputs, LM head frozen unless --head; 1 GEMM-eq = 2 N D V FLOP.

* fused recompute kernels (forward statistics + staged dh): 5 GEMM-eq (JSD: 7, 8 with the split
  of g), timed at --fused-tflops (313: what the one H200 run reached at N = 8192, where the row
  blocks filled the SMs; the vocabulary splits of the dh kernels are meant to keep that rate at
  small N, which is the hypothesis);
* 3-GEMM path, per chunk of c rows, each phase at the slower of compute (--tflops) and memory
  (--tbps): logits GEMM (2 GEMM-eq of the chunk; reads W, writes the fp32 [2c, V] buffer), row
  kernel (KL: reads both fp32 rows twice and writes g in bf16; JSD: three reads, g_hi + g_lo),
  dh GEMM (1 GEMM-eq, 2 with the JSD's split; reads W and g), with --head the dW GEMM (1 or 2
  GEMM-eq; fp32 dW read and written through an fp32 staging block: 16 V D bytes per chunk).
  Memory: the buffer (8 c V) and dh in bf16 (N D b: the reduction's coefficients come along),
  with --head + the fp32 dW and its staging block.

    python bench/loss_model.py                 # forward KL, head frozen: markdown table
    python bench/loss_model.py --alpha 0.5     # JSD
    python bench/loss_model.py --head          # full fine-tuning
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_loss import SHAPES, gemm_flops  # noqa: E402

MIB = 2**20


def gemm_path(n, d, v, c, alpha, head, tflops, tbps, b=2):
    """(ms, MiB) of the 3-GEMM path with chunks of c rows (the model in the module doc)."""
    split = 0.0 < alpha < 1.0  # SPLIT_G_MODES: the JSD's g as g_hi + g_lo
    g_rows = 2 if split else 1

    def phase(flop, nbytes):
        return max(flop / (tflops * 1e12), nbytes / (tbps * 1e12))

    seconds = 0.0
    for r0 in range(0, n, c):
        m = min(c, n - r0)
        seconds += phase(2 * (2 * m) * d * v, v * d * b + 2 * m * d * b + 8 * m * v)
        row_bytes = (24 if split else 16) * m * v + g_rows * m * v * b
        seconds += phase(0, row_bytes)
        seconds += phase(g_rows * 2 * m * d * v, v * d * b + g_rows * m * v * b + 4 * m * d)
        if head:
            seconds += phase(g_rows * 2 * m * d * v, g_rows * m * v * b + 16 * v * d)
    mib = (8 * c * v + n * d * b + (4 * v * d + 2 * c * v if head else 0)) / MIB
    return 1e3 * seconds, mib


def fused_path(n, d, v, alpha, head, tflops):
    """ms of the fused recompute kernels at ``tflops`` (GEMM-eq count from docs/kernels.md)."""
    split = 0.0 < alpha < 1.0
    gemm_eq = (2 if not split else 4) + (3 if not split else 4)  # forward + staged dh
    if head:
        gemm_eq += 3 if not split else 4
    return 1e3 * gemm_eq * gemm_flops(n, d, v) / (tflops * 1e12)


def measured(path):
    """{(shape, N, method): (ms, MiB)} of the H200 run in bench/results/loss.csv (alpha 0)."""
    out = {}
    if not path.exists():
        return out
    with path.open() as f:
        for row in csv.DictReader(f):
            if "H200" in row["device"] and float(row["alpha"]) == 0.0 and row["ms"]:
                out[(row["shape"], int(row["tokens"]), row["method"])] = (row["ms"], row["peak_mib"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--head", action="store_true", help="full fine-tuning (dW)")
    parser.add_argument("--tflops", type=float, default=700.0, help="GEMM rate, dense bf16 (H200: ~700)")
    parser.add_argument("--tbps", type=float, default=4.0, help="memory bandwidth, TB/s (H200: ~4)")
    parser.add_argument("--fused-tflops", type=float, default=313.0, help="the fused kernels' rate")
    parser.add_argument("--forced-rows", type=int, default=256, help="ours_gemm's chunk height")
    args = parser.parse_args(argv)

    from sdft_kernels.gemm_sdft import MIN_CHUNK_ROWS, chunk_rows_for_budget, default_memory_budget_mb

    seen = measured(harness.REPO / "bench" / "results" / "loss.csv")
    print(f"alpha {args.alpha}, head {'trains' if args.head else 'frozen'}, GEMMs {args.tflops:g} TFLOP/s, "
          f"memory {args.tbps:g} TB/s, fused kernels {args.fused_tflops:g} TFLOP/s; bf16")  # fmt: skip
    print()
    print("| shape (D, V) | N | 1 GEMM-eq | default c | fused recompute | 3-GEMM at default c | "
          f"3-GEMM at c={args.forced_rows} | H200 2026-11-28: ours (fused, old) / Liger fused / naive |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for shape in ("Qwen2.5-7B", "Qwen2.5-0.5B", "SmolLM2-135M"):
        d, v = SHAPES[shape]
        for n in (8192, 4096, 1024):
            budget = default_memory_budget_mb(n, d, v)
            rows = chunk_rows_for_budget(n, d, v, budget, dh_bytes=2)
            default = min(rows, n) if rows >= min(MIN_CHUNK_ROWS, n) else 0
            fused = fused_path(n, d, v, args.alpha, args.head, args.fused_tflops)
            if default:
                ms, mib = gemm_path(n, d, v, default, args.alpha, args.head, args.tflops, args.tbps)
                at_default = (
                    f"**{ms:.1f} ms**, {mib:.0f} MiB ({3 * gemm_flops(n, d, v) / ms / 1e9:.0f} TFLOP/s)"
                )
            else:
                at_default = "— (fused kernels)"
            forced = min(args.forced_rows, n)
            ms, mib = gemm_path(n, d, v, forced, args.alpha, args.head, args.tflops, args.tbps)
            same_case = args.alpha == 0.0 and not args.head  # the H200 run measured only this case
            cells = [
                seen.get((shape, n, m)) if same_case else None
                for m in ("ours_triton", "liger_fused", "naive")
            ]
            old = " / ".join("—" if c is None else f"{c[0]} ms, {c[1]} MiB" for c in cells)
            print(f"| {shape} ({d}, {v}) | {n} | {gemm_flops(n, d, v) / 1e12:.2f} TFLOP | {default or '<128'} | "
                  f"{fused:.1f} ms | {at_default} | {ms:.1f} ms, {mib:.0f} MiB | {old} |")  # fmt: skip


if __name__ == "__main__":
    main()
