"""SDFT steps three ways, same configuration: TRL's SDFTTrainer, TRL + our loss (FusedSDFTTrainer),
and sdft_fast's own engine. Seconds per step and peak memory, each side in a fresh process.

Cases (``--case``):

* ``short`` (the default): SmolLM2-135M-Instruct (the embedded default), batch 8 completions,
  24-token completions, LoRA r16 on every decoder linear layer, forward KL over the full
  vocabulary, EMA teacher at rate 0.01, first 3 completion tokens masked.
* ``long``: a random-weight model of Qwen2.5-0.5B's shape (D=896, 24 layers, V=151936, tied
  head), 512-token completions (``--batch-size 2`` by default), the same LoRA / teacher settings:
  here the [tokens, vocab] logits dominate TRL's memory. ``--mode topk_logits`` runs TRL's
  default objective (k=100) instead of ``full_logits``; our engine has no top-k mode, so it
  runs only for ``full_logits``.

Completions have exactly the requested length on every side (EOS ignored), fp32, CPU. A step is
everything an optimizer step costs: sampling, teacher and student scoring, loss, backward, AdamW,
EMA. ``--fixed-rollouts`` replaces the TRL sides' sampling by fixed random completions of the
requested length (the same tokens on both; a 512-token decode of the 0.5B shape costs tens of
minutes on a loaded 2-core CPU): the step is then scoring, loss, backward and optimizer, where
the two TRL sides differ; our engine, whose sampler cannot be swapped out, is left out then. The first ``--warmup`` steps are not timed. Peak memory: the process's peak RSS during
training (VmHWM, reset after the model is loaded; the weights stay resident), and that peak less
the RSS before training. Prints a table and appends one CSV row per side to
bench/results/trl_sides.csv (bench/results/trl.csv holds the earlier two-side runs).

    python bench/bench_trl.py [--case short|long] [--mode full_logits|topk_logits] [--steps 3]
        [--warmup 1] [--threads 2] [--sides trl,trl_fused,ours]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS_CSV = (
    Path(__file__).resolve().parent / "results" / "trl_sides.csv"
)  # trl.csv: the two-side runs before
SIDES = ("trl", "trl_fused", "ours")
LONG_MODEL = dict(  # Qwen2.5-0.5B's shape
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

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


def long_model_folder(cache: Path) -> Path:
    """A random-weight Qwen2 of Qwen2.5-0.5B's shape with the embedded model's tokenizer, saved once."""
    folder = cache / "qwen2.5-0.5b-shape-random"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sdft_fast.default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    torch.manual_seed(0)
    config = Qwen2Config(
        **LONG_MODEL, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model = Qwen2ForCausalLM(config)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


# ----------------------------------------------------------------------------- the three sides


class Memory:
    """Peak RSS during training: reset the high-water mark after loading, read it at the end."""

    def start(self) -> None:
        gc.collect()
        self.reset = harness.reset_peak_rss()
        self.before = harness.current_rss_bytes()

    def result(self) -> dict:
        peak = harness.peak_rss_bytes()
        return {
            "peak_rss_bytes": peak,
            "peak_extra_bytes": max(peak - self.before, 0),
            "peak_reset": self.reset,
        }


def run_ours(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sdft_fast.config import TrainConfig
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE, DataLimits, Example, encode_examples
    from sdft_fast.run import train
    from sdft_fast.trainer import build_model

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
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
    model = build_model(Path(args.model), config)
    memory = Memory()
    memory.start()
    result = train(model, tokenizer, encoded, config)
    rows = [row for row in result.metrics if not row.get("eval")]
    return {
        "step_s": [row["step_s"] for row in rows][args.warmup :],
        "sample_s": [row.get("sample_s", 0.0) for row in rows][args.warmup :],
        "loss": [row["loss"] for row in rows],
        **memory.result(),
    }


def run_trl(args, fused: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE

    trainer_class = SDFTTrainer
    if fused:
        from sdft_fast.integrations.trl import FusedSDFTTrainer as trainer_class

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
            distillation_mode=args.mode,
            distillation_alpha=0.0,
            distillation_topk=args.topk,
            teacher_model_kind="ema",
            teacher_update_rate=0.01,
            num_loss_tokens_to_skip=3,
            teacher_prompt_template=DEFAULT_TEACHER_TEMPLATE.replace(
                "{demonstration}", "{privileged_context}"
            ),
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            gradient_checkpointing=args.gradient_checkpointing,
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
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[StepTimer()],
        )
        if args.fixed_rollouts:
            trainer._generate = fixed_rollouts(args.completion, len(tokenizer))
        memory = Memory()
        memory.start()
        trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"step_s": step_times[args.warmup :], "loss": losses, **memory.result()}


def fixed_rollouts(length: int, vocab: int):
    """A stand-in for SDFTTrainer._generate: the same random completion tokens for the same prompt."""
    import torch

    def generate(prompt_ids):
        completions = []
        for ids in prompt_ids:
            gen = torch.Generator().manual_seed(sum(ids) * 31 + len(ids))
            completions.append(torch.randint(0, vocab, (length,), generator=gen).tolist())
        return prompt_ids, completions

    return generate


# ----------------------------------------------------------------------------- driver


def run_side(side: str, args) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--only", side]
    for name in ("model", "case", "mode", "topk", "steps", "warmup", "batch_size", "num_generations"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--completion", str(args.completion), "--lora-rank", str(args.lora_rank)]
    command += ["--threads", str(args.threads)] + (["--fixed-rollouts"] if args.fixed_rollouts else [])
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        return {
            "error": f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-2:])[:300]
        }
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["short", "long"], default="short")
    parser.add_argument("--mode", choices=["full_logits", "topk_logits"], default="full_logits")
    parser.add_argument("--topk", type=int, default=100, help="distillation_topk of the topk_logits mode")
    parser.add_argument("--model", default=None, help="HF model folder (default: per case)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (short 3, long 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (short 1, long 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="completions per step (short 8, long 2)")
    parser.add_argument("--num-generations", type=int, default=1, help="rollouts per prompt")
    parser.add_argument("--completion", type=int, default=None, help="completion tokens (short 24, long 512)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    parser.add_argument(
        "--cache", default=os.environ.get("SDFT_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "sdft_bench"))
    )
    parser.add_argument(
        "--fixed-rollouts",
        action="store_true",
        help="TRL sides: fixed random completions instead of sampling",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="TRL sides: recompute the backbone's activations",
    )
    parser.add_argument("--only", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-csv", action="store_true", help="print only, append no CSV row")
    args = parser.parse_args(argv)
    long_case = args.case == "long"
    defaults = dict(steps=(1, 3), warmup=(0, 1), batch_size=(2, 8), completion=(512, 24))
    for name, (long_value, short_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, long_value if long_case else short_value)
    if args.num_generations < 1 or args.batch_size % args.num_generations:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of --num-generations {args.num_generations}"
        )
    sides = [side for side in args.sides.split(",") if side]
    if unknown := [side for side in sides if side not in SIDES]:
        parser.error(f"--sides: unknown {unknown}; choose from {SIDES}")
    if (args.mode == "topk_logits" or args.fixed_rollouts) and "ours" in sides:
        sides.remove("ours")  # our engine: full vocabulary only, and its own sampler

    if importlib.util.find_spec("trl") is None:
        print("bench_trl: skipped: `trl` is not installed (pip install 'sdft_fast[trl]')")
        return 0
    if args.model is None:
        if long_case:
            args.model = str(long_model_folder(Path(args.cache)))
        else:
            from sdft_fast.default_model import default_model_path

            args.model = str(default_model_path())

    if args.only is not None:
        result = run_ours(args) if args.only == "ours" else run_trl(args, fused=args.only == "trl_fused")
        print(json.dumps(result))
        return 0

    env = harness.environment("cpu")
    load = os.getloadavg()[0]
    results = {side: run_side(side, args) for side in sides}
    stock = results.get("trl", {})
    rows = []
    for side in sides:
        result = results[side]
        row = {
            **env,
            "case": args.case,
            "mode": args.mode,
            "rollouts": "fixed" if args.fixed_rollouts else "sampled",
            "gradient_checkpointing": args.gradient_checkpointing,
            "side": side,
            "model": Path(args.model).name,
            "batch_size": args.batch_size,
            "num_generations": args.num_generations,
            "completion_tokens": args.completion,
            "lora_rank": args.lora_rank,
            "threads": args.threads,
            "load_avg_1m": round(load, 2),
            "timed_steps": len(result.get("step_s", [])),
            "warmup": args.warmup,
            "s_per_step": "",
            "peak_rss_mib": "",
            "peak_extra_mib": "",
            "time_vs_trl": "",
            "peak_vs_trl": "",
            "error": result.get("error", ""),
        }
        if "step_s" in result and result["step_s"]:
            row["s_per_step"] = round(statistics.median(result["step_s"]), 3)
            row["peak_rss_mib"] = round(result["peak_rss_bytes"] / 2**20)
            row["peak_extra_mib"] = round(result["peak_extra_bytes"] / 2**20)
            if stock.get("step_s"):
                row["time_vs_trl"] = round(row["s_per_step"] / statistics.median(stock["step_s"]), 3)
                row["peak_vs_trl"] = round(result["peak_rss_bytes"] / stock["peak_rss_bytes"], 3)
        rows.append(row)

    print(
        f"\nSDFT step ({args.case}, {args.mode}, {'fixed' if args.fixed_rollouts else 'sampled'} rollouts), "
        f"{Path(args.model).name}, batch {args.batch_size}, "
        f"completion {args.completion}, LoRA r{args.lora_rank}, fp32, {args.threads} threads, "
        f"{env['device']}, load {load:.1f}, commit {env['commit']}"
    )
    columns = [
        "side",
        "s_per_step",
        "time_vs_trl",
        "peak_rss_mib",
        "peak_vs_trl",
        "peak_extra_mib",
        "timed_steps",
        "error",
    ]
    print(harness.markdown_table(rows, columns))
    if not args.no_csv:
        harness.append_csv(RESULTS_CSV, rows)
        print(f"appended to {RESULTS_CSV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
