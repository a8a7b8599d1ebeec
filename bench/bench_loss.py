"""Benchmark: fused linear self-distillation loss, forward + backward, time and peak memory.

Contenders (gradient w.r.t. the student hidden states; with --head also w.r.t. the LM head):
  naive           TRL's full-logit formula: two [N, V] logit tensors, log_softmax, KL
  liger_chunked   Liger-Kernel's LigerFusedLinearJSDLoss (chunked, weight_hard_loss=0, eager)
  liger_fused     Liger-Kernel's LigerFusedLinearJSD (Triton; CUDA only)
  ours_triton     sdft_fast.self_distill_loss(impl="triton"), default budget: the 3-GEMM path where
                  it holds >= 128-row chunks, else the fused kernels (CUDA only)
  ours_gemm       the 3-GEMM path with chunks of --chunk-rows tokens (CUDA only)
  ours_fused      the fused kernels (chunk_rows=0) (CUDA only)
  ours_torch      sdft_fast.self_distill_loss(impl="torch"): the chunked PyTorch twin

Shapes are named after models (D, V). CUDA: all contenders share one set of inputs; each one's
peak is torch.cuda.max_memory_allocated above the inputs during its first step, and the times
are CUDA events over --repeats rounds in interleaved order (median; ``--in-process`` does the
same on CPU without memory, for dry runs under TRITON_INTERPRET=1). CPU: each measurement runs
in a fresh subprocess (its peak RSS above the inputs, wall and CPU seconds), contenders
alternating over --rounds rounds; the load average is recorded (shared machines).

    python bench/bench_loss.py --device cpu --goal                  # the CPU goal shape
    python bench/bench_loss.py --device cuda                         # 3 shapes x N = 8192/4096/1024
    python bench/bench_loss.py --device cuda --shapes Qwen2.5-7B --tokens 8192 --alpha 0.5
    python bench/bench_loss.py --device cuda --shapes Qwen2.5-7B --tokens 8192 --head

Per-phase times and the chunk-size sweep: bench/loss_phases.py. Goals: bench/gpu_goals.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {  # name: (D, V)
    "SmolLM2-135M": (576, 49152),
    "Qwen2.5-0.5B": (896, 151936),
    "Qwen2.5-7B": (3584, 152064),
    "tiny": (32, 300),  # dry runs of the scripts (gpu_check.sh --dry-run)
}
METHODS = [
    "naive",
    "liger_chunked",
    "liger_fused",
    "ours_triton",
    "ours_gemm",
    "ours_fused",
    "ours_torch",
]
CUDA_ONLY = {"liger_fused", "ours_triton", "ours_gemm", "ours_fused"}
CUDA_DEFAULT = ["naive", "liger_chunked", "liger_fused", "ours_triton", "ours_gemm", "ours_fused"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n, d, v, dtype, device, head):
    """Student / teacher hidden states and the LM head, with logits of std ~1 (seeded)."""
    gen = torch.Generator(device=device).manual_seed(0)
    h_s = (torch.randn(n, d, generator=gen, device=device) * 0.5).to(dtype).requires_grad_()
    h_t = (torch.randn(n, d, generator=gen, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_(head)
    return h_s, h_t, weight


def loss_function(method, inputs, alpha, chunk_rows, memory_budget_mb):
    """A closure computing the method's scalar loss (token mean) on ``inputs``. ``ours_*@B``
    runs ``ours_*`` with memory_budget_mb=B (several budgets side by side in one run)."""
    if "@" in method:
        method, budget = method.split("@")
        memory_budget_mb = float(budget)
    h_s, h_t, weight = inputs
    n = h_s.shape[0]
    if method == "naive":
        from sdft_kernels.reference import reference_token_losses

        return lambda: reference_token_losses(h_s, h_t, weight, alpha=alpha).float().mean()
    if method in ("ours_triton", "ours_torch"):
        from sdft_fast.loss import self_distill_loss

        impl = method.split("_")[1]
        return lambda: self_distill_loss(
            h_s,
            h_t,
            weight,
            alpha=alpha,
            reduction="token_mean",
            impl=impl,
            memory_budget_mb=memory_budget_mb,
        )
    if method in ("ours_gemm", "ours_fused"):
        from sdft_kernels.triton_sdft import triton_token_losses

        rows = chunk_rows if method == "ours_gemm" else 0
        grad_weights = torch.full((n,), 1.0 / n, device=h_s.device) if weight.requires_grad else None
        return lambda: triton_token_losses(
            h_s, h_t, weight, alpha=alpha, chunk_rows=rows, grad_weights=grad_weights
        ).mean()
    if method == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # compiled=False (eager) on every device: torch.compile adds minutes of build time per
        # shape, more than the GPU check's whole budget. The README labels it as eager.
        module = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=alpha, compiled=False
        )
        labels = torch.zeros(n, dtype=torch.long, device=h_s.device)
        return lambda: module(h_s, weight, h_t, weight.detach(), labels)
    if method == "liger_fused":
        from liger_kernel.transformers import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=alpha)
        return lambda: module(h_s, weight, h_t, weight.detach(), None)
    raise ValueError(f"unknown method {method!r}")


def make_step(method, inputs, alpha, chunk_rows, memory_budget_mb):
    """One forward + backward of the method; gradients of the previous step are dropped first."""
    loss_fn = loss_function(method, inputs, alpha, chunk_rows, memory_budget_mb)
    h_s, _, weight = inputs

    def step():
        h_s.grad = None
        weight.grad = None
        loss_fn().backward()

    return step


def gemm_flops(n, d, v):
    """FLOPs of one GEMM-equivalent (an N x V x D GEMM)."""
    return 2.0 * n * d * v


def measure_in_process(methods, n, d, v, dtype, args):
    """{method: {"ms": median, "times": [...], "peak_extra_bytes": ...} or {"error": ...}}.

    All contenders in this process on one set of inputs, timed in interleaved rounds. Peak
    memory on CUDA only (``--in-process`` CPU runs are dry runs of the script: no memory).
    """
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    inputs = make_inputs(n, d, v, dtype, args.device, args.head)
    results, steps = {}, {}
    for method in methods:
        try:
            step = make_step(method, inputs, args.alpha, args.chunk_rows, args.memory_budget_mb)
            inputs[0].grad = inputs[2].grad = None
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            step()  # first call: compiles the Triton kernels, and the memory peak
            results[method] = {}
            if cuda:
                torch.cuda.synchronize()
                results[method]["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            steps[method] = step
        except Exception as exc:  # e.g. out of memory for the naive formula: record it, go on
            results[method] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            inputs[0].grad = inputs[2].grad = None
            if cuda:
                torch.cuda.empty_cache()
    if steps:
        try:
            times = harness.time_interleaved(steps, args.repeats, args.device, warmup=1)
        except Exception as exc:
            for method in steps:
                results[method]["error"] = f"timing: {type(exc).__name__}: {str(exc)[:200]}"
            return results
        for method, ms in times.items():
            results[method].update(ms=statistics.median(ms), times=[round(t, 3) for t in ms])
    return results


def measure_cpu_worker(method, n, d, v, dtype_name, args):
    """One CPU measurement in this fresh process: peak RSS above the inputs, wall and CPU s."""
    torch.set_num_threads(args.threads)
    inputs = make_inputs(n, d, v, DTYPES[dtype_name], "cpu", args.head)
    step = make_step(method, inputs, args.alpha, args.chunk_rows, args.memory_budget_mb)
    # Peak RSS above the inputs: reset the high-water mark once they exist.
    if not harness.reset_peak_rss():
        raise RuntimeError("cannot reset the peak-RSS counter (/proc/self/clear_refs); memory would be wrong")
    base = harness.current_rss_bytes()
    step()  # warm-up; the peak of every step is the same
    peak = harness.peak_rss_bytes() - base
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return {
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "peak_extra_bytes": peak,
    }


def measure_cpu_case(methods, n, d, v, dtype_name, args):
    """Contenders alternate over ``args.rounds`` fresh worker processes each (median time)."""
    samples = {m: [] for m in methods}
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            worker_args = [
                "--device", "cpu", "--alpha", str(args.alpha), "--threads", str(args.threads),
                "--chunk-rows", str(args.chunk_rows), "--worker", method, str(n), str(d), str(v), dtype_name,
            ]  # fmt: skip
            if args.memory_budget_mb:
                worker_args += ["--memory-budget-mb", str(args.memory_budget_mb)]
            if args.head:
                worker_args.append("--head")
            samples[method].append(harness.run_worker(Path(__file__), worker_args))
    results = {}
    for method, runs in samples.items():
        good = [r for r in runs if "seconds" in r]
        if not good:
            results[method] = {"error": runs[-1].get("error", "no result")}
            continue
        results[method] = {
            "ms": 1e3 * statistics.median(r["seconds"] for r in good),
            "times": [round(1e3 * r["seconds"]) for r in good],
            "cpu_ms": 1e3 * statistics.median(r["cpu_seconds"] for r in good),
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in good),
        }
    return results


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["shape"], int(r["tokens"])) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cases)), 4.5))
    width = 0.8 / max(len(methods), 1)
    for ax, key, label in (
        (axes[0], "ms", "forward+backward time (ms)"),
        (axes[1], "peak_mib", "peak extra memory (MiB)"),
    ):
        for i, method in enumerate(methods):
            values = []
            for case in cases:
                match = [r for r in rows if (r["shape"], int(r["tokens"])) == case and r["method"] == method]
                values.append(float(match[0][key]) if match and match[0][key] not in ("", None) else 0.0)
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=method)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
        ax.set_xticklabels([f"{s}\nN={n}" for s, n in cases], fontsize=7)
        if ax.has_data() and any(b.get_height() > 0 for b in ax.patches):
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
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"of {METHODS}; ours_*@MiB: with that budget"
    )
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--head", action="store_true", help="the LM head trains too (full fine-tuning: dW)")
    parser.add_argument("--chunk-rows", type=int, default=256, help="chunk height of ours_gemm")
    parser.add_argument(
        "--memory-budget-mb", type=float, default=None, help="budget of ours_triton / ours_torch*"
    )
    parser.add_argument("--repeats", type=int, default=10, help="CUDA: interleaved timing rounds")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: fresh worker processes per contender")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: time in this process like on CUDA (dry runs; no memory)",
    )
    parser.add_argument("--quick", action="store_true", help="small CPU run (SmolLM2 shape, N=1024)")
    parser.add_argument("--goal", action="store_true", help="the CPU goal: Qwen2.5-0.5B, N=4096, fp32")
    parser.add_argument("--out-dir", type=Path, default=harness.REPO / "bench" / "results")
    parser.add_argument("--json", type=Path, default=None, help="also write this run's results here")
    parser.add_argument(
        "--worker", nargs=5, metavar=("METHOD", "N", "D", "V", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.worker:  # one CPU measurement in this fresh process
        method, n, d, v, dtype_name = args.worker
        print(json.dumps(measure_cpu_worker(method, int(n), int(d), int(v), dtype_name, args)))
        return

    if args.goal:
        shapes, tokens, dtype_name = ["Qwen2.5-0.5B"], [4096], "fp32"
        methods = ["ours_torch"]
    elif args.quick:
        shapes, tokens, dtype_name = ["SmolLM2-135M"], [1024], "fp32"
        methods = ["naive", "liger_chunked", "ours_torch"]
    elif args.device == "cuda":  # the goal case (7B shape, N=8192) first, in case time runs out
        shapes, tokens, dtype_name = (
            ["Qwen2.5-7B", "Qwen2.5-0.5B", "SmolLM2-135M"],
            [8192, 4096, 1024],
            "bf16",
        )
        methods = CUDA_DEFAULT
    else:
        shapes, tokens, dtype_name = ["SmolLM2-135M", "Qwen2.5-0.5B"], [1024, 4096], "fp32"
        methods = ["naive", "liger_chunked", "ours_torch"]
    shapes, tokens = args.shapes or shapes, args.tokens or tokens
    dtype_name = args.dtype or dtype_name
    methods = args.methods or methods
    unknown = [m for m in methods if m.split("@")[0] not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    cuda_only = sorted({m for m in methods if m.split("@")[0] in CUDA_ONLY})
    if args.device == "cpu" and cuda_only and not interpreted:
        parser.error(f"CUDA-only methods on CPU (without TRITON_INTERPRET=1): {cuda_only}")

    env = harness.environment(args.device)
    load_before = harness.load_average() if args.device == "cpu" else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        d, v = SHAPES[shape]
        for n in tokens:
            if args.device == "cuda" or args.in_process:
                results = measure_in_process(methods, n, d, v, DTYPES[dtype_name], args)
            else:
                results = measure_cpu_case(methods, n, d, v, dtype_name, args)
            for method in methods:
                result = results[method]
                ms = result.get("ms")
                row = {
                    **env,
                    "shape": shape,
                    "tokens": n,
                    "hidden": d,
                    "vocab": v,
                    "dtype": dtype_name,
                    "alpha": args.alpha,
                    "head": int(args.head),
                    "method": method,
                    "ms": "" if ms is None else f"{ms:.1f}",
                    "cpu_ms": f"{result['cpu_ms']:.0f}" if "cpu_ms" in result else "",
                    "tflops_3gemm": "" if ms is None else f"{3 * gemm_flops(n, d, v) / ms / 1e9:.0f}",
                    "peak_mib": harness.fmt_mib(result.get("peak_extra_bytes")).replace(",", ""),
                    "times_ms": " ".join(str(t) for t in result.get("times", [])),
                    "load": load_before,
                    "error": result.get("error", ""),
                }
                rows.append(row)
                # case by case: a timeout loses little. (loss.csv holds the rows of the older
                # schema, up to the H200 run of 2026-11-28.)
                harness.append_csv(args.out_dir / "loss_runs.csv", [row])
                print(
                    f"{shape:14s} N={n:5d} {method:16s} {row['ms']:>9s} ms {row['peak_mib']:>7s} MiB "
                    f"{row['cpu_ms']:>8s} {row['error']}",
                    flush=True,
                )
            if args.json:  # rewritten after every case, so that a timeout keeps what was measured
                args.json.write_text(json.dumps(rows, indent=1))

    plot(rows, args.out_dir / f"loss_{args.device}.png")
    table = []
    for row in rows:
        same = [r for r in rows if (r["shape"], r["tokens"]) == (row["shape"], row["tokens"]) and r["ms"]]
        out = {k: row[k] for k in ("shape", "tokens", "dtype", "method", "ms", "cpu_ms", "peak_mib", "error")}
        for base in ("naive", "liger_fused", "ours_torch"):
            ref = next((r for r in same if r["method"] == base), None)
            if ref and row["ms"]:
                out[f"time_vs_{base}"] = f"{float(row['ms']) / float(ref['ms']):.2f}x"
        table.append(out)
    print(f"\n{env['device']} — torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    if args.device == "cpu":
        print(f"load average before: {load_before}, after: {harness.load_average()}")
    columns = ["shape", "tokens", "dtype", "method", "ms", "cpu_ms", "peak_mib", "time_vs_naive"]
    columns += ["time_vs_liger_fused", "time_vs_ours_torch", "error"]
    print(harness.markdown_table(table, columns))


if __name__ == "__main__":
    main()
