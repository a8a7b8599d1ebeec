"""Benchmark: fused linear self-distillation loss, forward + backward, time and peak memory.

Contenders (LM head frozen, the LoRA case; gradient w.r.t. the student hidden states):
  naive         TRL's full-logit formula: two [N, V] logit tensors, log_softmax, KL
  liger_chunked Liger-Kernel's LigerFusedLinearJSDLoss (chunked, weight_hard_loss=0, eager)
  liger_fused   Liger-Kernel's LigerFusedLinearJSD (Triton; CUDA only)
  ours_torch    sdft_fast.self_distill_loss(impl="torch")
  ours_triton   sdft_fast.self_distill_loss(impl="triton") (CUDA only)

Shapes are named after models (D, V). CPU: each measurement runs in a fresh subprocess and
reports its peak RSS above the inputs; CUDA: torch.cuda.max_memory_allocated above the inputs.

    python bench/bench_loss.py --device cpu --quick          # minutes on 2 cores
    python bench/bench_loss.py --device cpu --goal           # the issue's CPU goal shape
    python bench/bench_loss.py --device cuda                 # GPU table (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {  # name: (D, V)
    "SmolLM2-135M": (576, 49152),
    "Qwen2.5-0.5B": (896, 151936),
    "Qwen2.5-7B": (3584, 152064),
}
METHODS = ["naive", "liger_chunked", "liger_fused", "ours_torch", "ours_triton"]
CUDA_ONLY = {"liger_fused", "ours_triton"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(method: str, n: int, d: int, v: int, dtype: torch.dtype, device: str, alpha: float):
    """Inputs and a closure running one forward + backward of the method (loss = token mean)."""
    gen = torch.Generator(device=device).manual_seed(0)
    h_s = (torch.randn(n, d, generator=gen, device=device) * 0.5).to(dtype).requires_grad_()
    h_t = (torch.randn(n, d, generator=gen, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=device) / d**0.5).to(dtype)

    if method == "naive":
        from sdft_kernels.reference import reference_token_losses

        def loss_fn():
            return reference_token_losses(h_s, h_t, weight, alpha=alpha).float().mean()

    elif method in ("ours_torch", "ours_triton"):
        from sdft_fast.loss import self_distill_loss

        impl = method.split("_")[1]

        def loss_fn():
            return self_distill_loss(h_s, h_t, weight, alpha=alpha, reduction="token_mean", impl=impl)

    elif method == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # compiled=False (eager) on every device: torch.compile adds minutes of build time per
        # shape, more than the GPU check's whole budget. The README labels it as eager.
        module = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=alpha, compiled=False
        )
        labels = torch.zeros(n, dtype=torch.long, device=device)

        def loss_fn():
            return module(h_s, weight, h_t, weight, labels)

    elif method == "liger_fused":
        from liger_kernel.transformers import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=alpha)

        def loss_fn():
            return module(h_s, weight, h_t, weight, None)

    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        h_s.grad = None
        loss_fn().backward()

    return step


def measure(method, n, d, v, dtype_name, device, repeats, alpha):
    dtype = DTYPES[dtype_name]
    if device == "cuda":
        torch.cuda.empty_cache()
        step = make_step(method, n, d, v, dtype, device, alpha)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()  # warm-up (compiles Triton kernels) and the memory peak
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        seconds = harness.time_median(step, device, repeats, warmup=1)
        return {"seconds": seconds, "peak_extra_bytes": peak}
    step = make_step(method, n, d, v, dtype, device, alpha)
    # Peak RSS above the inputs: reset the high-water mark once they exist (temporaries made while
    # building them would otherwise hide the method's own peak).
    if not harness.reset_peak_rss():
        raise RuntimeError("cannot reset the peak-RSS counter (/proc/self/clear_refs); memory would be wrong")
    base = harness.current_rss_bytes()
    step()  # warm-up; the peak of every step is the same
    peak = harness.peak_rss_bytes() - base
    seconds = harness.time_median(step, device, repeats, warmup=0)
    return {"seconds": seconds, "peak_extra_bytes": peak}


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["shape"], int(r["tokens"]), r["dtype"]) for r in rows}, key=lambda c: (c[0], c[1]))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cases)), 4.5))
    width = 0.8 / max(len(methods), 1)
    for ax, key, label in (
        (axes[0], "ms", "forward+backward time (ms)"),
        (axes[1], "peak_mib", "peak extra memory (MiB)"),
    ):
        for i, method in enumerate(methods):
            values = []
            for case in cases:
                match = [
                    r
                    for r in rows
                    if (r["shape"], int(r["tokens"]), r["dtype"]) == case and r["method"] == method
                ]
                values.append(float(match[0][key]) if match and match[0][key] not in ("", None) else 0.0)
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
        ax.set_xticklabels([f"{s}\nN={n} {dt}" for s, n, dt in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Fused linear self-distillation loss — {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small CPU run (SmolLM2 shape, N=1024)")
    parser.add_argument(
        "--goal", action="store_true", help="the issue's CPU goal: Qwen2.5-0.5B, N=4096, fp32"
    )
    parser.add_argument("--out-dir", type=Path, default=harness.REPO / "bench" / "results")
    parser.add_argument(
        "--worker", nargs=5, metavar=("METHOD", "N", "D", "V", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    repeats = args.repeats or (5 if args.device == "cuda" else 3)
    if args.worker:  # one CPU measurement in this fresh process
        method, n, d, v, dtype_name = args.worker
        print(
            json.dumps(measure(method, int(n), int(d), int(v), dtype_name, args.device, repeats, args.alpha))
        )
        return

    if args.goal:
        shapes, tokens, dtype_name = ["Qwen2.5-0.5B"], [4096], "fp32"
    elif args.quick:
        shapes, tokens, dtype_name = ["SmolLM2-135M"], [1024], "fp32"
    elif args.device == "cuda":  # the goal case (7B shape, N=8192) first, in case time runs out
        shapes, tokens, dtype_name = list(SHAPES)[::-1], [8192, 4096, 1024], "bf16"
    else:
        shapes, tokens, dtype_name = ["SmolLM2-135M", "Qwen2.5-0.5B"], [1024, 4096], "fp32"
    shapes = args.shapes or shapes
    tokens = args.tokens or tokens
    dtype_name = args.dtype or dtype_name
    methods = args.methods or [m for m in METHODS if args.device == "cuda" or m not in CUDA_ONLY]

    env = harness.environment(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        d, v = SHAPES[shape]
        for n in tokens:
            for method in methods:
                if args.device == "cpu":
                    result = harness.run_worker(
                        Path(__file__),
                        [
                            "--device",
                            "cpu",
                            "--repeats",
                            str(repeats),
                            "--alpha",
                            str(args.alpha),
                            "--worker",
                            method,
                            str(n),
                            str(d),
                            str(v),
                            dtype_name,
                        ],
                    )
                else:
                    try:
                        result = measure(method, n, d, v, dtype_name, "cuda", repeats, args.alpha)
                    except Exception as exc:  # e.g. out of memory for the naive formula: record it
                        result = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                        torch.cuda.empty_cache()
                row = {
                    **env,
                    "shape": shape,
                    "tokens": n,
                    "hidden": d,
                    "vocab": v,
                    "dtype": dtype_name,
                    "alpha": args.alpha,
                    "method": method,
                    "ms": f"{result['seconds'] * 1e3:.1f}" if "seconds" in result else "",
                    "peak_mib": harness.fmt_mib(result.get("peak_extra_bytes")).replace(",", ""),
                    "error": result.get("error", ""),
                }
                rows.append(row)
                harness.append_csv(args.out_dir / "loss.csv", [row])  # row by row: a timeout loses nothing
                print(
                    f"{shape:14s} N={n:5d} {method:14s} {row['ms']:>10s} ms {row['peak_mib']:>8s} MiB {row['error']}",
                    flush=True,
                )

    plot(rows, args.out_dir / f"loss_{args.device}.png")
    # Ratios against the naive formula and Liger, within this run.
    table = []
    for row in rows:
        same = [r for r in rows if (r["shape"], r["tokens"]) == (row["shape"], row["tokens"]) and r["ms"]]
        naive = next((r for r in same if r["method"] == "naive"), None)
        out = {k: row[k] for k in ("shape", "tokens", "dtype", "method", "ms", "peak_mib", "error")}
        if naive and row["ms"]:
            out["time_vs_naive"] = f"{float(row['ms']) / float(naive['ms']):.2f}x"
            if float(naive["peak_mib"] or 0) > 0:
                out["mem_vs_naive"] = f"{float(row['peak_mib']) / float(naive['peak_mib']):.3f}x"
        table.append(out)
    print(f"\n{env['device']} — torch {env['torch']}, triton {env['triton']}, commit {env['commit']}\n")
    print(
        harness.markdown_table(
            table,
            [
                "shape",
                "tokens",
                "dtype",
                "method",
                "ms",
                "peak_mib",
                "time_vs_naive",
                "mem_vs_naive",
                "error",
            ],
        )
    )


if __name__ == "__main__":
    main()
