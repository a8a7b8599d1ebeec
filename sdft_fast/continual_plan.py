"""A continual-learning plan: its stages, read and checked from a YAML/JSON file or --stage arguments.

Plan file, YAML or JSON (paths relative to the file)::

    name: facts, then a skill
    teacher_template: "{prompt}\\n\\n{demonstration}"   # default for every stage
    settings: {max_steps: 40, lr: 2.0e-3}             # TrainConfig fields: every stage, every method
    sdft: {rollout_source: mix}                       # ... one method only
    sft: {lr: 3.0e-4}
    eval: {max_new_tokens: 24, batch_size: 32, probes: [probes.jsonl]}
    anchors: {path: questions.jsonl, fraction: 0.25, max_new_tokens: 48, rehearse: replay}  # optional
    merge_between_stages: false                                             # optional
    stages:
      - name: facts-a
        train: facts_a/train.jsonl    # prompt + demonstration rows, as for `sdft-fast train`
        eval: facts_a/eval.jsonl      # default: the training rows that carry an answer or pattern
        score: direct                 # the eval `kind` the matrix shows (default: all eval rows)
        repeat: 4                     # each training row 4 times per epoch (default 1)
        settings: {max_steps: 30}
        sdft: {}
        sft: {}

Evaluation rows carry a prompt and what counts as a correct reply: accepted answers and/or a
``pattern`` (:func:`sdft_fast.eval.reply_correct`); an optional ``kind`` groups them (e.g. ``direct``,
``indirect``). Probe files hold general questions the start model answers (default: the built-in
retention probes).

Settings, lowest precedence first: TrainConfig's defaults, the plan's ``settings``, its method
block, the stage's ``settings``, the stage's method block, then the overrides (the command line's
flags). Stage ``i`` (1-based) trains with ``seed + i - 1``. The model is built once, so the fields in
``RUN_FIELDS`` (adapter shape, teacher mode, dtype, device) cannot change between stages.

``merge_between_stages: true`` folds each stage's LoRA adapter into the base weights before the next
stage, so every stage trains a fresh adapter and its frozen ``base`` teacher is the model the stage
starts from (it knows the earlier stages' tasks) rather than the original start model.

``anchors`` (optional) mixes general prompts into every stage's training rows, trained toward the
start model (:class:`Anchors`); a stage's ``anchor_fraction`` overrides the plan's fraction.

Every mistake is a :class:`PlanError` naming the plan file, the stage (number and name) and the field;
errors inside a data file keep its own file, row and field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdft_fast.config import METHODS, TrainConfig, read_settings_file
from sdft_fast.data import (
    DEFAULT_TEACHER_TEMPLATE,
    DataError,
    Example,
    load_examples,
    validate_teacher_template,
)
from sdft_fast.eval import RETENTION_PROBES_PATH, reply_pattern, retention_probes

PLAN_KEYS = (
    "name",
    "teacher_template",
    "settings",
    *METHODS,
    "eval",
    "anchors",
    "merge_between_stages",
    "stages",
)
STAGE_KEYS = (
    "name",
    "train",
    "eval",
    "score",
    "teacher_template",
    "anchor_fraction",
    "repeat",
    "settings",
    *METHODS,
)
EVAL_KEYS = ("max_new_tokens", "batch_size", "probes")
ANCHOR_KEYS = ("path", "fraction", "max_new_tokens", "rehearse")
# The model is built once per run: these settings are the run's, not a stage's.
RUN_FIELDS = (
    "method",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "teacher",
    "dtype",
    "device",
)
RUNNER_FIELDS = ("output_dir",)  # set by the runner (one folder per stage)
DEFAULT_KIND = "eval"  # the kind of an evaluation row that names none
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PlanError(ValueError):
    """A bad plan; the message names the plan file, the stage (number and name) and the field."""

    def __init__(
        self, source: str, problem: str, *, stage: int | None = None, name: str | None = None, key=None
    ):
        where = str(source)
        if stage is not None:
            where += f", stage {stage}" + (f" ({name!r})" if name else "")
        if key is not None:
            where += f", field '{key}'"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class ProbeSet:
    """General questions the start model answers: forgetting shows as a drop in their accuracy."""

    name: str
    rows: list[Example]
    source: str


@dataclass(frozen=True)
class Anchors:
    """General prompts mixed into every stage's training rows, trained toward the start model.

    An anchor row's teacher prompt is its student prompt (no demonstration): with the frozen base
    teacher, SDFT minimises the KL from the start model on the student's own samples there; SFT
    trains on the start model's own greedy answer (``max_new_tokens`` long at most). A stage of n
    training rows (counting its ``repeat``) gets round(n f / (1 - f)) anchors: a fraction f of its rows.

    ``rehearse``: from stage 2 on, the anchors are drawn from the general prompts and the earlier
    stages' training rows together (as trained: a stage's ``repeat`` copies each), so that something
    holds an earlier stage's task while a later one trains; it needs ``merge_between_stages`` (the
    frozen teacher is then the merged model that learned them). ``"replay"``: an earlier row is
    trained as in its own stage — SDFT with its demonstration in the teacher prompt, SFT on its
    demonstration. ``true`` (``"prompts"``): SDFT distils its prompt without the demonstration toward
    the merged teacher (SFT still trains on the demonstration).
    """

    rows: list[Example]  # prompts (any other field is ignored)
    source: str
    fraction: float = 0.25
    max_new_tokens: int = 48
    rehearse: str | None = None  # None, "prompts" or "replay"


@dataclass(frozen=True)
class Stage:
    name: str
    train: list[Example]  # prompt + demonstration rows
    eval: list[Example]  # prompt + answers and/or pattern rows; meta["kind"] groups them
    score: str | None  # the eval kind the matrix shows; None: every eval row
    teacher_template: str
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, every method
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> fields
    anchor_fraction: float | None = None  # None: the plan's anchors.fraction
    repeat: int = 1  # each training row this many times per epoch

    def kinds(self) -> list[str]:
        return sorted({row.meta.get("kind", DEFAULT_KIND) for row in self.eval})

    def score_rows(self) -> list[int]:
        """Indices of the evaluation rows that make this task's entry in the matrix."""
        return [
            i for i, row in enumerate(self.eval) if self.score in (None, row.meta.get("kind", DEFAULT_KIND))
        ]


@dataclass(frozen=True)
class Plan:
    name: str
    stages: list[Stage]
    source: str  # the plan file (or "--stage arguments")
    settings: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_max_new_tokens: int = 24
    eval_batch_size: int = 32
    probes: list[ProbeSet] = field(default_factory=list)
    anchors: Anchors | None = None
    # Fold each stage's adapter into the base weights before the next stage: a fresh adapter per stage,
    # and the frozen 'base' teacher of a stage is the model that stage starts from.
    merge_between_stages: bool = False

    def anchor_count(self, stage: Stage) -> int:
        """How many anchor rows join ``stage``'s training rows."""
        if self.anchors is None:
            return 0
        fraction = self.anchors.fraction if stage.anchor_fraction is None else stage.anchor_fraction
        rows = len(stage.train) * stage.repeat
        return round(rows * fraction / (1.0 - fraction)) if fraction > 0 else 0


# ----------------------------------------------------------------------------------------------------
# Reading a plan
# ----------------------------------------------------------------------------------------------------


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file (``.json``, else YAML); every stage's rows are loaded and checked."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise PlanError(source, "plan file does not exist")
    try:
        data = read_settings_file(path)
    except ValueError as error:
        raise PlanError(source, str(error)) from None
    return plan_from_dict(data, base_dir=path.parent, source=source)


def plan_from_stage_args(specs: Sequence[str], *, base_dir: str | os.PathLike = ".") -> Plan:
    """A plan from ``--stage TRAIN.jsonl[,EVAL.jsonl]`` arguments; stages are named by their files."""
    stages = []
    names: set[str] = set()
    for index, spec in enumerate(specs, start=1):
        parts = [part.strip() for part in spec.split(",")]
        if len(parts) not in (1, 2) or not all(parts):
            raise PlanError(
                "--stage arguments",
                f"expected TRAIN.jsonl or TRAIN.jsonl,EVAL.jsonl, got {spec!r}",
                stage=index,
            )
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(parts[0]).stem) or "stage"
        name = name if name not in names and _STAGE_NAME.match(name) else f"stage{index}-{name}".strip("-")
        names.add(name)
        stage: dict[str, Any] = {"name": name, "train": parts[0]}
        if len(parts) == 2:
            stage["eval"] = parts[1]
        stages.append(stage)
    return plan_from_dict({"stages": stages}, base_dir=Path(base_dir), source="--stage arguments")


def _mapping(value: Any, source: str, what: str, allowed: Sequence[str], **where) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(source, f"must be a mapping, got {type(value).__name__}", key=what, **where)
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise PlanError(source, f"unknown key(s) {unknown}; allowed: {list(allowed)}", key=what, **where)
    return dict(value)


_TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name not in RUNNER_FIELDS)


def _settings(value: Any, source: str, what: str, *, stage_level: bool, **where) -> dict[str, Any]:
    values = _mapping(value, source, what, _TRAIN_FIELDS + RUNNER_FIELDS, **where)
    for name in RUNNER_FIELDS + (RUN_FIELDS if stage_level else ("method",)):
        if name in values:
            why = "is set by the runner" if name in RUNNER_FIELDS else "cannot change between stages"
            if name == "method":
                why = "comes from the run (--method), not the plan"
            raise PlanError(source, f"{name!r} {why}", key=f"{what}.{name}", **where)
    return values


def _read_rows(path_value: Any, base_dir: Path, source: str, key: str, require_demonstration: bool, **where):
    if not isinstance(path_value, str) or not path_value.strip():
        raise PlanError(source, f"must be a file path, got {path_value!r}", key=key, **where)
    path = Path(path_value)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise PlanError(source, f"file {path} does not exist", key=key, **where)
    try:
        return load_examples(path, require_demonstration=require_demonstration)
    except DataError as error:
        raise PlanError(source, str(error), key=key, **where) from error


def probe_sets(value: Any, base_dir: str | os.PathLike, source: str) -> list[ProbeSet]:
    """Probe sets from a list of paths or ``{name, path}`` mappings (None: the built-in probes)."""
    base_dir = Path(base_dir)
    if value is None:
        return [ProbeSet("retention", retention_probes(), str(RETENTION_PROBES_PATH))]
    if not isinstance(value, list) or not value:
        raise PlanError(source, "must be a non-empty list of probe files", key="eval.probes")
    sets, names = [], set()
    for index, item in enumerate(value):
        key = f"eval.probes[{index}]"
        item = {"path": item} if isinstance(item, str) else _mapping(item, source, key, ("name", "path"))
        if not isinstance(item.get("path"), str):
            raise PlanError(source, f"needs a 'path', got {item!r}", key=key)
        path = Path(item["path"]) if Path(item["path"]).is_absolute() else base_dir / item["path"]
        if not path.is_file():
            raise PlanError(source, f"file {path} does not exist", key=key)
        name = str(item.get("name") or path.stem)
        if name in names:
            raise PlanError(source, f"two probe sets are named {name!r}", key=key)
        names.add(name)
        try:
            rows = retention_probes(path)
            for row in rows:
                reply_pattern(row)
        except DataError as error:
            raise PlanError(source, str(error), key=key) from error
        sets.append(ProbeSet(name, rows, str(path)))
    return sets


def _flag(value: Any, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(source, f"must be true or false, got {value!r}", key=key)
    return value


def _rehearse(value: Any, source: str) -> str | None:
    if value is False:
        return None
    if value is True or value == "prompts":
        return "prompts"
    if value == "replay":
        return "replay"
    raise PlanError(
        source, f"must be false, true, 'prompts' or 'replay', got {value!r}", key="anchors.rehearse"
    )


def _fraction(value: Any, source: str, key: str, **where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise PlanError(source, f"must be a number in [0, 1), got {value!r}", key=key, **where)
    return float(value)


def _anchors(value: Any, base_dir: Path, source: str) -> Anchors | None:
    if value is None:
        return None
    block = _mapping(value, source, "anchors", ANCHOR_KEYS)
    if "path" not in block:
        raise PlanError(source, "is missing (a file of general prompts)", key="anchors.path")
    rows = _read_rows(block["path"], base_dir, source, "anchors.path", False)
    length = block.get("max_new_tokens", 48)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise PlanError(source, f"must be an integer >= 1, got {length!r}", key="anchors.max_new_tokens")
    path = Path(block["path"]) if Path(block["path"]).is_absolute() else base_dir / block["path"]
    return Anchors(
        rows=rows,
        source=str(path),
        fraction=_fraction(block.get("fraction", 0.25), source, "anchors.fraction"),
        max_new_tokens=length,
        rehearse=_rehearse(block.get("rehearse", False), source),
    )


def plan_from_dict(data: Any, *, base_dir: str | os.PathLike, source: str) -> Plan:
    """Validate a plan given as a mapping (the parsed file); errors name ``source``, stage and field."""
    base_dir = Path(base_dir)
    top = _mapping(data, source, "plan", PLAN_KEYS) if data is not None else {}
    stages_value = top.get("stages")
    if not isinstance(stages_value, list) or not stages_value:
        raise PlanError(source, "the plan needs a non-empty list of stages", key="stages")
    template = top.get("teacher_template", DEFAULT_TEACHER_TEMPLATE)
    try:
        validate_teacher_template(template)
    except ValueError as error:
        raise PlanError(source, str(error), key="teacher_template") from error
    settings = _settings(top.get("settings"), source, "settings", stage_level=False)
    method_settings = {m: _settings(top.get(m), source, m, stage_level=False) for m in METHODS}
    eval_block = _mapping(top.get("eval"), source, "eval", EVAL_KEYS)
    for key in ("max_new_tokens", "batch_size"):
        value = eval_block.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(source, f"must be an integer >= 1, got {value!r}", key=f"eval.{key}")
    stages: list[Stage] = []
    for number, raw in enumerate(stages_value, start=1):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = {"stage": number, "name": name}
        stage = _mapping(raw, source, "stage", STAGE_KEYS, **where)
        if name is None:
            name = f"stage{number}"
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            raise PlanError(
                source, f"a stage name is letters, digits, '-', '_' or '.', got {name!r}", key="name", **where
            )
        if any(s.name == name for s in stages):
            raise PlanError(source, f"two stages are named {name!r}", key="name", **where)
        if "train" not in stage:
            raise PlanError(source, "is missing (the stage's training rows)", key="train", **where)
        train_rows = _read_rows(stage["train"], base_dir, source, "train", True, **where)
        if "eval" in stage:
            eval_rows = _read_rows(stage["eval"], base_dir, source, "eval", False, **where)
        else:
            eval_rows = [row for row in train_rows if row.answers or "pattern" in row.meta]
            if not eval_rows:
                raise PlanError(
                    source,
                    "no evaluation rows: give the stage an 'eval' file, or its training rows an 'answer' "
                    "or 'pattern' (with --stage: TRAIN.jsonl,EVAL.jsonl)",
                    key="eval",
                    **where,
                )
        try:
            for row in eval_rows:
                reply_pattern(row)
        except DataError as error:
            raise PlanError(source, str(error), key="eval", **where) from error
        score = stage.get("score")
        kinds = {row.meta.get("kind", DEFAULT_KIND) for row in eval_rows}
        if score is not None and score not in kinds:
            raise PlanError(
                source, f"no evaluation row has kind {score!r} (kinds: {sorted(kinds)})", key="score", **where
            )
        anchor_fraction = stage.get("anchor_fraction")
        if anchor_fraction is not None:
            if "anchors" not in top:
                raise PlanError(source, "the plan has no anchors to mix in", key="anchor_fraction", **where)
            anchor_fraction = _fraction(anchor_fraction, source, "anchor_fraction", **where)
        repeat = stage.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise PlanError(source, f"must be an integer >= 1, got {repeat!r}", key="repeat", **where)
        stage_template = stage.get("teacher_template", template)
        try:
            validate_teacher_template(stage_template)
        except ValueError as error:
            raise PlanError(source, str(error), key="teacher_template", **where) from error
        stages.append(
            Stage(
                name=name,
                train=train_rows,
                eval=eval_rows,
                score=score,
                teacher_template=stage_template,
                settings=_settings(stage.get("settings"), source, "settings", stage_level=True, **where),
                method_settings={
                    m: _settings(stage.get(m), source, m, stage_level=True, **where) for m in METHODS
                },
                anchor_fraction=anchor_fraction,
                repeat=repeat,
            )
        )
    anchors = _anchors(top.get("anchors"), base_dir, source)
    merge = _flag(top.get("merge_between_stages", False), source, "merge_between_stages")
    if anchors is not None and anchors.rehearse and not merge:
        raise PlanError(
            source,
            "needs merge_between_stages: true (earlier prompts are distilled toward the model that learned them)",
            key="anchors.rehearse",
        )
    return Plan(
        name=str(
            top.get("name")
            or (Path(source).stem if source.endswith((".yaml", ".yml", ".json")) else "continual")
        ),
        stages=stages,
        source=source,
        settings=settings,
        method_settings=method_settings,
        eval_max_new_tokens=eval_block.get("max_new_tokens", 24),
        eval_batch_size=eval_block.get("batch_size", 32),
        probes=probe_sets(eval_block.get("probes"), base_dir, source),
        anchors=anchors,
        merge_between_stages=merge,
    )


def stage_dir(run_dir: str | os.PathLike, number: int, name: str) -> Path:
    return Path(run_dir) / f"stage-{number}-{name}"


def stage_configs(
    plan: Plan, method: str, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> list[TrainConfig]:
    """Each stage's TrainConfig (see the module docstring for the precedence); a setting that does not
    make a valid config is a PlanError naming the stage."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    overrides = dict(overrides or {})
    configs = []
    for number, stage in enumerate(plan.stages, start=1):
        values: dict[str, Any] = {}
        for layer in (
            plan.settings,
            plan.method_settings.get(method, {}),
            stage.settings,
            stage.method_settings.get(method, {}),
            overrides,
        ):
            values.update(layer)
        values["method"] = method
        values["seed"] = int(values.get("seed", 0)) + number - 1
        values["output_dir"] = str(stage_dir(run_dir, number, stage.name))
        try:
            configs.append(TrainConfig(**values))
        except (TypeError, ValueError) as error:
            raise PlanError(plan.source, str(error), stage=number, name=stage.name) from error
        if plan.merge_between_stages and configs[-1].lora_rank == 0:
            raise PlanError(
                plan.source,
                "full fine-tuning (lora_rank 0) has no adapter to merge between stages",
                key="merge_between_stages",
            )
    return configs
