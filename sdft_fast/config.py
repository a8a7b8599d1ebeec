"""What a training run does: :class:`TrainConfig`, and the one list of each kind of choice.

Every setting is defined once, here, with its default and its help text; ``sdft-fast train``
builds its flags from these fields (``--lora-rank`` is ``lora_rank``), so the CLI, a config file and
Python code read the same definitions. This module imports nothing heavy (no torch), so the CLI's
``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("sdft", "sft")  # self-distillation; the supervised baseline
TEACHER_MODES = ("ema", "base", "live")  # EMA of the student; the frozen start model; the student itself
LOSS_IMPLS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Where an SDFT rollout is sampled: the student prompt (on-policy, the paper's), the teacher prompt (the
# same policy shown the demonstration, TRL's generate_from_teacher), or a mix of the two in each step.
ROLLOUT_SOURCES = ("student", "teacher", "mix")
# Whose weights sample the rollouts: the student's (the paper's), or the teacher's (with teacher='base',
# the frozen start model; under the teacher prompt, the teacher's own samples).
ROLLOUT_MODELS = ("student", "teacher")
OPTIMIZERS = ("adamw", "sgd")
# Named groups of decoder linear layers LoRA can wrap (any other value: comma-separated module names).
LORA_TARGET_GROUPS = {
    "all": None,
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
REPORTERS = ("tensorboard", "none")  # where metrics go besides metrics.jsonl


class ConfigError(ValueError):
    """A setting the loop cannot run with. ``field`` names the TrainConfig field; the CLI shows it
    as its flag (``--alpha``), Python callers see ``TrainConfig.alpha=...``."""

    def __init__(self, field_name: str, value: Any, why: str):
        self.field = field_name
        self.value = value
        self.why = why
        super().__init__(f"TrainConfig.{field_name}={value!r}: {why}")

    @property
    def flag(self) -> str:
        return flag_name(self.field)

    def as_flag(self) -> str:
        """The message with the flag the user typed: ``--alpha 2.0: must lie in [0, 1]``."""
        return f"{self.flag} {self.value}: {self.why}"


def flag_name(field_name: str) -> str:
    """The CLI flag of a TrainConfig field: ``lora_rank`` -> ``--lora-rank``."""
    return "--" + field_name.replace("_", "-")


def setting(default: Any, help: str, *, flag: bool = True, choices: tuple | None = None, type: Any = None):
    """A TrainConfig field with its help text; ``flag=False`` keeps it off the generic CLI flags
    (the CLI spells those itself, e.g. ``--no-shuffle``)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "type": type}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that decides what a training run does.

    Defaults follow the paper's recipe where it has one (forward KL, EMA teacher
    at rate 0.01, 3 masked completion tokens, one rollout per prompt at
    temperature 1.0, clip 1.0) and TRL's SDFTTrainer otherwise.
    """

    method: str = setting(
        "sdft", "sdft (self-distillation) or sft (cross-entropy on the demonstration)", choices=METHODS
    )
    # -- loss
    alpha: float = setting(0.0, "0 forward KL(teacher||student), 1 reverse KL, between: generalized JSD")
    loss_temperature: float = setting(1.0, "softmax temperature of both distributions inside the divergence")
    loss_impl: str = setting(
        "auto", "auto (Triton on CUDA, chunked PyTorch elsewhere) | torch | triton", choices=LOSS_IMPLS
    )
    skip_tokens: int = setting(3, "first completion tokens left out of the loss")
    num_iterations: int = setting(1, "optimizer passes over one batch of rollouts")
    # The batch counts sequences: a step takes batch_size * grad_accum / num_generations prompts and
    # samples each num_generations times, the copies of a prompt next to each other in one
    # micro-batch (so batch_size must be a multiple).
    num_generations: int = setting(
        1,
        "rollouts per prompt per step (sdft); the batch counts sequences, so a step takes "
        "batch-size x grad-accum / num-generations prompts",
    )
    importance_cap: float = setting(2.0, "clip of the importance ratio when num-iterations > 1")
    # -- teacher
    teacher: str = setting("ema", "ema | base | live; must match the model's teacher", choices=TEACHER_MODES)
    ema_rate: float = setting(0.01, "EMA teacher rate per optimizer step")
    # -- rollouts
    # On the student's own samples only the first tokens of a multi-token answer it does not know yet
    # get the teacher's signal; the later ones are scored on its own wrong continuation. Sampling the
    # completion under the teacher prompt puts the answer in the rollout (the policy is still the
    # student's weights), at the price of training off-policy.
    rollout_source: str = setting(
        "student",
        "where rollouts are sampled: student (the student prompt: on-policy), teacher (the same policy under "
        "the teacher prompt, TRL's generate_from_teacher), mix (teacher-rollout-fraction of each step's "
        "rollouts from the teacher prompt, the rest from the student's)",
        choices=ROLLOUT_SOURCES,
    )
    teacher_rollout_fraction: float = setting(
        0.5,
        "with rollout-source mix: the expected fraction of each step's rollouts sampled under the teacher prompt",
    )
    rollout_model: str = setting(
        "student",
        "whose weights sample the rollouts: student (the policy being trained) or teacher (the teacher's "
        "weights; with teacher base the frozen start model, so under the teacher prompt the rollouts are the "
        "teacher's own samples and a skill the student lost can still be taught)",
        choices=ROLLOUT_MODELS,
    )
    temperature: float = setting(1.0, "rollout sampling temperature")
    top_p: float = setting(1.0, "rollout nucleus sampling")
    top_k: int = setting(0, "rollout top-k sampling, 0 = off")
    max_new_tokens: int = setting(128, "rollout length limit")
    ignore_eos: bool = setting(
        False, "sample exactly max_new_tokens (benchmarks: equal work per step)", flag=False
    )
    # -- optimisation
    lr: float = setting(1e-4, "peak learning rate")
    warmup_steps: int = setting(0, "linear warmup steps")
    min_lr_ratio: float = setting(0.0, "cosine floor as a fraction of the peak learning rate")
    optimizer: str = setting("adamw", "adamw | sgd (with --momentum)", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", flag=False)
    adam_eps: float = setting(
        1e-8,
        "AdamW epsilon: a weight whose gradient RMS is below it moves by about lr x gradient / eps instead "
        "of lr, so tiny noisy gradients take small steps",
    )
    momentum: float = setting(0.9, "SGD momentum (--optimizer sgd)")
    grad_clip: float = setting(1.0, "max global grad norm, <= 0 off")
    batch_size: int = setting(8, "sequences per micro-batch (one forward/backward)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_steps: int | None = setting(None, "optimizer steps (default: from epochs)", type=int)
    epochs: float = setting(1.0, "passes over the data when max-steps is not given")
    shuffle: bool = setting(True, "shuffle the data order each epoch", flag=False)
    seed: int = setting(0, "seed of data order, LoRA init and rollouts")
    # -- model (read by trainer.build_model; the loop itself takes a built model)
    lora_rank: int = setting(16, "LoRA rank on all decoder linear layers, 0 = full fine-tuning")
    lora_alpha: float | None = setting(None, "LoRA alpha (default 2 x rank)", type=float)
    lora_targets: str = setting(
        "all",
        "decoder linear layers LoRA wraps: all | mlp (gate/up/down) | attention (q/k/v/o) | comma-separated "
        "module names",
    )
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch")
    dtype: str = setting(
        "auto",
        "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16",
        flag=False,
        choices=DTYPES,
    )
    device: str = setting("auto", "auto (cuda if available) | cpu | cuda | cuda:N", flag=False)
    # -- output
    output_dir: str | None = setting(
        None, "checkpoints, metrics.jsonl, final adapter (None: none)", flag=False
    )
    save_every: int = setting(0, "checkpoint every N steps, 0 = only at the end")
    keep_checkpoints: int = setting(
        2, "checkpoints kept (older ones are deleted once a newer one is complete)"
    )
    log_every: int = setting(1, "metrics row every N steps")
    eval_every: int = setting(0, "evaluate on --eval-data every N steps, 0 = only at the end")
    progress: bool = setting(True, "tqdm bar on stderr", flag=False)
    report_to: str = setting(
        "tensorboard",
        "where metrics go besides metrics.jsonl: tensorboard (events under OUTPUT_DIR/tensorboard; "
        "a notice when the package is missing) | none",
        choices=REPORTERS,
    )
    # -- memory
    gradient_checkpointing: bool = setting(
        False,
        "recompute each decoder layer's student activations in the backward instead of keeping them "
        "(less activation memory, about one more student forward of compute)",
    )
    # -- several processes (torchrun / accelerate launch; sdft_fast.distributed)
    dist_timeout_s: float = setting(
        600.0, "seconds a rank waits for the others at a collective before the job ends with an error"
    )

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value the loop cannot run with."""

        def fail(name: str, value: Any, why: str) -> None:
            raise ConfigError(name, value, why)

        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            choices = self.__dataclass_fields__[name].metadata.get("choices")
            if choices and value not in choices:
                fail(name, value, f"must be one of {', '.join(choices)}")
        if not 0.0 <= self.alpha <= 1.0:
            fail("alpha", self.alpha, "must lie in [0, 1]")
        for name in ("temperature", "loss_temperature", "lr", "importance_cap", "epochs", "dist_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                fail(name, value, "must be a finite number > 0")
        if not 0.0 <= self.ema_rate <= 1.0:
            fail("ema_rate", self.ema_rate, "must lie in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "must lie in (0, 1]")
        for name in (
            "batch_size",
            "grad_accum",
            "num_iterations",
            "num_generations",
            "max_new_tokens",
            "log_every",
        ):
            if int(getattr(self, name)) < 1:
                fail(name, getattr(self, name), "must be >= 1")
        for name in ("skip_tokens", "warmup_steps", "save_every", "eval_every", "lora_rank", "top_k"):
            if int(getattr(self, name)) < 0:
                fail(name, getattr(self, name), "must be >= 0")
        if self.num_generations > 1 and self.method != "sdft":
            fail(
                "num_generations",
                self.num_generations,
                f"only method='sdft' samples rollouts (method={self.method!r})",
            )
        if self.rollout_source != "student" and self.method != "sdft":
            fail(
                "rollout_source",
                self.rollout_source,
                f"only method='sdft' samples rollouts (method={self.method!r})",
            )
        if not 0.0 <= self.teacher_rollout_fraction <= 1.0:
            fail("teacher_rollout_fraction", self.teacher_rollout_fraction, "must lie in [0, 1]")
        if self.rollout_source == "mix" and self.teacher_rollout_fraction in (0.0, 1.0):
            fail(
                "teacher_rollout_fraction",
                self.teacher_rollout_fraction,
                "a mix needs a fraction strictly between 0 and 1 (use rollout_source 'student' or 'teacher')",
            )
        if self.batch_size % self.num_generations:
            fail(
                "num_generations",
                self.num_generations,
                f"must divide batch_size={self.batch_size} (a micro-batch holds whole groups of one prompt's rollouts)",
            )
        if self.keep_checkpoints < 1:
            fail("keep_checkpoints", self.keep_checkpoints, "must be >= 1 (the last good checkpoint is kept)")
        if self.max_steps is not None and self.max_steps < 1:
            fail("max_steps", self.max_steps, "must be >= 1 or None")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            fail("lora_alpha", self.lora_alpha, "must be > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", self.lora_dropout, "must lie in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        if self.weight_decay < 0:
            fail("weight_decay", self.weight_decay, "must be >= 0")
        if not self.adam_eps > 0:
            fail("adam_eps", self.adam_eps, "must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            fail("momentum", self.momentum, "must lie in [0, 1)")
        if self.lora_rank > 0:
            try:
                _ = self.lora_target_modules  # raises on a bad value
            except ValueError as error:
                fail("lora_targets", self.lora_targets, str(error))
        if self.rollout_model != "student" and self.method != "sdft":
            fail(
                "rollout_model",
                self.rollout_model,
                f"only method='sdft' samples rollouts (method={self.method!r})",
            )
        for name in (f.name for f in dataclasses.fields(self)):
            # NaN passes every comparison above unnoticed, and inf is no setting either.
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(name, value, "must be a finite number")

    @property
    def sequences_per_step(self) -> int:
        """Sequences trained on per optimizer step (rollouts for sdft, demonstrations for sft)."""
        return self.batch_size * self.grad_accum

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts taken from the data per optimizer step."""
        return self.sequences_per_step // self.num_generations

    @property
    def lora_target_modules(self) -> list[str] | None:
        """``LoraConfig.target_modules`` for ``lora_targets`` (None: every decoder linear layer)."""
        value = str(self.lora_targets).strip()
        if value in LORA_TARGET_GROUPS:
            group = LORA_TARGET_GROUPS[value]
            return None if group is None else list(group)
        names = [name.strip() for name in value.split(",")]
        if not value or not all(names):
            raise ValueError(
                f"expected {', '.join(LORA_TARGET_GROUPS)} or comma-separated module names, got {value!r}"
            )
        return names

    @property
    def resolved_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**values)


# Fields that say how a run is watched and saved, not what it computes: a resumed run may change
# them freely.
RESUME_FREE_FIELDS = (
    "output_dir",
    "device",  # where the same run continues (a launcher gives every rank its own cuda:N)
    "dist_timeout_s",
    "progress",
    "report_to",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "eval_every",
)
# Fields a resumed run may change when the user says so explicitly (``allow_harmless_changes``):
# the run continues from the same state, only its length, place or kernels differ.
RESUME_HARMLESS_FIELDS = ("max_steps", "epochs", "loss_impl", "gradient_checkpointing")


class SettingsChanged(ValueError):
    """A resume whose settings differ from the checkpoint's. ``differences`` maps each field to
    (checkpoint's value, this run's value); ``harmless`` says which of them the user may allow."""

    def __init__(self, checkpoint: str, differences: dict[str, tuple[Any, Any]]):
        self.checkpoint = checkpoint
        self.differences = differences
        self.harmless = [name for name in differences if name in RESUME_HARMLESS_FIELDS]
        listed = ", ".join(
            f"{name}={now!r} (checkpoint: {saved!r})" for name, (saved, now) in differences.items()
        )
        super().__init__(f"{checkpoint}: resume with changed settings: {listed}")

    def as_flags(self) -> str:
        listed = ", ".join(
            f"{flag_name(name)} {now} (checkpoint: {saved})"
            for name, (saved, now) in self.differences.items()
        )
        hint = "drop those flags to continue with the checkpoint's values, or start a new run"
        if self.harmless and len(self.harmless) == len(self.differences):
            hint = "add --allow-harmless-changes to continue with the new values"
        return f"--resume {self.checkpoint}: these settings differ from the checkpoint's: {listed}; {hint}"


def resume_differences(
    saved: dict[str, Any], current: TrainConfig, *, allow_harmless: bool
) -> dict[str, tuple[Any, Any]]:
    """The settings of ``current`` that differ from a checkpoint's ``saved`` config and may not."""
    now = current.to_dict()
    # A field the checkpoint does not know was added since: that run ran with its default.
    defaults = TrainConfig().to_dict()
    # grad_accum may change with the number of ranks (their product is checked by the trainer).
    allowed = {"grad_accum", *RESUME_FREE_FIELDS} | (set(RESUME_HARMLESS_FIELDS) if allow_harmless else set())
    return {
        name: (saved.get(name, defaults[name]), value)
        for name, value in now.items()
        if name not in allowed and saved.get(name, defaults[name]) != value
    }


def read_settings_file(path: str | os.PathLike) -> Any:
    """The contents of a YAML or JSON file (a ``.json`` suffix reads JSON, anything else YAML, of which
    JSON is a subset): ``--config`` files and continual plans. A syntax error is a ``ValueError``
    saying where (line, and column for YAML); the caller names the file."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"invalid JSON at line {error.lineno}: {error.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"invalid YAML ({' '.join(str(error).split())})") from None


def flag_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that ``sdft-fast train`` offers as ``--name-with-dashes`` flags."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]
