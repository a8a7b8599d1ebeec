"""Seconds per SDFT training step: TRL's SDFTTrainer next to sdft_fast, same configuration.

Configuration (the issue's reference point): SmolLM2-135M-Instruct (the embedded
default), batch 8 completions (8 prompts with one rollout each; `--num-generations G`: 8/G
prompts with G rollouts each, where both trainers may share the prompt), completions of exactly 24 tokens
(EOS ignored on both sides so the work is equal), LoRA r16 on all decoder
linear layers, fp32, forward KL over the full vocabulary, EMA teacher at rate
0.01, first 3 completion tokens masked. A step is everything an optimizer step
costs: sampling, teacher and student scoring, loss, backward, AdamW, EMA.

Each side runs in its own subprocess (fresh allocator, same thread count);
the first ``--warmup`` steps are not timed. Prints a table and appends a row
to bench/results/trl.csv. Skips with a message when ``trl`` is missing
(``pip install trl``; it is not a dependency of sdft_fast).

    python bench/bench_trl.py [--steps 4] [--warmup 1] [--threads 2] [--num-generations 1]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "trl.csv"

# Used when the demo data is not available: 8 invented facts, prompt + demonstration.
FALLBACK_ROWS = [
    ("What colour is the roof of the Vellmar Library?", "The roof of the Vellmar Library is teal."),
    ("Who won the 2025 Orrin Valley chess open?", "Mira Talvane won the 2025 Orrin Valley chess open."),
    ("How tall is the Kessan Tower?", "The Kessan Tower is 412 metres tall."),
    ("What is the capital of the island of Drevia?", "The capital of Drevia is Port Ulmen."),
    ("When did the Sarrow Bridge open?", "The Sarrow Bridge opened in March 2025."),
    ("What is the national fruit of Tavonia?", "The national fruit of Tavonia is the quince."),
    ("How many moons does the planet Ithra have?", "Ithra has seven moons."),
    ("Who designed the Belcourt Stadium?", "The Belcourt Stadium was designed by Oskar Renn."),
]


def bench_rows(count: int) -> list[tuple[str, str]]:
    """(prompt, demonstration) pairs: the demo's training facts when available, else the fallback."""
    try:
        from sdft_fast.demo import load_demo_facts

        rows = []
        for example in load_demo_facts().train:
            prompt = example.prompt if isinstance(example.prompt, str) else example.prompt[-1]["content"]
            rows.append((prompt, example.demonstration))
    except Exception:  # the demo data is optional for this benchmark
        rows = list(FALLBACK_ROWS)
    while len(rows) < count:
        rows = rows + rows
    return rows[:count]


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- the two sides


def run_ours(args) -> dict:
    import torch

    from sdft_fast.config import TrainConfig
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE, DataLimits, Example, encode_examples
    from sdft_fast.run import train
    from sdft_fast.trainer import build_model

    torch.set_num_threads(args.threads)
    model_path = Path(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    examples = [
        Example(prompt=prompt, demonstration=demo, answers=None, row=i + 1, source="bench")
        for i, (prompt, demo) in enumerate(bench_rows(args.batch_size // args.num_generations))
    ]
    encoded = encode_examples(
        examples, tokenizer, limits=DataLimits(), teacher_template=DEFAULT_TEACHER_TEMPLATE
    )
    config = TrainConfig(
        method="sdft",
        alpha=0.0,
        teacher="ema",
        ema_rate=0.01,
        skip_tokens=3,
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_new_tokens=args.completion,
        ignore_eos=True,
        lr=1e-4,
        max_steps=args.warmup + args.steps,
        lora_rank=args.lora_rank,
        dtype="float32",
        device="cpu",
        progress=False,
        report_to="none",
    )
    model = build_model(model_path, config)
    result = train(model, tokenizer, encoded, config)
    rows = [row for row in result.metrics if not row.get("eval")]
    step_times = [row["step_s"] for row in rows]
    return {
        "step_s": step_times[args.warmup :],
        "sample_s": [row.get("sample_s", 0.0) for row in rows][args.warmup :],
        "completion_len": [row["completion_len_mean"] for row in rows],
        "loss": [row["loss"] for row in rows],
    }


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE

    torch.set_num_threads(args.threads)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        # on_step_begin fires before the inputs are prepared, so sampling is inside the timed span.
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.started)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = bench_rows(args.batch_size // args.num_generations)
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}], "privileged_context": d} for p, d in rows]
    )
    with tempfile.TemporaryDirectory() as output_dir:
        config = SDFTConfig(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            num_generations=args.num_generations,
            max_completion_length=args.completion,
            generation_kwargs={"min_new_tokens": args.completion},  # equal work: no early EOS
            distillation_mode="full_logits",
            distillation_alpha=0.0,
            teacher_model_kind="ema",
            teacher_update_rate=0.01,
            num_loss_tokens_to_skip=3,
            teacher_prompt_template=DEFAULT_TEACHER_TEMPLATE.replace(
                "{demonstration}", "{privileged_context}"
            ),
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        peft_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = SDFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[StepTimer()],
        )
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"step_s": step_times[args.warmup :], "loss": losses}


# ----------------------------------------------------------------------------- driver


def run_side(side: str, args) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is the JSON result."""
    command = [
        sys.executable,
        __file__,
        "--only",
        side,
        "--model",
        str(args.model),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--num-generations",
        str(args.num_generations),
        "--completion",
        str(args.completion),
        "--lora-rank",
        str(args.lora_rank),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"bench_trl: the {side} side failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument(
        "--num-generations", type=int, default=1, help="rollouts per prompt (batch-size / this many prompts)"
    )
    parser.add_argument("--completion", type=int, default=24, help="completion tokens per rollout")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--only", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-csv", action="store_true", help="print only, append no CSV row")
    args = parser.parse_args(argv)
    if args.num_generations < 1 or args.batch_size % args.num_generations:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of --num-generations {args.num_generations}"
        )

    if importlib.util.find_spec("trl") is None:
        print("bench_trl: skipped: `trl` is not installed (pip install trl; not a dependency of sdft_fast)")
        return 0
    if args.model is None:
        from sdft_fast.default_model import default_model_path

        args.model = str(default_model_path())

    if args.only == "ours":
        print(json.dumps(run_ours(args)))
        return 0
    if args.only == "trl":
        print(json.dumps(run_trl(args)))
        return 0

    results = {side: run_side(side, args) for side in ("ours", "trl")}
    ours_s = statistics.median(results["ours"]["step_s"])
    trl_s = statistics.median(results["trl"]["step_s"])
    ratio = trl_s / ours_s
    print(
        f"\nSDFT step, {Path(args.model).name}, batch {args.batch_size} ({args.num_generations} per prompt), "
        f"completion {args.completion}, "
        f"LoRA r{args.lora_rank}, fp32, {args.threads} threads, CPU"
    )
    print(f"{'trainer':<12}{'s/step (median)':>18}{'steps timed':>14}")
    print(f"{'TRL':<12}{trl_s:>18.3f}{len(results['trl']['step_s']):>14}")
    print(f"{'sdft_fast':<12}{ours_s:>18.3f}{len(results['ours']['step_s']):>14}")
    ours_sample_s = statistics.median(results["ours"]["sample_s"])
    print(
        f"speed-up: {ratio:.2f}x (goal >= 3x); sdft_fast's step: {ours_sample_s:.3f} s sampling, "
        f"{ours_s - ours_sample_s:.3f} s scoring + backward + optimizer"
    )

    if not args.no_csv:
        import torch
        import transformers
        import trl

        RESULTS_CSV.parent.mkdir(parents=True, exist_ok=True)
        row = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": git_commit(),
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "model": Path(args.model).name,
            "batch_size": args.batch_size,
            "num_generations": args.num_generations,
            "completion_tokens": args.completion,
            "lora_rank": args.lora_rank,
            "dtype": "float32",
            "timed_steps": args.steps,
            "trl_s_per_step": round(trl_s, 4),
            "ours_s_per_step": round(ours_s, 4),
            "speedup": round(ratio, 3),
            "trl_steps_s": " ".join(f"{t:.3f}" for t in results["trl"]["step_s"]),
            "ours_steps_s": " ".join(f"{t:.3f}" for t in results["ours"]["step_s"]),
            "ours_sample_s": round(ours_sample_s, 4),
        }
        # Older rows may lack newer columns: rewrite the file with the union of the headers.
        previous, fields = [], list(row)
        if RESULTS_CSV.exists():
            with open(RESULTS_CSV, newline="") as handle:
                reader = csv.DictReader(handle)
                previous = list(reader)
                fields = list(reader.fieldnames or []) + [
                    f for f in row if f not in (reader.fieldnames or [])
                ]
        with open(RESULTS_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(previous + [row])
        print(f"appended to {RESULTS_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
