"""The SDFT training loop: rollout -> score -> distill -> step -> EMA.

One optimizer step of ``method="sdft"`` reads top to bottom:

1. take the next ``batch_size * grad_accum / num_generations`` prompts of the shuffled data;
2. sample ``num_generations`` completions per prompt from the student (temperature 1.0), so a step
   always trains on ``batch_size * grad_accum`` sequences (the batch counts sequences, as in TRL);
   ``rollout_source`` says under which prompt: the student's (on-policy), the teacher's (TRL's
   ``generate_from_teacher``), or a seeded mix of the two;
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

The run's plan (step count, data order, learning rate) comes from :mod:`sdft_fast.schedule`,
its settings from :class:`sdft_fast.config.TrainConfig`, and its checkpoints (exact resume,
atomic writes) from :mod:`sdft_fast.checkpoint`.

On several ranks (:mod:`sdft_fast.distributed`) ``batch_size`` and ``grad_accum`` are per rank:
a step takes ``world_size`` times the prompts, each rank samples and scores its own contiguous
share of them with the rollout seeds one process would use for those micro-batches, the losses
are divided by the global number of sequences and the gradients summed, so N ranks make the same
step as one process with ``grad_accum`` x N. Only rank 0 writes metrics, progress and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdft_fast.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    json_default,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from sdft_fast.config import TrainConfig
from sdft_fast.data import EncodedExample
from sdft_fast.distributed import Ranks, check_run_agrees
from sdft_fast.fsdp import shard_full_model
from sdft_fast.lora import LoraConfig
from sdft_fast.loss import linear_cross_entropy, reduce_token_losses, self_distill_loss, token_logprobs
from sdft_fast.model import PairBatch, SelfDistillModel
from sdft_fast.sampling import fill_id, pad_token_id, stop_token_ids
from sdft_fast.schedule import DataCursor, make_optimizer, planned_steps
from sdft_fast.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)


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


def build_model(model_path: str | os.PathLike, config: TrainConfig) -> SelfDistillModel:
    """Load a local HF causal-LM folder as a SelfDistillModel the way ``config`` asks (LoRA or full FT)."""
    lora = None
    if config.lora_rank > 0:
        lora = LoraConfig(r=config.lora_rank, alpha=config.resolved_lora_alpha, dropout=config.lora_dropout)
    # PEFT-style adapters start with B = 0 but A random: seed so two runs start identically.
    torch.manual_seed(config.seed)
    return SelfDistillModel.from_pretrained(
        model_path, lora=lora, teacher=config.teacher, dtype=config.dtype, device=config.device
    )


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


# ----------------------------------------------------------------------------- one step


@dataclass
class _Rollouts:
    """One step's worth of sampled completions, kept across the passes of num_iterations."""

    example_indices: list[int]  # into the encoded examples, in micro-batch order
    completions: list[list[int]]  # token ids per prompt (EOS included when produced)
    rollout_logprobs: list[list[float]] | None  # per completion token, under the sampling policy
    passes_done: int = 0
    # Which completions were sampled under the teacher prompt (None: none, as before the field existed).
    from_teacher: list[bool] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def share(self, ranks: Ranks) -> _Rollouts:
        """This rank's block of the step's rollouts (the whole step's on one process)."""
        logprobs = None if self.rollout_logprobs is None else ranks.share(self.rollout_logprobs)
        from_teacher = None if self.from_teacher is None else ranks.share(self.from_teacher)
        return _Rollouts(
            ranks.share(self.example_indices),
            ranks.share(self.completions),
            logprobs,
            self.passes_done,
            from_teacher,
        )

    @classmethod
    def join(cls, parts: list[dict[str, Any]]) -> _Rollouts:
        """The step's rollouts from every rank's block (to_json form, in rank order)."""
        joined = {}
        for name in ("example_indices", "completions", "rollout_logprobs", "from_teacher"):
            joined[name] = None if parts[0].get(name) is None else [x for part in parts for x in part[name]]
        return cls(**joined, passes_done=parts[0]["passes_done"])

    @classmethod
    def from_json(cls, payload: dict[str, Any] | None) -> _Rollouts | None:
        return None if payload is None else cls(**payload)


def _micro_batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def _rollout_seed(seed: int, step: int, micro: int) -> int:
    """Sampling seed for one micro-batch: a function of (seed, step, micro-batch) alone, so the same
    step samples the same completions whether or not the run was resumed in between."""
    return (seed * 1_000_003 + step * 7919 + micro) % (2**63 - 1)


def teacher_rollout_mask(config: TrainConfig, step: int, count: int) -> list[bool]:
    """Which of a step's ``count`` rollouts are sampled under the teacher prompt.

    ``mix`` takes ``floor(f * count)`` of them, plus one with probability ``frac(f * count)`` (so the
    expected fraction is exactly ``f`` whatever the batch), at positions drawn at random; both draws
    come from a generator seeded by (seed, step) alone, so a resumed run picks the same rows.
    """
    if config.rollout_source == "student":
        return [False] * count
    if config.rollout_source == "teacher":
        return [True] * count
    generator = torch.Generator().manual_seed(_rollout_seed(config.seed, step, 0) ^ 0x7EAC4E5)
    expected = config.teacher_rollout_fraction * count
    chosen = math.floor(expected) + int(
        float(torch.rand((), generator=generator)) < expected - math.floor(expected)
    )
    mask = [False] * count
    for position in torch.randperm(count, generator=generator)[:chosen].tolist():
        mask[position] = True
    return mask


class Trainer:
    """Holds the pieces of one run; ``train()`` below is the public entry point."""

    def __init__(
        self,
        model: SelfDistillModel,
        tokenizer,
        examples: Sequence[EncodedExample],
        config: TrainConfig,
        ranks: Ranks | None = None,
    ):
        config.validate()
        validate_examples(examples, config)
        self.ranks = ranks or Ranks()
        check_run_agrees(self.ranks, model, examples, config)
        model_teacher = getattr(model, "teacher_mode", config.teacher)
        if config.method == "sdft" and model_teacher != config.teacher:
            raise ValueError(
                f"TrainConfig.teacher={config.teacher!r} but the model was built with teacher={model_teacher!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.config = config
        self.total_steps = planned_steps(len(self.examples), config, self.ranks.world_size)
        # Full fine-tuning on several ranks: FSDP2 shards (before the optimizer sees the parameters).
        self.sharded = self.ranks.world_size > 1 and model.lora_config is None
        if self.sharded:
            shard_full_model(model)
        elif self.ranks.world_size > 1:  # identical starts, as DDP does: rank 0's adapter and teacher
            for state, load in (
                (model.trainable_state_dict(), model.load_trainable_state_dict),
                (model.teacher_state_dict(), model.load_teacher_state_dict),
            ):
                if state:
                    self.ranks.broadcast_(list(state.values()), what="sending rank 0's start weights")
                    load(state)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = pad_token_id(tokenizer, self.stop_ids)
        self.optimizer, self.scheduler = make_optimizer(model, config, self.total_steps)
        self.cursor = DataCursor(len(self.examples), seed=config.seed, shuffle=config.shuffle)
        self.step = 0
        self.pending: _Rollouts | None = None
        self.completion_tokens_total = 0

    # -- rollouts -------------------------------------------------------------

    def _sample(self, indices: list[int]) -> _Rollouts:
        """Sample one completion per entry of ``indices`` (a prompt repeated num_generations times gets
        that many independent draws), micro-batch by micro-batch, each under the student or the teacher
        prompt as ``teacher_rollout_mask`` says; the student's weights sample both."""
        config = self.config
        # The whole step's mask (as one process draws it), this rank's block of it.
        from_teacher = self.ranks.share(
            teacher_rollout_mask(config, self.step, len(indices) * self.ranks.world_size)
        )
        completions: list[list[int]] = []
        for micro, (chunk, chunk_from_teacher) in enumerate(
            zip(_micro_batches(indices, config.batch_size), _micro_batches(from_teacher, config.batch_size))
        ):
            prompts = [
                self.examples[i].teacher_prompt_ids if teacher else self.examples[i].student_prompt_ids
                for i, teacher in zip(chunk, chunk_from_teacher)
            ]
            completions.extend(
                self.model.generate(
                    prompts,
                    max_new_tokens=config.max_new_tokens,
                    do_sample=True,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    eos_token_id=None if config.ignore_eos else (self.stop_ids or None),
                    pad_token_id=self.pad_id,
                    # Rank r's micro-batches are micro-batches r * grad_accum... of the whole step.
                    seed=_rollout_seed(config.seed, self.step, self.ranks.rank * config.grad_accum + micro),
                )
            )
        rollout_logprobs = None
        if config.num_iterations > 1:
            # The policy that sampled the rollouts, for the importance ratios of later passes. Rollouts
            # from the teacher prompt are off-policy by design and get none (weight 1, as in TRL).
            rollout_logprobs = []
            with torch.no_grad():
                for chunk_indices, chunk_completions, chunk_from_teacher in zip(
                    _micro_batches(indices, config.batch_size),
                    _micro_batches(completions, config.batch_size),
                    _micro_batches(from_teacher, config.batch_size),
                ):
                    prompts = [self.examples[i].student_prompt_ids for i in chunk_indices]
                    nonempty = [j for j, c in enumerate(chunk_completions) if c and not chunk_from_teacher[j]]
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
                    elif self.sharded:  # every rank runs every FSDP2 pass (they are collectives)
                        self.model.forward_student(prompts[:1], [self._stand_in_completion()])
                    rollout_logprobs.extend(per_sequence)
        return _Rollouts(
            example_indices=indices,
            completions=completions,
            rollout_logprobs=rollout_logprobs,
            from_teacher=from_teacher,
        )

    # -- losses ---------------------------------------------------------------

    def _sdft_micro_loss(
        self, indices, completions, rollout_logprobs, from_teacher
    ) -> tuple[torch.Tensor, dict] | None:
        """Self-distillation loss of one micro-batch (sequence mean), or None when no token counts."""
        config = self.config
        keep = [j for j, c in enumerate(completions) if len(c) > config.skip_tokens]
        if not keep:
            return self._stand_in_loss(indices[0]) if self.sharded else None
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
                # Teacher-prompt rollouts take the current log-probs as their own: ratio 1.
                logp_rollout = torch.cat(
                    [
                        logp_now[out.sequence_ids == row].float()
                        if from_teacher[j]
                        else torch.tensor(rollout_logprobs[j], dtype=torch.float32, device=logp_now.device)
                        for row, j in enumerate(keep)
                    ]
                )  # [N]
                if logp_rollout.shape != logp_now.shape:
                    raise RuntimeError(
                        f"rollout log-probs cover {logp_rollout.numel()} tokens, the batch has {logp_now.numel()}"
                    )
                token_weights = torch.exp(logp_now.float() - logp_rollout).clamp(max=config.importance_cap)
                mean_ratio = float(token_weights[loss_mask].mean()) if bool(loss_mask.any()) else None
        # One sweep over the vocabulary gives the per-token divergences; the loss weights them by
        # the importance ratios, the metric does not.
        per_token = self_distill_loss(
            out.student_hidden,
            out.teacher_hidden,
            self.model.lm_head_weight,
            self.model.lm_head_bias,
            alpha=config.alpha,
            temperature=config.loss_temperature,
            loss_mask=loss_mask,
            sequence_ids=out.sequence_ids,
            reduction="none",
            impl=config.loss_impl,
        )  # [N], 0 where masked
        loss = reduce_token_losses(
            per_token, loss_mask=loss_mask, token_weights=token_weights, sequence_ids=out.sequence_ids
        )
        if token_weights is None:
            divergence = float(loss.detach())
        else:
            divergence = float(
                reduce_token_losses(per_token.detach(), loss_mask=loss_mask, sequence_ids=out.sequence_ids)
            )
        stats = {"sequences": len(keep), "tokens": int(loss_mask.sum()), "divergence": divergence}
        if mean_ratio is not None:
            stats["importance_ratio"] = mean_ratio
        return loss, stats

    def _stand_in_completion(self) -> list[int]:
        return [fill_id(self.pad_id, self.stop_ids)]

    def _stand_in_loss(self, index: int) -> tuple[torch.Tensor, dict]:
        """A rank with nothing to score in a micro-batch still runs the FSDP2 forward and backward
        (collectives every rank must join): one example with a one-token stand-in completion, every
        token masked, so the loss and its gradients are 0."""
        example = self.examples[index]
        out = self.model.forward_pair(
            PairBatch(
                [example.student_prompt_ids], [example.teacher_prompt_ids], [self._stand_in_completion()]
            )
        )
        loss = self_distill_loss(
            out.student_hidden,
            out.teacher_hidden,
            self.model.lm_head_weight,
            self.model.lm_head_bias,
            loss_mask=torch.zeros_like(out.completion_positions, dtype=torch.bool),
            sequence_ids=out.sequence_ids,
        )
        return loss, {"sequences": 0, "tokens": 0, "divergence": 0.0}

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
                prompts = self.cursor.take(config.prompts_per_step * self.ranks.world_size)
                # Each prompt num_generations times in a row: its rollouts share a micro-batch.
                indices = self.ranks.share([i for i in prompts for _ in range(config.num_generations)])
                sample_started = time.perf_counter()
                self.pending = self._sample(indices)
                sample_s = time.perf_counter() - sample_started
            rollouts = self.pending
            indices = rollouts.example_indices
            completions = rollouts.completions
            from_teacher = rollouts.from_teacher or [False] * len(completions)
            lengths = [len(c) for c in completions]
            counted = sum(1 for n in lengths if n > config.skip_tokens)
        else:
            indices = self.ranks.share(self.cursor.take(config.prompts_per_step * self.ranks.world_size))
            completions = None
            lengths = [len(self.examples[i].demonstration_ids) for i in indices]
            counted = len(indices)
        # The loss is a mean over the sequences of the whole step, every rank's.
        counted = int(self.ranks.sum([counted], what="counting the step's sequences")[0])

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
                result = self._sdft_micro_loss(
                    chunk,
                    completions[lo : lo + len(chunk)],
                    chunk_logprobs,
                    from_teacher[lo : lo + len(chunk)],
                )
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
        if not self.sharded:  # FSDP2 reduce-scattered them in the backward
            self.ranks.sum_gradients_(params)
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

        # Metrics of the whole step: sums and maxima over the ranks.
        total, peak = self.ranks.reduce_metrics(
            {
                "loss": loss_sum,
                "divergence": divergence_sum,
                "ratio_sum": ratio_sum,
                "ratio_count": ratio_count,
                "loss_tokens": tokens,
                "completion_tokens": sum(lengths),
                "sequences": len(lengths),
                "teacher_rollouts": sum(from_teacher) if config.method == "sdft" else 0,
            },
            {
                "completion_len_max": max(lengths) if lengths else 0,
                "step_s": time.perf_counter() - started,
                "sample_s": sample_s,
                "peak_memory_mb": _peak_memory_mb(self.model.device),
            },
        )
        completion_tokens, elapsed = int(total["completion_tokens"]), peak["step_s"]
        self.completion_tokens_total += completion_tokens
        row: dict[str, Any] = {
            "step": self.step,
            "epoch": self.cursor.epoch + self.cursor.position / self.cursor.num_examples,
            "loss": total["loss"],
            "lr": lr,
            "grad_norm": grad_norm,
            "completion_len_mean": completion_tokens / max(1, total["sequences"]),
            "completion_len_max": int(peak["completion_len_max"]),
            "completion_tokens": completion_tokens,
            "loss_tokens": int(total["loss_tokens"]),
            "tokens_per_s": completion_tokens / elapsed if elapsed > 0 else 0.0,
            "step_s": elapsed,
            "peak_memory_mb": peak["peak_memory_mb"],
        }
        if config.method == "sdft":
            row["divergence"] = total["divergence"]
            row["sample_s"] = peak["sample_s"]
            row["sequences_counted"] = counted
            row["teacher_rollouts"] = int(total["teacher_rollouts"])
            if total["ratio_count"]:
                row["importance_ratio"] = total["ratio_sum"] / total["ratio_count"]
        return row

    # -- state ----------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """The run's state for a checkpoint (a collective on several ranks: the pending rollouts are
        the whole step's, gathered from every rank, as one process would hold them)."""
        pending = None
        if self.pending is not None:
            parts = self.ranks.gather_objects(self.pending.to_json(), what="gathering the pending rollouts")
            pending = _Rollouts.join(parts).to_json()
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "data": self.cursor.state(),
            "num_examples": len(self.examples),
            "completion_tokens_total": self.completion_tokens_total,
            "pending_rollouts": pending,
            "world_size": self.ranks.world_size,
            "config": self.config.to_dict(),
        }

    def restore(self, checkpoint: str | os.PathLike) -> None:
        load = load_sharded_checkpoint if is_sharded_checkpoint(checkpoint) else load_checkpoint
        state = load(checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if state["num_examples"] != len(self.examples):
            raise ValueError(
                f"{checkpoint}: saved with {state['num_examples']} examples, this run has {len(self.examples)}; "
                "resume needs the same data"
            )
        saved = state["config"]
        for name in (
            "method",
            "batch_size",
            "seed",
            "shuffle",
            "num_iterations",
            "num_generations",
            "teacher",
            "rollout_source",
            "teacher_rollout_fraction",
        ):
            # Checkpoints from before a field existed ran with its default.
            saved_value = saved.get(name, _FIELD_DEFAULTS.get(name))
            if saved_value != getattr(self.config, name):
                raise ValueError(
                    f"{checkpoint}: saved with {name}={saved_value!r}, this run has "
                    f"{name}={getattr(self.config, name)!r}; resume would not continue the same run"
                )
        # Micro-batches per step, all ranks together: any world size that keeps it continues the run.
        saved_world = int(state.get("world_size", 1))
        if saved["grad_accum"] * saved_world != self.config.grad_accum * self.ranks.world_size:
            raise ValueError(
                f"{checkpoint}: saved with grad_accum={saved['grad_accum']} on {saved_world} rank(s), this run "
                f"has grad_accum={self.config.grad_accum} on {self.ranks.world_size}; resume needs the same "
                "micro-batches per step (grad_accum x ranks)"
            )
        self.step = int(state["step"])
        self.cursor = DataCursor(
            len(self.examples),
            seed=self.config.seed,
            shuffle=self.config.shuffle,
            epoch=int(state["data"]["epoch"]),
            position=int(state["data"]["position"]),
        )
        pending = _Rollouts.from_json(state.get("pending_rollouts"))
        self.pending = None if pending is None else pending.share(self.ranks)
        self.completion_tokens_total = int(state.get("completion_tokens_total", 0))


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


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
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train ``model`` on ``encoded_examples`` as ``config`` says.

    resume_from: a checkpoint folder, or ``"latest"`` for the newest complete one under
        ``config.output_dir``; continues exactly where that run stopped.
    stop_after: stop once the step counter reaches this value (a time budget, or the first half
        of a resume test) without changing the schedule, which stays planned for max_steps.
    eval_fn: called as ``eval_fn(model, step)`` every ``eval_every`` steps and at the end; the
        returned numbers are written to metrics.jsonl with ``"eval": true``. On several ranks it
        runs on every rank and rank 0's numbers are written.
    ranks: the data-parallel group (default: the initialised default process group, if any).
    """
    trainer = Trainer(model, tokenizer, encoded_examples, config, ranks)
    ranks = trainer.ranks
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
    if output_dir is not None and ranks.is_main:  # one writer: rank 0
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "train_config.json", config.to_dict())
        metrics_file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        if config.tensorboard:
            writer = _tensorboard_writer(output_dir)

    progress = None
    if config.progress and ranks.is_main:
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
            metrics_file.write(json.dumps(row, default=json_default) + "\n")
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
        state = trainer.trainer_state()  # every rank: gathers the pending rollouts
        if trainer.sharded:  # every rank writes its shards
            last_checkpoint = str(
                save_sharded_checkpoint(
                    output_dir,
                    model=model,
                    optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler,
                    trainer_state=state,
                    keep=config.keep_checkpoints,
                    ranks=ranks,
                )
            )
            return
        ranks.check_in_step({**model.trainable_state_dict(), **model.teacher_state_dict()})
        if ranks.is_main:
            last_checkpoint = str(
                save_checkpoint(
                    output_dir,
                    model=model,
                    optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler,
                    config=config,
                    trainer_state=state,
                    keep=config.keep_checkpoints,
                )
            )
        ranks.barrier("waiting for rank 0 to write the checkpoint")
        last_checkpoint = str(latest_checkpoint(output_dir))

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
        if (
            output_dir is not None
            and trainer.step == trainer.total_steps
            and (ranks.is_main or trainer.sharded)
        ):
            # The user-facing result: a PEFT adapter folder (LoRA) or the full weights (full FT;
            # sharded: every rank sends its shards, rank 0 writes).
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
