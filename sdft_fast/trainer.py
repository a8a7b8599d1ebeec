"""The SDFT training loop: rollout -> score -> distill -> step -> EMA.

One optimizer step of ``method="sdft"`` reads top to bottom:

1. take the next ``batch_size * grad_accum / num_generations`` prompts of the shuffled data;
2. sample ``num_generations`` completions per prompt from the student (temperature 1.0), so a step
   always trains on ``batch_size * grad_accum`` sequences (the batch counts sequences, as in TRL);
3. score every completion token twice in one shared-weight pass
   (``model.forward_pair``): the student sees the prompt, the teacher sees the
   prompt plus the demonstration;
4. minimise the per-token divergence (``self_distill_loss``, forward KL by
   default) over the full vocabulary, the first ``skip_tokens`` completion
   tokens masked out, averaged per sequence then over sequences;
5. clip the gradient norm, AdamW step, cosine schedule with warmup;
6. move the EMA teacher towards the student.

With ``num_iterations > 1`` the same rollouts serve several optimizer steps;
from the second pass on the student has moved away from the policy that
sampled them, so each token loss is weighted by the clipped importance ratio
``min(exp(logp_now - logp_rollout), importance_cap)`` (detached).

``method="sft"`` is the baseline users compare with: the same data, loop,
optimizer and schedule, but cross-entropy on the demonstration given the
student prompt.

Checkpoints hold everything needed to continue bit-for-bit: trainable weights,
EMA teacher, optimizer, scheduler, RNG states, step and data position (and a
pending rollout buffer when stopped between the passes of ``num_iterations``).
They are written to a temporary folder and renamed, so a crash mid-save leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdft_fast.data import EncodedExample
from sdft_fast.loss import linear_cross_entropy, self_distill_loss, token_logprobs
from sdft_fast.model import PairBatch, SelfDistillModel

METHODS = ("sdft", "sft")
TEACHERS = ("ema", "base", "live")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that decides what a training run does.

    Defaults follow the paper's recipe where it has one (forward KL, EMA teacher
    at rate 0.01, 3 masked completion tokens, one rollout per prompt at
    temperature 1.0, clip 1.0) and TRL's SDFTTrainer otherwise.
    """

    method: str = "sdft"  # "sdft" (self-distillation) or "sft" (cross-entropy on the demonstration)
    # -- loss
    alpha: float = 0.0  # 0 forward KL(T||S), 1 reverse KL(S||T), between: generalized JSD
    loss_temperature: float = 1.0  # softmax temperature of both distributions inside the divergence
    loss_impl: str = "auto"  # "auto" (triton on CUDA, chunked torch elsewhere) | "torch" | "triton"
    skip_tokens: int = 3  # the first completion tokens carry little signal about the demonstration
    num_iterations: int = 1  # optimizer passes over one batch of rollouts
    # Rollouts per prompt and step (sdft only). The batch counts sequences: a step takes
    # batch_size * grad_accum / num_generations prompts and samples each num_generations times, the
    # copies of a prompt next to each other in one micro-batch (so batch_size must be a multiple).
    num_generations: int = 1
    importance_cap: float = 2.0  # clip of the importance ratio when num_iterations > 1
    # -- teacher
    teacher: str = "ema"  # "ema" | "base" | "live"; must match the model's teacher
    ema_rate: float = 0.01
    # -- rollouts
    temperature: float = 1.0  # sampling temperature of the student's rollouts
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    ignore_eos: bool = False  # sample exactly max_new_tokens (benchmarks: equal work per step)
    # -- optimisation
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    batch_size: int = 8  # prompts per micro-batch (one forward/backward)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; None: derived from epochs
    epochs: float = 1.0
    shuffle: bool = True
    seed: int = 0
    # -- model (used by build_model; the loop itself takes a built model)
    lora_rank: int = 16  # 0 = full fine-tuning
    lora_alpha: float | None = None  # None: 2 * rank
    lora_dropout: float = 0.0
    dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA) | "float32" | "bfloat16" | "float16"
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    # -- output
    output_dir: str | None = None  # None: no checkpoints, no metrics file
    save_every: int = 0  # 0: save only at the end
    keep_checkpoints: int = 2  # older checkpoints are deleted once a newer one is complete
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    progress: bool = True  # tqdm bar on stderr
    tensorboard: bool = True  # write TensorBoard events when tensorboard is importable

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value the loop cannot run with."""

        def fail(name: str, value: Any, why: str) -> None:
            raise ValueError(f"TrainConfig.{name}={value!r}: {why}")

        if self.method not in METHODS:
            fail("method", self.method, f"must be one of {METHODS}")
        if self.teacher not in TEACHERS:
            fail("teacher", self.teacher, f"must be one of {TEACHERS}")
        if not 0.0 <= self.alpha <= 1.0:
            fail("alpha", self.alpha, "must lie in [0, 1]")
        for name in ("temperature", "loss_temperature", "lr", "importance_cap", "epochs"):
            if not getattr(self, name) > 0:
                fail(name, getattr(self, name), "must be > 0")
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
        if self.loss_impl not in ("auto", "torch", "triton"):
            fail("loss_impl", self.loss_impl, "must be auto, torch or triton")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            fail("dtype", self.dtype, "must be auto, float32, bfloat16 or float16")

    @property
    def sequences_per_step(self) -> int:
        """Sequences trained on per optimizer step (rollouts for sdft, demonstrations for sft)."""
        return self.batch_size * self.grad_accum

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts taken from the data per optimizer step."""
        return self.sequences_per_step // self.num_generations

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


@dataclass
class TrainResult:
    """What a run did: steps taken, per-step metrics, where its outputs are."""

    steps: int  # optimizer steps completed in total (including those before a resume)
    final_loss: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the rows written to metrics.jsonl
    wall_time_s: float = 0.0  # time spent in this call
    completion_tokens: int = 0  # completion tokens trained on in this call
    output_dir: str | None = None
    last_checkpoint: str | None = None
    stopped_early: bool = False  # stop_after ended the run before max_steps


# ----------------------------------------------------------------------------- model helpers


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on the CPU (bf16 matmuls are slow there and fp32 keeps runs reproducible), bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(model_path: str | os.PathLike, config: TrainConfig) -> SelfDistillModel:
    """Load a local HF causal-LM folder as a SelfDistillModel the way ``config`` asks (LoRA or full FT)."""
    from sdft_fast.lora import LoraConfig

    device = resolve_device(config.device)
    lora = None
    if config.lora_rank > 0:
        lora_alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_rank
        lora = LoraConfig(r=config.lora_rank, alpha=lora_alpha, dropout=config.lora_dropout)
    # PEFT-style adapters start with B = 0 but A random: seed so two runs start identically.
    torch.manual_seed(config.seed)
    return SelfDistillModel.from_pretrained(
        model_path,
        lora=lora,
        teacher=config.teacher,
        dtype=resolve_dtype(config.dtype, device),
        device=str(device),
    )


def eos_token_ids(model: SelfDistillModel, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation-config EOS ids
    (chat models often end a turn with a token that is not the tokenizer's EOS)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    generation_config = getattr(model.hf_model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for token_id in extra or []:
        if int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def is_lora(model: SelfDistillModel) -> bool:
    """True when only an adapter trains (fewer trainable elements than the base network has)."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    base = sum(p.numel() for p in model.hf_model.parameters())
    return trainable < base


def pad_token_id(tokenizer, eos_ids: Sequence[int]) -> int | None:
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return int(eos_ids[0]) if eos_ids else None


# ----------------------------------------------------------------------------- schedule


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup from 1/(warmup+1), then a
    half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: SelfDistillModel, config: TrainConfig, total_steps: int):
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model.trainable_parameters() is empty: nothing to train")
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay, eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(
            step, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
        ),
    )
    return optimizer, scheduler


# ----------------------------------------------------------------------------- data order


class DataCursor:
    """Deterministic shuffled order over the examples, resumable from (epoch, position).

    Each epoch's permutation comes from its own generator seeded with
    ``seed + epoch``, so the order never depends on how many random numbers
    the rest of the run consumed, and a resume needs only two integers.
    """

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool, epoch: int = 0, position: int = 0):
        if num_examples < 1:
            raise ValueError("no training examples")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = epoch
        self.position = position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed + 7919 * epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        """The next ``count`` example indices, crossing epoch boundaries as needed."""
        out: list[int] = []
        while len(out) < count:
            if self.position >= self.num_examples:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.num_examples - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}


def validate_examples(examples: Sequence[EncodedExample], config: TrainConfig) -> None:
    """Fail before any model work when an example cannot be trained on, naming its source and row."""
    if len(examples) == 0:
        raise ValueError("no training examples were given")
    for index, example in enumerate(examples):
        where = f"{getattr(example, 'source', '?')} row {getattr(example, 'row', index)}"
        if not example.student_prompt_ids:
            raise ValueError(f"{where}: field 'prompt' encodes to no tokens")
        if config.method == "sdft" and not example.teacher_prompt_ids:
            raise ValueError(f"{where}: teacher prompt encodes to no tokens")
        if config.method == "sft" and not example.demonstration_ids:
            raise ValueError(f"{where}: field 'demonstration' encodes to no tokens (needed by method 'sft')")


def planned_steps(num_examples: int, config: TrainConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / config.prompts_per_step))


# ----------------------------------------------------------------------------- checkpoints


def _flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, param_state in state_dict["state"].items():
        entry: dict[str, Any] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{param_id}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": name}
            else:
                entry[key] = {"value": value}
        structure["state"][str(param_id)] = entry
    return tensors, structure


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for param_id, entry in structure["state"].items():
        state[int(param_id)] = {
            key: tensors[item["tensor"]] if "tensor" in item else item["value"] for key, item in entry.items()
        }
    return {"state": state, "param_groups": structure["param_groups"]}


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if callable(value):  # LambdaLR keeps the lambdas; they are rebuilt from the config on resume
        return None
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, default=_json_default))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as (step, path), oldest first.

    A checkpoint is complete when its trainer_state.json exists: that file is
    written last, inside the temporary folder, before the rename.
    """
    root = Path(output_dir)
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if not child.name.startswith(CHECKPOINT_PREFIX) or not child.is_dir():
            continue
        suffix = child.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (child / TRAINER_STATE_FILE).is_file():
            found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoint_steps(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: SelfDistillModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: TrainConfig,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write everything needed to continue exactly, atomically (temp folder + rename).

    Layout of ``checkpoint-<step>/``:
      trainable.safetensors   the trainable parameters (LoRA factors or all weights), exact
      adapter/                PEFT-format adapter (LoRA runs only; the user-facing export)
      teacher.safetensors     the EMA teacher's state (empty for base/live teachers)
      optimizer.safetensors   AdamW moments, flattened; optimizer.json holds their structure
      scheduler.json          LR scheduler state
      rng.safetensors         torch CPU (and CUDA) generator states; rng.json the python state
      trainer_state.json      step, data position, config, pending rollouts; written last
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = int(trainer_state["step"])
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        trainable = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if is_lora(model):  # full fine-tuning: trainable.safetensors already is the weights
            model.save_adapter(tmp / "adapter")
        teacher = {k: v.detach().cpu().contiguous() for k, v in (model.teacher_state_dict() or {}).items()}
        save_file(teacher, str(tmp / "teacher.safetensors"))
        optimizer_tensors, optimizer_structure = _flatten_optimizer_state(optimizer)
        save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", optimizer_structure)
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        rng_tensors = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                rng_tensors[f"torch_cuda_{index}"] = cuda_state
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        _write_json(tmp / "rng.json", {"python": random.getstate()})
        # Written last: its presence marks the folder complete (see checkpoint_steps).
        _write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside, never delete it first
            trash = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: SelfDistillModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> dict[str, Any]:
    """Restore model, teacher, optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(path)
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE_FILE})")
    trainer_state = json.loads(state_file.read_text())
    if trainer_state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{state_file}: checkpoint format {trainer_state.get('format_version')} is not "
            f"{CHECKPOINT_FORMAT_VERSION}, the one this version writes"
        )
    device = model.device
    trainable = load_file(str(path / "trainable.safetensors"), device=str(device))
    model.load_trainable_state_dict(trainable)
    teacher = load_file(str(path / "teacher.safetensors"), device=str(device))
    if teacher:
        model.load_teacher_state_dict(teacher)
    optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_structure = json.loads((path / "optimizer.json").read_text())
    # load_state_dict moves the moments to each parameter's device and dtype.
    optimizer.load_state_dict(_unflatten_optimizer_state(optimizer_tensors, optimizer_structure))
    scheduler_state = json.loads((path / "scheduler.json").read_text())
    # The lambdas themselves are rebuilt from the config; their JSON entries are None (see _json_default).
    scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas") or [None])
    scheduler.load_state_dict(scheduler_state)
    rng_tensors = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng_tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng_tensors[k] for k in sorted(rng_tensors) if k.startswith("torch_cuda_")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    python_state = json.loads((path / "rng.json").read_text())["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    return trainer_state


# ----------------------------------------------------------------------------- one step


@dataclass
class _Rollouts:
    """One step's worth of sampled completions, kept across the passes of num_iterations."""

    example_indices: list[int]  # into the encoded examples, in micro-batch order
    completions: list[list[int]]  # token ids per prompt (EOS included when produced)
    rollout_logprobs: list[list[float]] | None  # per completion token, under the sampling policy
    passes_done: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any] | None) -> _Rollouts | None:
        return None if payload is None else cls(**payload)


def _micro_batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def _rollout_seed(seed: int, step: int, micro: int) -> int:
    """Sampling seed for one micro-batch: a function of (seed, step, micro-batch) alone, so the same
    step samples the same completions whether or not the run was resumed in between."""
    return (seed * 1_000_003 + step * 7919 + micro) % (2**63 - 1)


class Trainer:
    """Holds the pieces of one run; ``train()`` below is the public entry point."""

    def __init__(
        self,
        model: SelfDistillModel,
        tokenizer,
        examples: Sequence[EncodedExample],
        config: TrainConfig,
    ):
        config.validate()
        validate_examples(examples, config)
        model_teacher = getattr(model, "teacher_mode", config.teacher)
        if config.method == "sdft" and model_teacher != config.teacher:
            raise ValueError(
                f"TrainConfig.teacher={config.teacher!r} but the model was built with teacher={model_teacher!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.config = config
        self.total_steps = planned_steps(len(self.examples), config)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self.optimizer, self.scheduler = make_optimizer(model, config, self.total_steps)
        self.cursor = DataCursor(len(self.examples), seed=config.seed, shuffle=config.shuffle)
        self.step = 0
        self.pending: _Rollouts | None = None
        self.completion_tokens_total = 0

    # -- rollouts -------------------------------------------------------------

    def _sample(self, indices: list[int]) -> _Rollouts:
        """Sample one completion per entry of ``indices`` (a prompt repeated num_generations times gets
        that many independent draws), micro-batch by micro-batch."""
        config = self.config
        completions: list[list[int]] = []
        for micro, chunk in enumerate(_micro_batches(indices, config.batch_size)):
            prompts = [self.examples[i].student_prompt_ids for i in chunk]
            completions.extend(
                self.model.generate(
                    prompts,
                    max_new_tokens=config.max_new_tokens,
                    do_sample=True,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    eos_token_id=None if config.ignore_eos else (self.eos_ids or None),
                    pad_token_id=self.pad_id,
                    seed=_rollout_seed(config.seed, self.step, micro),
                )
            )
        rollout_logprobs = None
        if config.num_iterations > 1:
            # The policy that sampled the rollouts, for the importance ratios of later passes.
            rollout_logprobs = []
            with torch.no_grad():
                for chunk_indices, chunk_completions in zip(
                    _micro_batches(indices, config.batch_size), _micro_batches(completions, config.batch_size)
                ):
                    prompts = [self.examples[i].student_prompt_ids for i in chunk_indices]
                    nonempty = [j for j, c in enumerate(chunk_completions) if c]
                    per_sequence: list[list[float]] = [[] for _ in chunk_completions]
                    if nonempty:
                        out = self.model.forward_student(
                            [prompts[j] for j in nonempty], [list(chunk_completions[j]) for j in nonempty]
                        )
                        logp = token_logprobs(
                            out.student_hidden,
                            self.model.lm_head_weight,
                            self.model.lm_head_bias,
                            out.targets,
                            temperature=config.temperature,
                        )  # [N]
                        for row, values in enumerate(
                            _split_by_sequence(logp.float().cpu(), out.sequence_ids.cpu(), len(nonempty))
                        ):
                            per_sequence[nonempty[row]] = values.tolist()
                    rollout_logprobs.extend(per_sequence)
        return _Rollouts(example_indices=indices, completions=completions, rollout_logprobs=rollout_logprobs)

    # -- losses ---------------------------------------------------------------

    def _sdft_micro_loss(self, indices, completions, rollout_logprobs) -> tuple[torch.Tensor, dict] | None:
        """Self-distillation loss of one micro-batch (sequence mean), or None when no token counts."""
        config = self.config
        keep = [j for j, c in enumerate(completions) if len(c) > config.skip_tokens]
        if not keep:
            return None
        batch = PairBatch(
            student_prompts=[self.examples[indices[j]].student_prompt_ids for j in keep],
            teacher_prompts=[self.examples[indices[j]].teacher_prompt_ids for j in keep],
            completions=[list(completions[j]) for j in keep],
        )
        out = self.model.forward_pair(batch)
        loss_mask = out.completion_positions >= config.skip_tokens  # [N]
        token_weights = None
        mean_ratio = None
        if rollout_logprobs is not None and self.pending is not None and self.pending.passes_done > 0:
            with torch.no_grad():
                logp_now = token_logprobs(
                    out.student_hidden.detach(),
                    self.model.lm_head_weight,
                    self.model.lm_head_bias,
                    out.targets,
                    temperature=config.temperature,
                )  # [N]
                logp_rollout = torch.tensor(
                    [v for j in keep for v in rollout_logprobs[j]],
                    dtype=torch.float32,
                    device=logp_now.device,
                )  # [N]
                if logp_rollout.shape != logp_now.shape:
                    raise RuntimeError(
                        f"rollout log-probs cover {logp_rollout.numel()} tokens, the batch has {logp_now.numel()}"
                    )
                token_weights = torch.exp(logp_now.float() - logp_rollout).clamp(max=config.importance_cap)
                mean_ratio = float(token_weights[loss_mask].mean()) if bool(loss_mask.any()) else None
        loss = self_distill_loss(
            out.student_hidden,
            out.teacher_hidden,
            self.model.lm_head_weight,
            self.model.lm_head_bias,
            alpha=config.alpha,
            temperature=config.loss_temperature,
            loss_mask=loss_mask,
            token_weights=token_weights,
            sequence_ids=out.sequence_ids,
            reduction="sequence_mean",
            impl=config.loss_impl,
        )
        if token_weights is None:
            divergence = float(loss.detach())
        else:  # the unweighted divergence, for the metrics only
            with torch.no_grad():
                divergence = float(
                    self_distill_loss(
                        out.student_hidden.detach(),
                        out.teacher_hidden,
                        self.model.lm_head_weight.detach(),
                        None if self.model.lm_head_bias is None else self.model.lm_head_bias.detach(),
                        alpha=config.alpha,
                        temperature=config.loss_temperature,
                        loss_mask=loss_mask,
                        sequence_ids=out.sequence_ids,
                        reduction="sequence_mean",
                        impl=config.loss_impl,
                    )
                )
        stats = {"sequences": len(keep), "tokens": int(loss_mask.sum()), "divergence": divergence}
        if mean_ratio is not None:
            stats["importance_ratio"] = mean_ratio
        return loss, stats

    def _sft_micro_loss(self, indices) -> tuple[torch.Tensor, dict]:
        prompts = [self.examples[i].student_prompt_ids for i in indices]
        targets = [list(self.examples[i].demonstration_ids) for i in indices]
        out = self.model.forward_student(prompts, targets)
        loss = linear_cross_entropy(
            out.student_hidden,
            self.model.lm_head_weight,
            self.model.lm_head_bias,
            out.targets,
            sequence_ids=out.sequence_ids,
            reduction="sequence_mean",
        )
        return loss, {"sequences": len(indices), "tokens": int(out.targets.numel())}

    # -- the step -------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (sampling new rollouts first unless a pass over old ones is pending)."""
        config = self.config
        started = time.perf_counter()
        sample_s = 0.0
        if config.method == "sdft":
            if self.pending is None:
                prompts = self.cursor.take(config.prompts_per_step)
                # Each prompt num_generations times in a row: its rollouts share a micro-batch.
                indices = [i for i in prompts for _ in range(config.num_generations)]
                sample_started = time.perf_counter()
                self.pending = self._sample(indices)
                sample_s = time.perf_counter() - sample_started
            rollouts = self.pending
            indices = rollouts.example_indices
            completions = rollouts.completions
            lengths = [len(c) for c in completions]
            counted = sum(1 for n in lengths if n > config.skip_tokens)
        else:
            indices = self.cursor.take(config.prompts_per_step)
            completions = None
            lengths = [len(self.examples[i].demonstration_ids) for i in indices]
            counted = len(indices)

        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        divergence_sum = 0.0
        ratio_sum, ratio_count = 0.0, 0
        tokens = 0
        for micro, chunk in enumerate(_micro_batches(indices, config.batch_size)):
            lo = micro * config.batch_size
            if config.method == "sdft":
                chunk_logprobs = (
                    None
                    if rollouts.rollout_logprobs is None
                    else rollouts.rollout_logprobs[lo : lo + len(chunk)]
                )
                result = self._sdft_micro_loss(chunk, completions[lo : lo + len(chunk)], chunk_logprobs)
            else:
                result = self._sft_micro_loss(chunk)
            if result is None:
                continue
            loss, stats = result
            # Each micro-batch's loss is a mean over its own sequences; weighting it by its share of the
            # step's sequences makes the accumulated gradient the mean over all of them.
            share = stats["sequences"] / max(1, counted)
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            divergence_sum += stats.get("divergence", float(loss.detach())) * share
            if "importance_ratio" in stats:
                ratio_sum += stats["importance_ratio"]
                ratio_count += 1
            tokens += stats["tokens"]

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if config.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        else:
            grad_norm = float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [p.grad.detach().float().norm() for p in params if p.grad is not None]
                        or [torch.zeros(())]
                    )
                )
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if config.method == "sdft" and config.teacher == "ema":
            self.model.ema_update(config.ema_rate)

        self.step += 1
        if config.method == "sdft":
            self.pending.passes_done += 1
            if self.pending.passes_done >= config.num_iterations:
                self.pending = None

        elapsed = time.perf_counter() - started
        self.completion_tokens_total += sum(lengths)
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": self.cursor.epoch + self.cursor.position / self.cursor.num_examples,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "completion_len_mean": sum(lengths) / max(1, len(lengths)),
            "completion_len_max": max(lengths) if lengths else 0,
            "completion_tokens": sum(lengths),
            "loss_tokens": tokens,
            "tokens_per_s": sum(lengths) / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed,
            "peak_memory_mb": _peak_memory_mb(self.model.device),
        }
        if config.method == "sdft":
            row["divergence"] = divergence_sum
            row["sample_s"] = sample_s
            row["sequences_counted"] = counted
            if ratio_count:
                row["importance_ratio"] = ratio_sum / ratio_count
        return row

    # -- state ----------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "data": self.cursor.state(),
            "num_examples": len(self.examples),
            "completion_tokens_total": self.completion_tokens_total,
            "pending_rollouts": None if self.pending is None else self.pending.to_json(),
            "config": self.config.to_dict(),
        }

    def restore(self, checkpoint: str | os.PathLike) -> None:
        state = load_checkpoint(
            checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if state["num_examples"] != len(self.examples):
            raise ValueError(
                f"{checkpoint}: saved with {state['num_examples']} examples, this run has {len(self.examples)}; "
                "resume needs the same data"
            )
        saved = state["config"]
        for name in (
            "method",
            "batch_size",
            "grad_accum",
            "seed",
            "shuffle",
            "num_iterations",
            "num_generations",
            "teacher",
        ):
            # Checkpoints from before num_generations existed sampled one rollout per prompt.
            saved_value = saved.get(name, 1 if name == "num_generations" else None)
            if saved_value != getattr(self.config, name):
                raise ValueError(
                    f"{checkpoint}: saved with {name}={saved_value!r}, this run has "
                    f"{name}={getattr(self.config, name)!r}; resume would not continue the same run"
                )
        self.step = int(state["step"])
        self.cursor = DataCursor(
            len(self.examples),
            seed=self.config.seed,
            shuffle=self.config.shuffle,
            epoch=int(state["data"]["epoch"]),
            position=int(state["data"]["position"]),
        )
        self.pending = _Rollouts.from_json(state.get("pending_rollouts"))
        self.completion_tokens_total = int(state.get("completion_tokens_total", 0))


def _split_by_sequence(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int):
    """Rows of a packed [N] tensor grouped by sequence id (rows of one sequence are contiguous)."""
    counts = torch.bincount(sequence_ids, minlength=num_sequences).tolist()
    return torch.split(values, counts)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    except (ImportError, OSError):
        return float("nan")


def _tensorboard_writer(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: not installed -> no events
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def train(
    model: SelfDistillModel,
    tokenizer,
    encoded_examples: Sequence[EncodedExample],
    config: TrainConfig,
    *,
    resume_from: str | os.PathLike | None = None,
    stop_after: int | None = None,
    eval_fn: Callable[[SelfDistillModel, int], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train ``model`` on ``encoded_examples`` as ``config`` says.

    resume_from: a checkpoint folder, or ``"latest"`` for the newest complete one under
        ``config.output_dir``; continues exactly where that run stopped.
    stop_after: stop once the step counter reaches this value (a time budget, or the first half
        of a resume test) without changing the schedule, which stays planned for max_steps.
    eval_fn: called as ``eval_fn(model, step)`` every ``eval_every`` steps and at the end; the
        returned numbers are written to metrics.jsonl with ``"eval": true``.
    """
    trainer = Trainer(model, tokenizer, encoded_examples, config)
    output_dir = Path(config.output_dir) if config.output_dir else None
    if resume_from is not None:
        if str(resume_from) == "latest":
            if output_dir is None:
                raise ValueError("resume_from='latest' needs config.output_dir")
            found = latest_checkpoint(output_dir)
            if found is None:
                raise FileNotFoundError(f"no complete checkpoint under {output_dir} to resume from")
            resume_from = found
        trainer.restore(resume_from)
    else:
        # Same seed -> same run: the torch/python generators start from the config's seed.
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    end_step = trainer.total_steps if stop_after is None else min(trainer.total_steps, stop_after)
    metrics_file = None
    writer = None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / "train_config.json", config.to_dict())
        metrics_file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if config.tensorboard:
            writer = _tensorboard_writer(output_dir)

    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            desc=f"{config.method} train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    rows: list[dict[str, Any]] = []
    last_checkpoint: str | None = None
    started = time.perf_counter()
    tokens_this_call = 0

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row, default=_json_default) + "\n")
            metrics_file.flush()
        if writer is not None:
            prefix = "eval" if row.get("eval") else "train"
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if output_dir is None:
            return
        last_checkpoint = str(
            save_checkpoint(
                output_dir,
                model=model,
                optimizer=trainer.optimizer,
                scheduler=trainer.scheduler,
                config=config,
                trainer_state=trainer.trainer_state(),
                keep=config.keep_checkpoints,
            )
        )

    model.hf_model.eval()  # dropout off: rollouts and scores come from the same deterministic network
    try:
        while trainer.step < end_step:
            row = trainer.train_step()
            tokens_this_call += row["completion_tokens"]
            if trainer.step % config.log_every == 0 or trainer.step == end_step:
                emit(row)
            if progress is not None:
                progress.set_postfix(
                    loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}"
                )
                progress.update(1)
            if eval_fn is not None and config.eval_every and trainer.step % config.eval_every == 0:
                if trainer.step != trainer.total_steps:
                    emit({"step": trainer.step, "eval": True, **eval_fn(model, trainer.step)})
            if config.save_every and trainer.step % config.save_every == 0 and trainer.step != end_step:
                checkpoint()
        checkpoint()
        if output_dir is not None and trainer.step == trainer.total_steps:
            # The user-facing result: a PEFT adapter folder (LoRA) or the full weights (full FT).
            model.save_adapter(output_dir / "final")
        if eval_fn is not None and trainer.step == trainer.total_steps:
            emit({"step": trainer.step, "eval": True, **eval_fn(model, trainer.step)})
    finally:
        if progress is not None:
            progress.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()

    train_rows = [r for r in rows if not r.get("eval")]
    return TrainResult(
        steps=trainer.step,
        final_loss=train_rows[-1]["loss"] if train_rows else None,
        metrics=rows,
        wall_time_s=time.perf_counter() - started,
        completion_tokens=tokens_this_call,
        output_dir=None if output_dir is None else str(output_dir),
        last_checkpoint=last_checkpoint,
        stopped_early=trainer.step < trainer.total_steps,
    )
