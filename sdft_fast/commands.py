"""What each ``sdft-fast`` subcommand does once its flags are parsed (:mod:`sdft_fast.cli`).

Every handler reads, validates and tokenizes the data before it loads a model, so a bad row fails
in seconds; ``train`` refuses a used ``--output-dir`` before that, and on ``--resume`` takes every
setting not given on the command line from the checkpoint. Heavy imports happen inside the
handlers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from sdft_fast.config import ConfigError, TrainConfig, flag_fields

# ----------------------------------------------------------------------------- shared


def _teacher_template(args) -> str:
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE

    template = args.teacher_template or DEFAULT_TEACHER_TEMPLATE
    if template.startswith("@"):
        path = Path(template[1:])
        if not path.is_file():
            raise ValueError(f"--teacher-template {template}: {path} is not a file")
        template = path.read_text(encoding="utf-8")
    return template


def _load_and_encode(data: str, tokenizer, args, *, method: str = "sft", require_demonstration: bool = True):
    """Read, validate and tokenize the data before any model is loaded, so bad rows fail fast.

    The demonstration must fit the completion limit only where it is a training target (SFT);
    SDFT only shows it to the teacher, inside the teacher prompt's own limit. Returns the rows,
    their encodings and the report of truncated / skipped rows (``--overlong``).
    """
    from sdft_fast.data import DataLimits, EncodeReport, encode_examples, load_examples

    examples = load_examples(data, require_demonstration=require_demonstration)
    limits = DataLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_teacher_prompt_tokens=args.max_teacher_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
    )
    report = EncodeReport()
    encoded = encode_examples(
        examples,
        tokenizer,
        limits=limits,
        teacher_template=_teacher_template(args),
        check_demonstration_length=method == "sft",
        overlong=args.overlong,
        report=report,
    )
    if not encoded:
        raise ValueError(f"{data}: every row is over a token limit (--overlong {args.overlong} left none)")
    kept = {(e.source, e.row) for e in encoded}
    examples = [e for e in examples if (e.source, e.row) in kept]
    return examples, encoded, report


def _check_device(name: str) -> None:
    from sdft_fast.model import resolve_device

    try:
        resolve_device(name)
    except ValueError as error:
        raise ValueError(f"--device {name}: {error}") from None


def _model_and_tokenizer_path(args) -> Path:
    from sdft_fast.default_model import resolve_model_path

    return resolve_model_path(args.model, trust_remote_code=args.trust_remote_code)


def _load_model(model_path: Path, args):
    """A SelfDistillModel for inference, shaped to take ``--adapter`` (a LoRA adapter folder, or the
    full weights a full fine-tuning run saves); the start model without one."""
    from sdft_fast.lora import LoraConfig
    from sdft_fast.model import SelfDistillModel
    from sdft_fast.peft_io import ADAPTER_CONFIG, FULL_WEIGHTS

    adapter = getattr(args, "adapter", None)
    lora = None
    if adapter:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"--adapter {adapter}: not a folder")
        adapter_config = Path(adapter) / ADAPTER_CONFIG
        if adapter_config.is_file():
            try:
                values = json.loads(adapter_config.read_text())
                lora = LoraConfig(r=int(values["r"]), alpha=float(values["lora_alpha"]))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"--adapter {adapter}: {ADAPTER_CONFIG} is unreadable ({error})") from None
        elif not (Path(adapter) / FULL_WEIGHTS).is_file():
            raise FileNotFoundError(f"--adapter {adapter}: neither {ADAPTER_CONFIG} nor {FULL_WEIGHTS} in it")
    _check_device(args.device)
    model = SelfDistillModel.from_pretrained(
        model_path,
        lora=lora,
        teacher="base",
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    if adapter:
        model.load_adapter(adapter)
    return model


# ----------------------------------------------------------------------------- train


def _given_settings(args) -> dict[str, Any]:
    """The TrainConfig values the user set (flags or --config); None means not given."""
    values: dict[str, Any] = {"output_dir": args.output_dir}
    for name in [spec.name for spec in flag_fields()] + ["dtype", "device", "shuffle", "progress"]:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    return values


def _resume_checkpoint(args) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` names (or the newest intact one) and its saved settings."""
    from sdft_fast.checkpoint import TRAINER_STATE_FILE, find_intact_checkpoint, verify_checkpoint
    from sdft_fast.run_dir import stderr_notice

    if args.resume == "latest":
        found = find_intact_checkpoint(args.output_dir, warn=stderr_notice)
        if found is None:
            raise FileNotFoundError(f"--resume: no intact checkpoint in --output-dir {args.output_dir}")
    else:
        found = Path(args.resume)
        if not found.is_dir():
            raise FileNotFoundError(f"--resume {found}: not a checkpoint folder")
        verify_checkpoint(found)
    saved = json.loads((found / TRAINER_STATE_FILE).read_text())["config"]
    return found, saved


def cmd_train(args) -> int:
    from sdft_fast.checkpoint import clean_stale_temporaries
    from sdft_fast.run_dir import RunLock, check_output_dir

    if not args.data:
        raise ValueError("--data is required (a JSONL file of prompt / demonstration rows)")
    given = _given_settings(args)
    check_output_dir(args.output_dir, resume=args.resume is not None, overwrite=args.overwrite_output_dir)
    if args.resume is None:
        return _train(args, TrainConfig(**given), None)
    # Resuming: hold the folder while choosing the checkpoint (a killed save may need cleaning
    # first); under a launcher rank 0 does, the others read the same folder.
    main_rank = os.environ.get("RANK", "0") == "0"
    with RunLock(args.output_dir) if main_rank else contextlib.nullcontext():
        if main_rank:
            clean_stale_temporaries(args.output_dir)
        checkpoint, saved = _resume_checkpoint(args)
        config = TrainConfig.from_dict({**saved, **given})
        return _train(args, config, checkpoint)


def _train(args, config: TrainConfig, checkpoint: Path | None) -> int:
    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.distributed import Launch, Ranks, end_process_group, init_process_group
    from sdft_fast.eval import reply_pattern
    from sdft_fast.run import train
    from sdft_fast.run_dir import SUMMARY_FILE, stderr_notice
    from sdft_fast.trainer import build_model

    # Under torchrun / accelerate launch: join the other ranks (one GPU each) before any work.
    launch = Launch.from_environment()
    _check_device(config.device)
    config.device = init_process_group(launch, config.device, config.dist_timeout_s)
    ranks = Ranks()
    try:
        with ranks.together("loading the data and the model"):
            model_path = _model_and_tokenizer_path(args)
            tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
            _, encoded, report = _load_and_encode(args.data, tokenizer, args, method=config.method)
            if ranks.is_main:
                for line in report.notices():
                    stderr_notice(line)
            eval_examples = None
            if args.eval_data:
                eval_examples, _, _ = _load_and_encode(
                    args.eval_data, tokenizer, args, require_demonstration=False
                )
                for example in eval_examples:
                    reply_pattern(example)  # every row scorable (an answer or a pattern), before training
            model = build_model(model_path, config, trust_remote_code=args.trust_remote_code)
            eval_fn = None
            if eval_examples is not None:
                from sdft_fast.eval import make_eval_fn

                # Built before train() restores a checkpoint: its KL reference is the start model.
                eval_fn = make_eval_fn(
                    model,
                    tokenizer,
                    eval_examples,
                    retention=not args.no_eval_retention,
                    max_new_tokens=args.eval_max_new_tokens,
                )
        with ranks.collectives("training"):  # a rank that dies or hangs ends the others with one line
            result = train(
                model,
                tokenizer,
                encoded,
                config,
                resume_from=checkpoint,
                stop_after=args.stop_after,
                eval_fn=eval_fn,
                overwrite_output_dir=args.overwrite_output_dir,
                allow_harmless_changes=args.allow_harmless_changes,
                ranks=ranks,
            )
    finally:
        end_process_group(launch)
    if not ranks.is_main:
        return 0
    output_dir = Path(result.output_dir)
    summary = {
        "steps": result.steps,
        "total_steps": result.total_steps,
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
        "rows_trained": len(encoded),
        "rows_truncated": len(report.truncated),
        "rows_skipped": len(report.skipped),
        "wall_time_s": round(result.wall_time_s, 2),
        "output_dir": str(output_dir),
        "final_adapter": result.final_adapter,
        "last_checkpoint": result.last_checkpoint,
        "resumed_from": result.resumed_from,
        "stopped_early": result.stopped_early,
    }
    from sdft_fast.run_dir import to_json_line

    tmp = output_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(to_json_line(summary) + "\n")
    os.replace(tmp, output_dir / SUMMARY_FILE)
    print(_train_report(args, summary))
    return 0


def _resume_command(args) -> str:
    """The user's own train command, minus what stopped or reset it, plus --resume."""
    import shlex

    given = list(getattr(args, "argv", None) or ["train", "--data", str(args.data)])
    kept, index = [], 0
    while index < len(given):
        arg = given[index]
        index += 1
        if arg == "--stop-after" or (
            arg == "--resume" and index < len(given) and not given[index].startswith("-")
        ):
            index += 1  # and its value
        elif arg not in ("--resume", "--overwrite-output-dir") and not arg.startswith(
            ("--stop-after=", "--resume=")
        ):
            kept.append(arg)
    return shlex.join([*kept, "--resume"])


def _train_report(args, summary: dict[str, Any]) -> str:
    """What the user reads when train ends: what happened, where the adapter is, what to run next."""
    loss = summary["final_loss"]
    model = f" --model {args.model}" if args.model else ""
    lines = [
        f"trained {summary['steps']} steps in {summary['wall_time_s']:.1f} s"
        + (f", final loss {loss:.4f}" if isinstance(loss, float) else ""),
        f"skipped steps (non-finite loss or gradient): {summary['skipped_steps']}",
        f"rows: {summary['rows_trained']} trained, {summary['rows_truncated']} truncated, "
        f"{summary['rows_skipped']} skipped (--overlong {args.overlong})",
    ]
    if summary["final_adapter"]:
        adapter = summary["final_adapter"]
        lines += [
            f"final adapter: {adapter}",
            f"evaluate it:   sdft-fast eval{model} --adapter {adapter} --data YOUR_QUESTIONS.jsonl",
            f"merge it:      sdft-fast merge{model} --adapter {adapter} --output-dir {summary['output_dir']}/merged",
        ]
    else:
        lines += [
            f"stopped at step {summary['steps']} (--stop-after); checkpoint: {summary['last_checkpoint']}",
            f"continue with: sdft-fast {_resume_command(args)}",
        ]
    lines.append(
        f"metrics: {summary['output_dir']}/metrics.jsonl   summary: {summary['output_dir']}/summary.json"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    from sdft_fast.data import encode_prompt
    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.sampling import pad_token_id, stop_token_ids

    model_path = _model_and_tokenizer_path(args)
    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    prompts = list(args.prompt)
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or prompts on stdin, one per line")
    model = _load_model(model_path, args)
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
    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.eval import (
        evaluate_accuracy,
        format_report,
        kl_from_reference,
        reference_logprobs,
        reply_pattern,
        retention_probes,
    )

    model_path = _model_and_tokenizer_path(args)
    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    examples = None
    if args.data:
        examples, _, _ = _load_and_encode(args.data, tokenizer, args, require_demonstration=False)
        for example in examples:
            reply_pattern(example)  # every row scorable (an answer or a pattern), before any model loads
    adapter = args.adapter
    args.adapter = None
    model = _load_model(model_path, args)  # the start model first: the KL reference
    progress = not args.no_progress
    kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    reference = None
    if adapter and not args.no_kl:
        reference = reference_logprobs(
            model, tokenizer, progress="KL reference (start model)" if progress else None
        )
    if adapter:
        args.adapter = adapter
        model = _load_model(model_path, args)
    report: dict[str, Any] = {"model": str(model_path), "adapter": adapter}
    if examples:
        result = evaluate_accuracy(
            model,
            tokenizer,
            examples,
            progress=f"eval {Path(args.data).name}" if progress else None,
            **kwargs,
        )
        report.update(accuracy=result["accuracy"], n=result["n"], correct=result["correct"])
        report["records"] = result["records"]
    if not args.no_retention:
        retention = evaluate_accuracy(
            model, tokenizer, retention_probes(), progress="retention probes" if progress else None, **kwargs
        )
        report.update(
            retention_accuracy=retention["accuracy"],
            retention_n=retention["n"],
            retention_correct=retention["correct"],
        )
    if reference is not None:
        report["kl_from_start"] = kl_from_reference(model, reference)
    print(format_report(report, data_name=Path(args.data).name if args.data else None))
    if args.output:
        from sdft_fast.run_dir import to_json_line

        Path(args.output).write_text(to_json_line(report) + "\n")
        print(f"wrote {args.output}")
    return 0


# ----------------------------------------------------------------------------- merge


def cmd_merge(args) -> int:
    """Adapter -> a plain Hugging Face folder with the adapter merged into the base weights."""
    import shutil

    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.precision import nonfinite_tensor

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output_dir", str(out), "is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise ConfigError("output_dir", str(out), "is not empty; pass --overwrite-output-dir to replace it")
    model_path = _model_and_tokenizer_path(args)
    tokenizer = load_tokenizer(model_path, trust_remote_code=args.trust_remote_code)
    model = _load_model(model_path, args)
    bad = nonfinite_tensor(model.trainable_state_dict())
    if bad is not None:
        raise ValueError(f"--adapter {args.adapter}: {bad} holds NaN/inf values; not merging it")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.merge_and_save(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {model_path}: {out}")
    print(f"use it:  sdft-fast generate --model {out} --prompt 'Your question'")
    return 0


# ----------------------------------------------------------------------------- continual


def cmd_continual(args) -> int:
    import dataclasses

    import torch

    from sdft_fast.continual import load_state, run_continual, same_plan
    from sdft_fast.continual_plan import load_plan, plan_from_stage_args, probe_sets
    from sdft_fast.continual_report import write_report
    from sdft_fast.data import DataLimits
    from sdft_fast.default_model import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = load_plan(args.plan) if args.plan else plan_from_stage_args(args.stage)
    if args.teacher_template:
        template = _teacher_template(args)
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
    overrides = {
        spec.name: getattr(args, spec.name) for spec in flag_fields() if getattr(args, spec.name) is not None
    }
    overrides.update(dtype=args.dtype, device=args.device, progress=args.progress is not False)
    method = overrides.pop("method", "sdft")
    _check_device(args.device)
    model_path = _model_and_tokenizer_path(args)
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
        tokenizer=load_tokenizer(model_path, trust_remote_code=args.trust_remote_code),
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
