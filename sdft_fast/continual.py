"""Continual learning: train a plan's stages in order from one start and score every task after each.

The runner builds the model once and scores every stage's evaluation rows, the probe sets and the
drift from the start model before any training (row 0 of the accuracy matrix); then it trains stage 1
and scores everything again, trains stage 2 from where stage 1 ended (the same adapter and, with an
EMA teacher, the same teacher; a fresh optimizer and learning-rate schedule per stage), and so on.
The plan comes from :mod:`sdft_fast.continual_plan`; :mod:`sdft_fast.continual_report` turns the
result into the matrix, the transfer metrics, Markdown, CSV and a plot.

With ``anchors`` in the plan, each stage's training rows are joined by general prompts whose teacher
prompt is the student prompt (no demonstration): SDFT with the frozen base teacher then keeps the
student's distribution on them close to the start model's, and SFT trains on the start model's own
greedy answers to them (taken before any training) — the same rehearsal for both methods.

Resume: stage ``i`` trains in ``stage-<i>-<name>/`` under the run's folder, with checkpoints every
``save_every`` steps, and ``continual_state.json`` records each evaluation as soon as it is done. A
rerun with the same plan and settings continues where the last one stopped: inside a stage from its
newest checkpoint, at a stage boundary from the previous stage's last checkpoint; so a crash loses
at most the steps since the last checkpoint. A different plan in the same folder is refused, naming
what differs, unless ``restart=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdft_fast.config import TrainConfig
from sdft_fast.continual_plan import DEFAULT_KIND, Plan, PlanError, Stage, stage_configs
from sdft_fast.data import DataError, DataLimits, EncodedExample, Example, encode_examples, encode_prompt

STATE_FILE = "continual_state.json"
STATE_VERSION = 1

# ----------------------------------------------------------------------------------------------------
# Scoring after each stage
# ----------------------------------------------------------------------------------------------------

Evaluation = dict[str, Any]  # {"tasks", "probes", "drift", "records"}: see Evaluator.__call__


class Evaluator:
    """Scores a model on every stage's evaluation rows, the probe sets and the drift from the start.

    ``reference`` holds the start model's log-probs (:func:`sdft_fast.eval.reference_logprobs`),
    taken before any training. All rows are decoded greedily in one batched pass.
    """

    def __init__(self, tokenizer, plan: Plan, reference=None):
        self.tokenizer = tokenizer
        self.plan = plan
        self.reference = reference

    def _decode_and_score(self, model, rows: list[Example], **view) -> dict:
        from sdft_fast.eval import evaluate_accuracy

        return evaluate_accuracy(
            model,
            self.tokenizer,
            rows,
            max_new_tokens=self.plan.eval_max_new_tokens,
            batch_size=self.plan.eval_batch_size,
            **view,
        )

    def __call__(self, model, after_stage: int) -> Evaluation:
        from sdft_fast.eval import drift_from_reference

        groups = [(stage.name, stage.eval) for stage in self.plan.stages]
        groups += [(f"probes:{probes.name}", probes.rows) for probes in self.plan.probes]
        records = self._decode_and_score(model, [row for _, group in groups for row in group])["records"]
        evaluation: Evaluation = {"tasks": {}, "probes": {}, "records": {}}
        offset = 0
        for name, group in groups:
            mine = records[offset : offset + len(group)]
            offset += len(group)
            evaluation["records"][name] = mine
            if name.startswith("probes:"):
                evaluation["probes"][name[len("probes:") :]] = _tally(mine)
            else:
                stage = next(s for s in self.plan.stages if s.name == name)
                evaluation["tasks"][name] = task_scores(stage, [r["correct"] for r in mine])
        if self.reference is not None:
            evaluation["drift"] = drift_from_reference(model, self.reference)
        if 1 <= after_stage < len(self.plan.stages):
            # The next task with its demonstration in context, by the model about to train on it: the
            # quality of its teacher-prompt rollouts, and of its teacher where the base is merged.
            upcoming = self.in_context(model, [self.plan.stages[after_stage]])
            if upcoming:
                evaluation["next_in_context"] = next(iter(upcoming.values()))
        return evaluation

    def in_context(self, model, stages: Sequence[Stage] | None = None) -> dict[str, list[int]]:
        """The model's accuracy with each row's demonstration in its prompt (the stage's teacher
        template): what its teacher view can do, the ceiling self-distillation trains toward. Only
        stages whose scored rows all carry a demonstration; every stage by default."""
        out = {}
        for stage in self.plan.stages if stages is None else stages:
            rows = [stage.eval[i] for i in stage.score_rows()]
            if rows and all(row.demonstration for row in rows):
                result = self._decode_and_score(
                    model, rows, view="teacher", teacher_template=stage.teacher_template
                )
                out[stage.name] = [result["correct"], result["n"]]
        return out


def _tally(records: Sequence[dict]) -> list[int]:
    return [sum(bool(r["correct"]) for r in records), len(records)]


def task_scores(stage: Stage, correct: Sequence[bool]) -> dict[str, Any]:
    """One task's entry: ``score`` = [correct, n] over its scored rows, ``kinds`` = per kind."""
    kinds: dict[str, list[int]] = {}
    for row, ok in zip(stage.eval, correct):
        tally = kinds.setdefault(row.meta.get("kind", DEFAULT_KIND), [0, 0])
        tally[0] += bool(ok)
        tally[1] += 1
    scored = [bool(correct[i]) for i in stage.score_rows()]
    return {"score": [sum(scored), len(scored)], "kinds": kinds}


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[continual {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _rows_digest(rows: Sequence[Example]) -> str:
    payload = [[row.prompt, row.demonstration, row.answers, row.meta] for row in rows]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(plan: Plan, configs: Sequence[TrainConfig], method: str, model_name: str) -> dict[str, Any]:
    """What a run's results depend on; a resume must find the same (``_first_difference`` names a change)."""
    volatile = {"output_dir", "progress", "report_to"}
    return {
        "method": method,
        "model": model_name,
        "eval": {"max_new_tokens": plan.eval_max_new_tokens, "batch_size": plan.eval_batch_size},
        "probes": [{"name": p.name, "rows": _rows_digest(p.rows)} for p in plan.probes],
        "stages": [
            {
                "name": stage.name,
                "train": _rows_digest(stage.train),
                "eval": _rows_digest(stage.eval),
                "score": stage.score,
                "teacher_template": stage.teacher_template,
                "config": {k: v for k, v in config.to_dict().items() if k not in volatile},
                "anchors": plan.anchor_count(stage),
                **({"repeat": stage.repeat} if stage.repeat != 1 else {}),  # absent: runs saved before it
            }
            for stage, config in zip(plan.stages, configs)
        ],
        "merge_between_stages": plan.merge_between_stages,
        "anchors": None
        if plan.anchors is None
        else {
            "rows": _rows_digest(plan.anchors.rows),
            "max_new_tokens": plan.anchors.max_new_tokens,
            # absent: runs saved before the option; True: "prompts", the option's first meaning
            **(
                {"rehearse": True if plan.anchors.rehearse == "prompts" else plan.anchors.rehearse}
                if plan.anchors.rehearse
                else {}
            ),
        },
    }


# ----------------------------------------------------------------------------------------------------
# Anchors: general prompts trained toward the start model
# ----------------------------------------------------------------------------------------------------


def rehearsal_pool(plan: Plan, number: int) -> int:
    """How many earlier training rows stage ``number``'s anchors may draw (``anchors.rehearse``)."""
    if plan.anchors is None or not plan.anchors.rehearse:
        return 0
    return sum(len(stage.train) * stage.repeat for stage in plan.stages[: number - 1])


def anchor_choice(plan: Plan, number: int, seed: int) -> list[int]:
    """Which anchor rows stage ``number`` (1-based) mixes in: the first ``anchor_count`` of a permutation
    seeded by the stage's seed (wrapping around when it needs more than there are), so each stage
    rehearses its own draw and a resumed run draws the same. Indices past the general prompts are the
    earlier stages' training rows, in stage order (``anchors.rehearse``)."""
    count = plan.anchor_count(plan.stages[number - 1])
    if count == 0:
        return []
    order = list(range(len(plan.anchors.rows) + rehearsal_pool(plan, number)))
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(count)]


def encode_anchor_prompts(plan: Plan, tokenizer, limits: DataLimits | None) -> list[list[int]]:
    """Token ids of every anchor prompt, checked against the prompt limit (PlanError naming the row)."""
    if plan.anchors is None:
        return []
    limit = (limits or DataLimits()).max_prompt_tokens
    encoded = []
    for row in plan.anchors.rows:
        ids = encode_prompt(tokenizer, row.prompt)
        if len(ids) > limit:
            raise PlanError(
                plan.source,
                f"{row.source}, row {row.row}: prompt has {len(ids)} tokens, more than max_prompt_tokens={limit}",
                key="anchors.path",
            )
        encoded.append(ids)
    return encoded


def start_answers(
    model, tokenizer, prompt_ids: list[list[int]], indices: Sequence[int], max_new_tokens: int
) -> dict[int, list[int]]:
    """The start model's greedy answers to the anchor prompts at ``indices``, each ending with EOS:
    SFT's targets (only the anchors some stage draws are decoded)."""
    from sdft_fast.eval import greedy_completions
    from sdft_fast.sampling import stop_token_ids

    stops = set(stop_token_ids(tokenizer, getattr(model, "hf_model", None)))
    indices = sorted(set(indices))
    completions = greedy_completions(
        model, tokenizer, [prompt_ids[i] for i in indices], max_new_tokens=max_new_tokens
    )
    answers = {}
    for index, completion in zip(indices, completions):
        completion = list(completion)
        while completion and completion[-1] in stops:
            completion.pop()
        answers[index] = completion + [int(tokenizer.eos_token_id)]
    return answers


def anchor_examples(
    plan: Plan,
    chosen: list[int],
    prompt_ids: list[list[int]],
    answers: dict[int, list[int]] | None,
    earlier: Sequence[EncodedExample] = (),
) -> list[EncodedExample]:
    """Encoded anchor rows: the teacher prompt is the student prompt; the SFT target is the start model's
    answer (SDFT never reads it, so without ``answers`` it is left empty). An index past the general
    prompts is a rehearsed row of ``earlier`` (the earlier stages' encoded training rows, as trained):
    for SFT its demonstration; for SDFT, with ``rehearse: replay``, its own teacher prompt (the
    demonstration in context), with ``prompts`` its prompt alone."""
    out = []
    general = len(plan.anchors.rows) if plan.anchors is not None else 0
    for index in chosen:
        if index >= general:
            old = earlier[index - general]
            out.append(
                EncodedExample(
                    student_prompt_ids=list(old.student_prompt_ids),
                    teacher_prompt_ids=list(
                        old.teacher_prompt_ids
                        if plan.anchors.rehearse == "replay"
                        else old.student_prompt_ids
                    ),
                    demonstration_ids=list(old.demonstration_ids),
                    answers=None,
                    row=old.row,
                    source=old.source,
                    meta={"anchor": True, "rehearsal": True},
                )
            )
            continue
        row = plan.anchors.rows[index]
        out.append(
            EncodedExample(
                student_prompt_ids=list(prompt_ids[index]),
                teacher_prompt_ids=list(prompt_ids[index]),
                demonstration_ids=list(answers[index]) if answers is not None else [],
                answers=None,
                row=row.row,
                source=row.source,
                meta={"anchor": True},
            )
        )
    return out


def _first_difference(saved: Any, current: Any, path: str = "") -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current)):
            found = _first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if saved == current else f"{path}: saved {saved!r}, now {current!r}"


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def same_plan(state: dict[str, Any], other: dict[str, Any]) -> bool:
    """True when two runs (e.g. SDFT and SFT) trained and scored the same stages and probes."""

    def data(identity: dict[str, Any]) -> Any:
        stages = [(s["name"], s["train"], s["eval"], s["score"]) for s in identity["stages"]]
        return stages, identity["probes"], identity["eval"], identity["model"], identity.get("anchors")

    return data(state["identity"]) == data(other["identity"])


def load_state(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _score_start(model, evaluate) -> Evaluation:
    """The start model's evaluation (with the tasks' in-context rates when the Evaluator is ours)."""
    evaluation = evaluate(model, 0)
    if isinstance(evaluate, Evaluator):
        evaluation["in_context"] = evaluate.in_context(model)
    return evaluation


def score_start_model(
    plan: Plan,
    *,
    model_path: str | os.PathLike,
    method: str = "sdft",
    overrides: dict[str, Any] | None = None,
    tokenizer=None,
) -> Evaluation:
    """The start model's evaluation as :func:`run_continual` takes it (``start=``): one scoring shared
    by several runs of the same plan and start (the demo's methods, trained side by side)."""
    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.eval import reference_logprobs
    from sdft_fast.trainer import build_model

    configs = stage_configs(plan, method, Path(tempfile.gettempdir()) / "sdft-start", overrides)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
    model = build_model(model_path, configs[0])  # a fresh adapter (B = 0): exactly the start model
    return _score_start(model, Evaluator(tokenizer, plan, reference_logprobs(model, tokenizer)))


def run_continual(
    plan: Plan,
    *,
    model_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    method: str = "sdft",
    overrides: dict[str, Any] | None = None,
    tokenizer=None,
    limits: DataLimits | None = None,
    evaluator_factory: Callable[[Any, Any, Plan], Callable[[Any, int], Evaluation]] | None = None,
    start: dict[str, Any] | None = None,
    restart: bool = False,
    before_stage: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``plan``'s stages in order with ``method`` and score every task after each; resumable.

    evaluator_factory: ``(model, tokenizer, plan) -> evaluate(model, after_stage)``, called once with
      the start model (default: :class:`Evaluator` with the start model's drift reference).
    start: the start model's evaluation from another run of the same plan and start (e.g. the SDFT
      run's, reused by the SFT run), instead of scoring the start model again.
    before_stage: called with the stage's number (1-based) before it trains, in this thread (e.g. to
      take up CPU cores another run has released: torch's thread count is set per thread).
    Returns the run's state (also in ``run_dir/continual_state.json``): ``evaluations``, the start
    model's first and then one per stage (with that stage's training summary under ``train``), and
    the run's ``identity``. The replies behind each evaluation go to ``run_dir/answers/``.
    """
    import torch

    from sdft_fast.checkpoint import find_intact_checkpoint, load_model_state
    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.eval import reference_logprobs
    from sdft_fast.run import train
    from sdft_fast.run_dir import stderr_notice
    from sdft_fast.trainer import build_model

    run_dir = Path(run_dir)
    configs = stage_configs(plan, method, run_dir, overrides)  # bad settings fail before any model work
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
    encoded = []
    for number, (stage, config) in enumerate(zip(plan.stages, configs), start=1):
        try:
            encoded.append(
                encode_examples(
                    stage.train,
                    tokenizer,
                    limits=limits,
                    teacher_template=stage.teacher_template,
                    check_demonstration_length=config.method == "sft",
                )
                * stage.repeat  # each row `repeat` times per epoch, as trained and as rehearsed
            )
        except DataError as error:
            raise PlanError(plan.source, str(error), stage=number, name=stage.name, key="train") from error
    anchor_prompts = encode_anchor_prompts(plan, tokenizer, limits)
    anchors_chosen = [anchor_choice(plan, number, c.seed) for number, c in enumerate(configs, start=1)]
    identity = run_identity(plan, configs, method, Path(model_path).name)

    state = None if restart else load_state(run_dir)
    if state is not None:
        difference = _first_difference(state.get("identity"), identity)
        if state.get("version") != STATE_VERSION or difference:
            raise ValueError(
                f"{run_dir / STATE_FILE} belongs to a different run ({difference or 'older format'}); "
                "use another output folder, or restart to discard it"
            )
    elif run_dir.exists() and restart:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {
            "version": STATE_VERSION,
            "identity": identity,
            "plan": plan.name,
            "method": method,
            "stages": [s.name for s in plan.stages],
            "score_kinds": {s.name: s.score for s in plan.stages},
            "evaluations": [],
        }

    def save_evaluation(evaluation: Evaluation, label: str) -> None:
        records = evaluation.pop("records", None)
        if records is not None:
            (run_dir / "answers").mkdir(exist_ok=True)
            _write_json_atomic(run_dir / "answers" / f"{label}.json", records)
        state["evaluations"].append(evaluation)
        _write_json_atomic(run_dir / STATE_FILE, state)

    model = build_model(model_path, configs[0])  # a fresh adapter (B = 0): exactly the start model
    if evaluator_factory is not None:
        evaluate = evaluator_factory(model, tokenizer, plan)
    else:
        evaluate = Evaluator(tokenizer, plan, reference_logprobs(model, tokenizer))
    answers = None
    if method == "sft" and any(anchors_chosen):
        # SFT's anchor targets: the start model's own answers, taken now (before any stage's weights).
        drawn = [index for chosen in anchors_chosen for index in chosen if index < len(plan.anchors.rows)]
        answers = start_answers(model, tokenizer, anchor_prompts, drawn, plan.anchors.max_new_tokens)
    if not state["evaluations"]:
        if start is not None:
            save_evaluation(json.loads(json.dumps(start)), "start")
        else:
            log(f"{method}: scoring the start model")
            save_evaluation(_score_start(model, evaluate), "start")

    def stage_end(number: int) -> Path:
        """The last checkpoint of stage ``number``: its final step."""
        found = find_intact_checkpoint(Path(configs[number - 1].output_dir), warn=stderr_notice)
        if found is None:
            raise FileNotFoundError(
                f"stage {number} ({plan.stages[number - 1].name}) has no checkpoint in "
                f"{configs[number - 1].output_dir} to continue from"
            )
        return found

    in_memory = 0  # the stage whose final weights the model holds now (0: the start model)
    merged_through = 0  # the stages whose adapters are folded into the base weights
    for number, (stage, config, rows) in enumerate(zip(plan.stages, configs, encoded), start=1):
        if number < len(state["evaluations"]):
            continue  # trained and scored by an earlier call
        if before_stage is not None:
            before_stage(number)
        earlier = [row for done in encoded[: number - 1] for row in done]
        anchors = anchor_examples(plan, anchors_chosen[number - 1], anchor_prompts, answers, earlier)
        rows = rows + anchors
        folder = Path(config.output_dir)
        resume = find_intact_checkpoint(folder, warn=stderr_notice)
        if plan.merge_between_stages:
            # Fold every earlier stage's adapter into the base, in order: from memory where that
            # stage just trained, else from its last checkpoint (a resumed run); same values, same ops.
            for earlier in range(merged_through + 1, number):
                if in_memory != earlier:
                    load_model_state(stage_end(earlier), model=model)
                model.merge_adapter_into_base()
            merged_through, in_memory = number - 1, None
        elif resume is None and number > 1 and in_memory != number - 1:
            load_model_state(stage_end(number - 1), model=model)  # start where the last stage ended
        log(
            f"{method}: stage {number}/{len(plan.stages)} ({stage.name}): {len(rows) - len(anchors)} rows"
            + (f" + {len(anchors)} anchors" if anchors else "")
            + (f", resuming from {resume.name}" if resume is not None else "")
        )
        # The stage's folder belongs to this run: without a checkpoint to resume, a stage killed
        # before its first one starts anew.
        result = train(
            model, tokenizer, rows, config, resume_from=resume, overwrite_output_dir=resume is None
        )
        in_memory = number
        evaluation = evaluate(model, number)
        # train_s: this call's training time (a resumed stage counts the part after the resume).
        evaluation["train"] = {
            "steps": result.steps,
            "train_s": result.wall_time_s,
            "final_loss": result.final_loss,
            "threads": torch.get_num_threads(),
        }
        save_evaluation(evaluation, f"after-{number}-{stage.name}")
        scores = ", ".join(
            f"{name} {t['score'][0]}/{t['score'][1]}" for name, t in evaluation["tasks"].items()
        )
        log(f"{method}: after stage {number} ({stage.name}): {scores}")
    return state
