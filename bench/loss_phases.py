"""Where the loss's time goes: per-phase times of both Triton designs, and the chunk-size sweep.

Phases of the 3-GEMM path for one chunk of c tokens (times the number of chunks N / c):
  logits GEMM   [h_s ; h_t] (2c x D) @ W^T -> fp32 [2c, V]    2 (2c) D V FLOP, W + 8 c V bytes out
  row kernel    statistics, loss, g written over the buffer  memory-bound: 2-3 reads of 8 c V bytes
  dh GEMM       g (c or 2c with the split) @ W -> fp32 [c, D]
  dW GEMM       (--head) g^T @ h_s into an fp32 [V, D]
and of the fused kernels: the forward (statistics) kernel and the backward (dh) kernels. Each
phase is timed alone with CUDA events (median of --repeats), next to the measured end-to-end
forward + backward, and converted to TFLOP/s (GEMMs) or GB/s (row kernel) for the analytical
model of docs/kernels.md.

--sweep: forward + backward of the 3-GEMM path for c = 128 ... 1024 (ms and peak extra MiB,
interleaved rounds).

    python bench/loss_phases.py                                # Qwen2.5-7B head, N = 8192, bf16
    python bench/loss_phases.py --sweep
    TRITON_INTERPRET=1 python bench/loss_phases.py --device cpu --shape tiny --tokens 64 --sweep  # dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_loss import SHAPES, gemm_flops, make_inputs  # noqa: E402

SWEEP_ROWS = (128, 192, 256, 384, 512, 768, 1024)


def timed(fn, device, repeats, before=None):
    """Median milliseconds of fn() (``before()`` runs untimed ahead of each call)."""
    times = []
    for index in range(repeats + 1):  # the first call warms up (compiles)
        if before is not None:
            before()
        harness.synchronize(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            start = time.perf_counter()
            fn()
            elapsed = 1e3 * (time.perf_counter() - start)
        if index:
            times.append(elapsed)
    return statistics.median(times)


def gemm_phases(inputs, alpha, rows, head, device, repeats):
    """(phase, ms for all N tokens, FLOP or bytes, unit) of the 3-GEMM path, chunks of ``rows``."""
    from sdft_kernels.gemm_sdft import gemm_fp32
    from sdft_kernels.triton_configs import SPLIT_G_MODES
    from sdft_kernels.triton_rows import launch_rows
    from sdft_kernels.triton_tiles import kernel_mode

    h_s, h_t, weight = (t.detach() for t in inputs)
    n, d = h_s.shape
    v = weight.shape[0]
    dtype = h_s.dtype
    low = dtype in (torch.bfloat16, torch.float16)
    split = low and kernel_mode(alpha) in SPLIT_G_MODES
    chunks = n / rows
    pair = torch.cat([h_s[:rows], h_t[:rows] if low else h_t[:rows] - h_s[:rows]])  # [2c, D]
    buffer = torch.empty((2 * rows, v), dtype=torch.float32, device=device)
    gemm_fp32(pair, weight.t(), out=buffer)
    logits = buffer.clone()
    grad_dtype = dtype if low else torch.float32
    out = []
    ms = timed(lambda: gemm_fp32(pair, weight.t(), out=buffer), device, repeats)
    out.append(("logits GEMM", ms * chunks, 2 * gemm_flops(n, d, v), "TFLOP/s"))
    row_bytes = 8 * rows * v * (3 if kernel_mode(alpha) == 2 else 2) + rows * v * (
        4 if not low or split else 2
    )

    def rows_pass():
        launch_rows(buffer, None, alpha, 1.0, teacher_is_diff=not low, grad_dtype=grad_dtype, split_g=split)

    ms = timed(rows_pass, device, repeats, before=lambda: buffer.copy_(logits))
    out.append(("row kernel", ms * chunks, row_bytes * chunks, "GB/s"))
    g = buffer.view(grad_dtype)[: 2 * rows if split else rows, :v] if low else buffer[:rows]
    ms = timed(lambda: gemm_fp32(g, weight), device, repeats)
    out.append(("dh GEMM", ms * chunks, gemm_flops(n, d, v) * (2 if split else 1), "TFLOP/s"))
    if head:
        h_side = torch.cat([h_s[:rows], h_s[:rows]]) if split else h_s[:rows]
        ms = timed(lambda: gemm_fp32(g.t(), h_side), device, repeats)
        out.append(
            (
                "dW GEMM (fp32 out, + accumulate)",
                ms * chunks,
                gemm_flops(n, d, v) * (2 if split else 1),
                "TFLOP/s",
            )
        )
    return out


def fused_phases(inputs, alpha, head, device, repeats):
    """(phase, ms, FLOP, unit) of the fused kernels: forward and backward launched alone."""
    from sdft_kernels import triton_configs
    from sdft_kernels.triton_backward import launch_backward
    from sdft_kernels.triton_forward import launch_forward

    h_s, h_t, weight = (t.detach() for t in inputs)
    n, d = h_s.shape
    v = weight.shape[0]
    kl = alpha in (0.0, 1.0)
    stats = launch_forward(h_s, h_t, weight, None, alpha, 1.0)
    ones = torch.ones(n, device=device)
    out = [("fused forward", timed(lambda: launch_forward(h_s, h_t, weight, None, alpha, 1.0), device, repeats),
            gemm_flops(n, d, v) * (2 if kl else 4), "TFLOP/s")]  # fmt: skip
    if device == "cuda":  # every forward config alone, and the plain split-major launch order
        configs = triton_configs.CUDA_CONFIGS["forward"]
        for index, config in enumerate(configs[:2]):
            triton_configs.CUDA_CONFIGS["forward"] = (config,)
            for group in (None, "split-major"):
                triton_configs.SPLIT_GROUP_ROWS = None if group is None else 10**9
                ms = timed(lambda: launch_forward(h_s, h_t, weight, None, alpha, 1.0), device, repeats)
                blocks = "x".join(str(config[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
                out.append(
                    (
                        f"  forward cfg{index} {blocks} {group or 'grouped'}",
                        ms,
                        gemm_flops(n, d, v) * (2 if kl else 4),
                        "TFLOP/s",
                    )
                )
        triton_configs.CUDA_CONFIGS["forward"], triton_configs.SPLIT_GROUP_ROWS = configs, None
    ms = timed(
        lambda: launch_backward(h_s, h_t, weight, None, *stats[1:], ones, alpha, 1.0, True, False, False),
        device,
        repeats,
    )
    out.append(("fused dh", ms, gemm_flops(n, d, v) * 3, "TFLOP/s"))
    if head:
        ms = timed(
            lambda: launch_backward(h_s, h_t, weight, None, *stats[1:], ones, alpha, 1.0, False, True, False),
            device,
            repeats,
        )
        out.append(("fused dW", ms, gemm_flops(n, d, v) * 3, "TFLOP/s"))
    return out


def end_to_end(inputs, alpha, rows, device, repeats):
    """Forward + backward ms and peak extra bytes of triton_token_losses with chunk_rows=rows,
    token mean with its coefficients passed as grad_weights (as ``sdft_fast.loss`` does)."""
    from sdft_kernels.triton_sdft import triton_token_losses

    h_s, h_t, weight = inputs
    grad_weights = torch.full((h_s.shape[0],), 1.0 / h_s.shape[0], device=h_s.device)

    def step():
        h_s.grad = weight.grad = None
        losses = triton_token_losses(
            h_s, h_t, weight, alpha=alpha, chunk_rows=rows, grad_weights=grad_weights
        )
        losses.mean().backward()

    step()
    harness.synchronize(device)
    peak = None
    if device == "cuda":
        h_s.grad = weight.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return timed(step, device, repeats), peak


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="Qwen2.5-7B")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--rows", type=int, default=None, help="chunk height (default: the default budget's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="chunk heights 128 ... 1024 instead of phases")
    parser.add_argument("--csv", type=Path, default=harness.REPO / "bench" / "results" / "loss_phases.csv")
    args = parser.parse_args(argv)

    from sdft_kernels.gemm_sdft import select_chunk_rows

    d, v = SHAPES[args.shape]
    n = args.tokens
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    inputs = make_inputs(n, d, v, dtype, args.device, args.head)
    env = harness.environment(args.device)
    device = torch.device(args.device)
    rows = args.rows or select_chunk_rows(n, d, v, None, device, dtype, weighted=True) or min(n, 128)
    print(f"{env['device']} — torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    print(f"{args.shape} N={n} D={d} V={v} {args.dtype} alpha={args.alpha} head={args.head}")
    records = []
    if args.sweep:
        heights = [c for c in SWEEP_ROWS if c <= n] or [n]
        for c in heights:
            ms, peak = end_to_end(inputs, args.alpha, c, args.device, args.repeats)
            tflops = 3 * gemm_flops(n, d, v) / ms / 1e9
            records.append(dict(kind="sweep", phase=f"c={c}", ms=f"{ms:.2f}", rate=f"{tflops:.0f} TFLOP/s (3 GEMM-eq)",
                                peak_mib=harness.fmt_mib(peak).replace(",", "")))  # fmt: skip
            print(
                f"chunk rows {c:5d}: {ms:9.2f} ms  {tflops:6.0f} TFLOP/s on 3 GEMM-eq  peak {records[-1]['peak_mib']} MiB",
                flush=True,
            )
    else:
        phases = gemm_phases(inputs, args.alpha, rows, args.head, args.device, args.repeats)
        phases += fused_phases(inputs, args.alpha, args.head, args.device, args.repeats)
        total, _ = end_to_end(inputs, args.alpha, rows, args.device, args.repeats)
        fused_total, _ = end_to_end(inputs, args.alpha, 0, args.device, args.repeats)
        phases += [(f"3-GEMM end to end (c={rows})", total, 3 * gemm_flops(n, d, v), "TFLOP/s (3 GEMM-eq)"),
                   ("fused end to end", fused_total, 3 * gemm_flops(n, d, v), "TFLOP/s (3 GEMM-eq)")]  # fmt: skip
        for phase, ms, amount, unit in phases:
            rate = amount / ms / (1e9 if unit.startswith("TFLOP") else 1e6)
            records.append(
                dict(kind="phase", phase=phase, ms=f"{ms:.2f}", rate=f"{rate:.0f} {unit}", peak_mib="")
            )
            print(f"{phase:40s} {ms:9.2f} ms  {rate:8.0f} {unit}", flush=True)
    rows_out = [
        {
            **env,
            "shape": args.shape,
            "tokens": n,
            "dtype": args.dtype,
            "alpha": args.alpha,
            "head": int(args.head),
            **r,
        }
        for r in records
    ]
    harness.append_csv(args.csv, rows_out)


if __name__ == "__main__":
    main()
