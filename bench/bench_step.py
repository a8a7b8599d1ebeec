"""Benchmark: one SDFT training step (pair forward + distillation loss + backward).

Contenders, all with LoRA r=16 on every decoder linear, a base-model teacher
(adapter off) and forward KL over the full vocabulary (alpha=0):
  ours_one_pass  SelfDistillModel packed fast path: teacher + student rows in one token
                 stream, one GEMM per linear, student-only autograd; fused chunked loss
  ours_two_pass  SelfDistillModel generic path (teacher no-grad HF pass, student HF pass);
                 fused chunked loss
  trl_style      PEFT LoRA model, two HF forwards (teacher under no_grad with the adapter
                 disabled), full [B, T, V] logits, log_softmax, KL: the TRL recipe

Models are random-weight models shaped like SmolLM2-135M (Llama) and Qwen2.5-0.5B
(Qwen2, tied embeddings): speed and memory do not depend on the weights' values.
Issue shape: batch 8, prompt 64, demonstration 128 (teacher prompt = 192), completion 128.

Peak memory = the step's extra memory above the resident model. CPU: each measurement
runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so glibc returns
every freed tensor to the OS (otherwise the warmup step's freed memory stays resident and
later peaks are invisible); the kernel's peak-RSS mark is reset (/proc/self/clear_refs)
after the warmup step, and VmHWM - VmRSS(before) is reported (ru_maxrss when the reset is
unavailable). CUDA: torch.cuda.max_memory_allocated above the allocation before the step.

CPU workers use one thread by default: on the shared 2-core machine two OpenMP threads
spin against the other jobs and ran 10-30x slower than one.

    python bench/bench_step.py --quick                  # short CPU run (4-layer models, small batch)
    python bench/bench_step.py --repeats 2              # the issue's shapes on CPU (~20 min, 1 thread)
    python bench/bench_step.py --device cuda            # GPU (bf16), well under 90 s
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["ours_one_pass", "ours_two_pass", "trl_style"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(name: str, layers: int | None):
    from transformers import LlamaConfig, Qwen2Config

    if name == "SmolLM2-135M":
        config = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        )
    elif name == "Qwen2.5-0.5B":
        config = Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"unknown model shape {name!r}")
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def build_hf_model(name: str, layers: int | None, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name, layers), dtype=dtype)
    return model.train()


def random_batch(batch: int, prompt: int, demo: int, completion: int, vocab: int):
    gen = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, vocab, (batch, n), generator=gen)
    student_prompts = ids(prompt)  # [B, P]
    teacher_prompts = torch.cat([student_prompts, ids(demo)], 1)  # [B, P + demo]
    completions = ids(completion)  # [B, C]
    return student_prompts, teacher_prompts, completions


def make_step(method: str, hf_model, batch_tensors, device: str):
    """A closure running one step (no optimizer update) and its trainable parameters."""
    from sdft_fast.lora import LoraConfig
    from sdft_fast.loss import self_distill_loss
    from sdft_fast.model import PairBatch, SelfDistillModel

    student_prompts, teacher_prompts, completions = (t.to(device) for t in batch_tensors)
    n_prompt, n_teacher_prompt, n_completion = (
        student_prompts.shape[1],
        teacher_prompts.shape[1],
        completions.shape[1],
    )

    if method in ("ours_one_pass", "ours_two_pass"):
        model = SelfDistillModel(hf_model, lora=LoraConfig(r=16, alpha=32), teacher="base")
        if method == "ours_two_pass":
            model.fast_path = False  # force the generic two-pass path on a fast-path model
        pair = PairBatch(student_prompts.tolist(), teacher_prompts.tolist(), completions.tolist())
        params = model.trainable_parameters()

        def step():
            out = model.forward_pair(pair)
            loss = self_distill_loss(
                out.student_hidden,
                out.teacher_hidden,
                model.lm_head_weight,
                alpha=0.0,
                sequence_ids=out.sequence_ids,
            )
            loss.backward()
            return loss.detach()

        return step, params

    if method == "trl_style":
        import peft

        model = peft.get_peft_model(
            hf_model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
        )
        params = [p for p in model.parameters() if p.requires_grad]
        student_ids = torch.cat([student_prompts, completions], 1)  # [B, P + C]
        teacher_ids = torch.cat([teacher_prompts, completions], 1)  # [B, P' + C]

        def step():
            # Teacher: base model (adapter off), full logits, no grad.
            with torch.no_grad(), model.disable_adapter():
                teacher_logits = model(input_ids=teacher_ids).logits  # [B, P'+C, V]
            teacher_logits = teacher_logits[:, n_teacher_prompt - 1 : n_teacher_prompt - 1 + n_completion]
            student_logits = model(input_ids=student_ids).logits  # [B, P+C, V]
            student_logits = student_logits[:, n_prompt - 1 : n_prompt - 1 + n_completion]
            log_p_s = torch.log_softmax(student_logits.float(), -1)
            log_p_t = torch.log_softmax(teacher_logits.float(), -1)
            # forward KL(T || S) per token, mean over completion tokens
            loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
            loss.backward()
            return loss.detach()

        return step, params

    raise ValueError(f"unknown method {method!r}")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(args) -> dict:
    """One (model, method) measurement in this process."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_model = build_hf_model(args.model, args.layers, device, dtype)
    batch_tensors = random_batch(
        args.batch, args.prompt, args.demo, args.completion, hf_model.config.vocab_size
    )
    step, params = make_step(args.method, hf_model, batch_tensors, device)

    def run():
        for p in params:
            p.grad = None
        return step()

    run()  # warmup (also allocates the LoRA gradients once)
    for p in params:
        p.grad = None
    gc.collect()
    harness.synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_ok = _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024 if reset_ok else harness.peak_rss_bytes()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        harness.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = (_status_kib("VmHWM") * 1024 if reset_ok else harness.peak_rss_bytes()) - before
    return {
        "time_s": statistics.median(times),
        "time_min_s": min(times),
        "cpu_s": statistics.median(cpu_times),
        "peak_bytes": max(peak, 0),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(METHODS)
    for panel, (key, label) in zip(
        axes, [("time_s", "step time (s, median)"), ("peak_mib", "step peak memory (MiB)")]
    ):
        for i, method in enumerate(METHODS):
            values = [
                next(
                    (
                        float(r[key])
                        for r in rows
                        if r["model"] == m and r["method"] == method and r[key] != ""
                    ),
                    0.0,
                )
                for m in models
            ]
            panel.bar([x + i * width for x in range(len(models))], values, width, label=method)
        layers = {r["model"]: r["layers"] for r in rows}
        panel.set_xticks(
            [x + width * (len(METHODS) - 1) / 2 for x in range(len(models))],
            [f"{m} ({layers[m]} layers)" for m in models],
        )
        panel.set_ylabel(label)
    first = rows[0]
    fig.suptitle(
        f"SDFT step, batch {first['batch']}, prompt {first['prompt']}, demo {first['demo']}, completion "
        f"{first['completion']}, {first['dtype']}, on {first['device']}",
        fontsize=9,
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--quick", action="store_true", help="4-layer models, batch 2, prompt 32, demo 32, completion 32"
    )
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M", "Qwen2.5-0.5B"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--demo", type=int, default=128)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in workers (default: 1 on CPU, torch's default on CUDA). On a shared "
        "2-core machine two OpenMP threads spin against other jobs and run 10-30x slower than one.",
    )
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    parser.add_argument("--csv", type=Path, default=RESULTS / "step.csv", help="CSV to append rows to")
    parser.add_argument("--png", type=Path, default=RESULTS / "step.png", help="plot of this run")
    # worker mode (one measurement, JSON on stdout)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.prompt, args.demo, args.completion = 2, 32, 32, 32
        args.layers = args.layers or 4
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.repeats is None:
        args.repeats = 5 if args.device == "cuda" else (2 if args.quick else 3)

    if args.worker:
        print(json.dumps(measure(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")

    if args.device == "cpu":
        # Workers inherit this: freed tensors go back to the OS, so peak RSS tracks live memory.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env = harness.environment(args.device)
    import transformers

    rows = []
    for model_name in args.models:
        for method in args.methods:
            worker_args = [
                "--worker",
                "--device", args.device,
                "--model", model_name,
                "--method", method,
                "--batch", str(args.batch),
                "--prompt", str(args.prompt),
                "--demo", str(args.demo),
                "--completion", str(args.completion),
                "--repeats", str(args.repeats),
                "--threads", str(args.threads),
            ]  # fmt: skip
            if args.layers is not None:
                worker_args += ["--layers", str(args.layers)]
            if args.device == "cuda":  # CUDA peaks come from the allocator: no need for a fresh process
                ns = parser.parse_args(worker_args)
                result = measure(ns)
                del ns
                gc.collect()
                torch.cuda.empty_cache()
            else:
                result = harness.run_worker(Path(__file__), worker_args)
            layers = (
                args.layers if args.layers is not None else model_config(model_name, None).num_hidden_layers
            )
            row = {
                **env,
                "transformers": transformers.__version__,
                "model": model_name,
                "method": method,
                "layers": layers,
                "batch": args.batch,
                "prompt": args.prompt,
                "demo": args.demo,
                "completion": args.completion,
                "dtype": "bf16" if args.device == "cuda" else "fp32",
                "repeats": args.repeats,
                "time_s": f"{result['time_s']:.3f}" if "time_s" in result else "",
                "time_min_s": f"{result['time_min_s']:.3f}" if "time_min_s" in result else "",
                # CPU seconds of this process (all threads): on a shared machine this tracks
                # the work done far better than wall time, which other jobs inflate.
                "cpu_s": f"{result['cpu_s']:.3f}" if "cpu_s" in result else "",
                "peak_mib": f"{result['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in result else "",
                "error": result.get("error", ""),
            }
            rows.append(row)
            print(
                f"{model_name:14s} {method:14s} {row['time_s']:>8s} s {row['cpu_s']:>8s} cpu-s "
                f"{row['peak_mib']:>8s} MiB {row['error']}",
                flush=True,
            )

    # ratios against the TRL-style step of the same model
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["method"] == "trl_style"), None)
        ok = base and base["time_s"] and row["time_s"] and base["peak_mib"] and row["peak_mib"]
        row["speedup_vs_trl"] = f"{float(base['time_s']) / float(row['time_s']):.2f}" if ok else ""
        row["cpu_speedup_vs_trl"] = f"{float(base['cpu_s']) / float(row['cpu_s']):.2f}" if ok else ""
        row["mem_vs_trl"] = f"{float(row['peak_mib']) / max(float(base['peak_mib']), 1.0):.2f}" if ok else ""
    print()
    print(
        harness.markdown_table(
            rows,
            [
                "model",
                "method",
                "layers",
                "time_s",
                "speedup_vs_trl",
                "cpu_s",
                "cpu_speedup_vs_trl",
                "peak_mib",
                "mem_vs_trl",
                "error",
            ],
        )
    )
    print(
        f"\n{env['device']}, torch {env['torch']}, transformers {transformers.__version__}, commit {env['commit']}"
    )
    if not args.no_csv:
        harness.append_csv(args.csv, rows)
        plot(rows, args.png)
        print(f"appended {len(rows)} rows to {args.csv}; plot {args.png}")


if __name__ == "__main__":
    main()
