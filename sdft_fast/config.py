"""What a training run does: :class:`TrainConfig`, and the one list of each kind of choice.

Every setting is defined once, here, with its default and its help text; ``sdft-fast train``
builds its flags from these fields (``--lora-rank`` is ``lora_rank``), so the CLI, a config file and
Python code read the same definitions. This module imports nothing heavy (no torch), so the CLI's
``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("sdft", "sft")  # self-distillation; the supervised baseline
TEACHER_MODES = ("ema", "base", "live")  # EMA of the student; the frozen start model; the student itself
LOSS_IMPLS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Where an SDFT rollout is sampled: the student prompt (on-policy, the paper's), the teacher prompt (the
# same policy shown the demonstration, TRL's generate_from_teacher), or a mix of the two in each step.
ROLLOUT_SOURCES = ("student", "teacher", "mix")


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
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", flag=False)
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
    eval_every: int = setting(0, "evaluate every N steps, 0 = only at the end", flag=False)
    progress: bool = setting(True, "tqdm bar on stderr", flag=False)
    tensorboard: bool = setting(True, "TensorBoard events when tensorboard is importable", flag=False)
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
            raise ValueError(f"TrainConfig.{name}={value!r}: {why}")

        for name in (f.name for f in dataclasses.fields(self)):
            choices = self.__dataclass_fields__[name].metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                fail(name, getattr(self, name), f"must be one of {choices}")
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
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        if self.weight_decay < 0:
            fail("weight_decay", self.weight_decay, "must be >= 0")

    @property
    def sequences_per_step(self) -> int:
        """Sequences trained on per optimizer step (rollouts for sdft, demonstrations for sft)."""
        return self.batch_size * self.grad_accum

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts taken from the data per optimizer step."""
        return self.sequences_per_step // self.num_generations

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


def flag_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that ``sdft-fast train`` offers as ``--name-with-dashes`` flags."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]
