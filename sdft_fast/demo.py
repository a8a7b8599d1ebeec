"""The built-in knowledge-injection demo: 40 fictional 2025 facts.

Each line of `assets/demo_facts.jsonl` is one fact:

    {"id": str, "document": str (1-2 sentences),
     "train":    [{"prompt": question, "demonstration": answer grounded in the document}, ...],
     "direct":   [{"prompt": question, "answer": [acceptable short answers]}, ...],
     "indirect": [{"prompt": question, "answer": [...]}, ...]}

Direct questions ask for the fact itself in new words; indirect ones need it applied (the reverse
direction, or a detail reached through another entity), so repeating a memorised sentence is not
enough. All entities are invented, so the untrained model scores about 0 on both.

Each fact has two training prompts; the direct questions are close rephrasings of one of them (the
tests bound how close), the indirect ones are not (docs/history/ has how this data was chosen).

Evaluation rows carry the fact's document as their `demonstration`: evaluated with
`view="teacher"`, they measure what the model can answer with the fact in context, which bounds what
self-distillation can teach it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdft_fast.config import DEMO_DEFAULTS, TrainConfig
from sdft_fast.data import DataError, DataLimits, Example, encode_examples, parse_record
from sdft_fast.default_model import load_tokenizer, resolve_model_path
from sdft_fast.demo_report import log, score_line, write_demo_report
from sdft_fast.eval import evaluate_accuracy, kl_from_reference, reference_logprobs, retention_probes
from sdft_fast.trainer import build_model, train

DEMO_FACTS_PATH = Path(__file__).resolve().parent / "assets" / "demo_facts.jsonl"

# The teacher prompt used on this demo (training and teacher-view evaluation): the fact first and
# one short sentence asked for, which a 135M model reads in context far better than the paper's
# wording (docs/history/2026-11-demo-before-recipe-study.md has the in-context accuracy of each template tried).
DEMO_TEACHER_TEMPLATE = (
    "Fact: {demonstration}\n\nQuestion: {prompt}\nAnswer with one short sentence that uses the fact."
)


@dataclass(frozen=True)
class DemoData:
    train: list[Example]  # prompt + demonstration rows to train on
    direct: list[Example]  # held-out questions with short answers; demonstration = the fact's document
    indirect: list[Example]  # questions that apply the fact; demonstration = the fact's document
    documents: dict[str, str]  # fact id -> document
    teacher_template: str = DEMO_TEACHER_TEMPLATE  # pass to encode_examples / evaluate_accuracy


def load_demo(path: str | os.PathLike | None = None) -> DemoData:
    """Read the demo facts; every row goes through the same validation as user data."""
    path = Path(path) if path is not None else DEMO_FACTS_PATH
    source = str(path)
    train, direct, indirect, documents = [], [], [], {}
    with open(path, encoding="utf-8") as handle:
        lines = list(handle)
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fact = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(source, line_number, None, f"invalid JSON: {error.msg}") from error
        fact_id, document = fact.get("id"), fact.get("document")
        if not isinstance(fact_id, str) or not fact_id:
            raise DataError(source, line_number, "id", "must be a non-empty string")
        if fact_id in documents:
            raise DataError(source, line_number, "id", f"duplicate fact id {fact_id!r}")
        if not isinstance(document, str) or not document.strip():
            raise DataError(source, line_number, "document", "must be a non-empty string")
        documents[fact_id] = document
        for kind, bucket in (("train", train), ("direct", direct), ("indirect", indirect)):
            rows = fact.get(kind)
            if not isinstance(rows, list) or not rows:
                raise DataError(source, line_number, kind, "must be a non-empty list")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(source, line_number, f"{kind}[{index}]", "must be an object")
                record = dict(row, fact=fact_id, kind=kind, index=index)
                if kind != "train":
                    if not row.get("answer"):
                        raise DataError(source, line_number, f"{kind}[{index}].answer", "is missing")
                    record["demonstration"] = document
                try:
                    bucket.append(parse_record(record, source=source, row=line_number))
                except DataError as error:
                    # Re-raise with the nested location, e.g. field "direct[0].prompt".
                    field_name = f"{kind}[{index}]" + (f".{error.field}" if error.field else "")
                    raise DataError(source, line_number, field_name, error.problem) from error
    if not documents:
        raise DataError(source, None, None, "contains no facts")
    return DemoData(train, direct, indirect, documents)


# ----------------------------------------------------------------------------------------------------
# The demo run: SDFT and SFT from the same start, scored before and after
# ----------------------------------------------------------------------------------------------------


def _demo_train_config(method: str, args, output_dir: Path):
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
    if args.threads:
        torch.set_num_threads(args.threads)
    demo_started = time.perf_counter()
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
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
            log(f"evaluating the start model ({model_path.name})")
            reference = reference_logprobs(model, tokenizer)
            results["start"] = _demo_scores(model, tokenizer, demo, reference, args, teacher_view=True)
            log(score_line("start", results["start"]))
        log(
            f"training {method.upper()}: {config.max_steps} steps, batch {config.batch_size} sequences"
            + (f" ({config.num_generations} rollouts per prompt)" if method == "sdft" else "")
            + f", lr {config.lr}"
        )
        _empty_folder(Path(config.output_dir))
        result = train(model, tokenizer, encoded, config)
        scores = _demo_scores(model, tokenizer, demo, reference, args)
        scores["train_s"] = result.wall_time_s
        scores["steps"] = result.steps
        scores["final_loss"] = result.final_loss
        results["methods"][method] = scores
        log(score_line(method, scores) + f", trained in {result.wall_time_s:.0f} s")
    results["wall_s"] = time.perf_counter() - demo_started
    write_demo_report(results, report_dir, model_name=model_path.name)
    return results


def _empty_folder(path: Path) -> None:
    """Start each demo run from an empty folder (metrics.jsonl is appended to otherwise)."""
    if path.exists():
        shutil.rmtree(path)
