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

Mixed precision (fp32 master weights for half-precision models, loss scaling) comes from
:mod:`sdft_fast.precision`: a step whose loss or gradient is not finite changes nothing and is
counted. The run around the steps (output folder, resume, metrics, checkpoints, the final
adapter) is :func:`sdft_fast.run.train`; the plan (step count, data order, learning rate) comes
from :mod:`sdft_fast.schedule`, the settings from :class:`sdft_fast.config.TrainConfig`.

On several ranks (:mod:`sdft_fast.distributed`) ``batch_size`` and ``grad_accum`` are per rank:
a step takes ``world_size`` times the prompts, each rank samples and scores its own contiguous
share of them with the rollout seeds one process would use for those micro-batches, the losses
are divided by the global number of sequences and the gradients summed, so N ranks make the same
step as one process with ``grad_accum`` x N. Only rank 0 writes metrics, progress and checkpoints.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from sdft_fast.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    check_resume,
    data_fingerprint,
    load_checkpoint,
    model_fingerprint,
)
from sdft_fast.config import ConfigError, TrainConfig
from sdft_fast.data import EncodedExample
from sdft_fast.distributed import Ranks, check_run_agrees
from sdft_fast.fsdp import shard_full_model
from sdft_fast.lora import LoraConfig
from sdft_fast.loss import linear_cross_entropy, reduce_token_losses, self_distill_loss, token_logprobs
from sdft_fast.model import PairBatch, SelfDistillModel
from sdft_fast.precision import MixedPrecision
from sdft_fast.rollouts import Rollouts, RolloutSampler, micro_batches, off_policy_mask
from sdft_fast.sampling import pad_token_id, stop_token_ids
from sdft_fast.schedule import DataCursor, make_optimizer, planned_steps
from sdft_fast.sharded_checkpoint import is_sharded_checkpoint, load_sharded_checkpoint


def build_model(
    model_path: str | os.PathLike, config: TrainConfig, *, trust_remote_code: bool = False
) -> SelfDistillModel:
    """Load a local HF causal-LM folder as a SelfDistillModel the way ``config`` asks (LoRA or
    full FT). ``trust_remote_code`` runs Python code shipped in the model folder: opt in only for
    folders you trust."""
    lora = None
    if config.lora_rank > 0:
        lora = LoraConfig(
            r=config.lora_rank,
            alpha=config.resolved_lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    # PEFT-style adapters start with B = 0 but A random: seed so two runs start identically.
    torch.manual_seed(config.seed)
    model = SelfDistillModel.from_pretrained(
        model_path,
        lora=lora,
        teacher=config.teacher,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=trust_remote_code,
    )
    if config.gradient_checkpointing and not model.fast_path:
        raise ConfigError(
            "gradient_checkpointing",
            True,
            f"works on the packed one-pass path (Llama / Qwen / Mistral family); this model takes the "
            f"generic path ({model._fallback_reason})",
        )
    model.gradient_checkpointing = config.gradient_checkpointing
    return model


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


class Trainer:
    """The steps of one run and their state; :func:`sdft_fast.run.train` is the public entry point."""

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
        # Of the whole model, before FSDP2 shards its embedding across the ranks.
        self.model_fingerprint = model_fingerprint(model)
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
        self.sampler = RolloutSampler(
            model, self.examples, config, self.ranks, self.stop_ids, self.pad_id, sharded=self.sharded
        )
        # fp32 masters and loss scaling for half-precision models; the parameters themselves in fp32
        # (and under FSDP2, whose shards the optimizer steps directly).
        self.precision = MixedPrecision(model, enabled=not self.sharded)
        self.optimizer, self.scheduler = make_optimizer(
            self.precision.master_params, config, self.total_steps
        )
        self.cursor = DataCursor(len(self.examples), seed=config.seed, shuffle=config.shuffle)
        self.step = 0
        self.pending: Rollouts | None = None
        self.completion_tokens_total = 0
        self.run_id = uuid.uuid4().hex[:12]  # names this run's checkpoints (pruning touches only its own)
        self.skipped_steps = 0  # steps with a non-finite loss or gradient, over the whole run
        self.consecutive_skips = 0
        self.last_skip_reason: str | None = None
        self.data_fingerprint = data_fingerprint(self.examples)

    # -- rollouts -------------------------------------------------------------

    def _sample(self, indices: list[int]) -> Rollouts:
        """This step's rollouts for ``indices`` (see :class:`sdft_fast.rollouts.RolloutSampler`)."""
        return self.sampler.sample(indices, self.step)

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
        if not (_finite(out.student_hidden) and _finite(out.teacher_hidden)):
            # An overflow in the forward (float16) or a broken weight: this step cannot count. The
            # NaN loss keeps its graph: its backward still runs (a collective under FSDP2).
            nan_loss = out.student_hidden.float().sum() * float("nan")
            return nan_loss, {"sequences": len(keep), "tokens": 0, "finite": False}
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
                # Off-policy rollouts take the current log-probs as their own: ratio 1.
                off_policy = off_policy_mask(config, from_teacher)
                logp_rollout = torch.cat(
                    [
                        logp_now[out.sequence_ids == row].float()
                        if off_policy[j]
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

    def _stand_in_loss(self, index: int) -> tuple[torch.Tensor, dict]:
        """A rank with nothing to score in a micro-batch still runs the FSDP2 forward and backward
        (collectives every rank must join): one example with a one-token stand-in completion, every
        token masked, so the loss and its gradients are 0."""
        example = self.examples[index]
        out = self.model.forward_pair(
            PairBatch(
                [example.student_prompt_ids],
                [example.teacher_prompt_ids],
                [self.sampler.stand_in_completion()],
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

        self.precision.zero_grad()
        loss_sum = 0.0
        divergence_sum = 0.0
        ratio_sum, ratio_count = 0.0, 0
        tokens = 0
        nonfinite: str | None = None  # why this step changes nothing, if it does not
        for micro, chunk in enumerate(micro_batches(indices, config.batch_size)):
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
            if nonfinite is None and (
                not stats.get("finite", True) or not bool(torch.isfinite(loss.detach()))
            ):
                # The backward still runs (under FSDP2 it is a collective): the step is skipped below.
                nonfinite = f"non-finite loss in micro-batch {micro + 1}"
            # Each micro-batch's loss is a mean over its own sequences; weighting it by its share of the
            # step's sequences makes the accumulated gradient the mean over all of them.
            share = stats["sequences"] / max(1, counted)
            self.precision.scale(loss * share).backward()
            loss_sum += float(loss.detach()) * share
            divergence_sum += stats.get("divergence", float(loss.detach())) * share
            if "importance_ratio" in stats:
                ratio_sum += stats["importance_ratio"]
                ratio_count += 1
            tokens += stats["tokens"]

        self.precision.unscale_gradients()
        params = self.precision.master_params
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
        if nonfinite is None and not math.isfinite(grad_norm):
            nonfinite = f"non-finite gradient (norm {grad_norm})"
            if self.precision.scaling:
                nonfinite += f" at float16 loss scale {self.precision.loss_scale:g}"
        # Every rank takes the same decision: a step is skipped when any rank saw a non-finite loss.
        flagged = self.ranks.sum([float(nonfinite is not None)], what="agreeing on a skipped step")[0]
        if nonfinite is None and flagged:
            nonfinite = "non-finite loss on another rank"
        skipped = nonfinite is not None
        lr = self.scheduler.get_last_lr()[0]
        if not skipped:
            self.optimizer.step()
        # The plan is a function of the step: a skipped step still uses up its data and LR slot.
        self.scheduler.step()
        self.precision.after_step(skipped)
        self.precision.zero_grad()
        if config.method == "sdft" and config.teacher == "ema" and not skipped:
            self.precision.ema_update(config.ema_rate)

        self.step += 1
        if config.method == "sdft":
            self.pending.passes_done += 1
            if self.pending.passes_done >= config.num_iterations:
                self.pending = None
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.last_skip_reason = nonfinite
        else:
            self.consecutive_skips = 0

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
            "skipped": skipped,
            "skipped_steps": self.skipped_steps,
        }
        if self.precision.scaling:
            row["loss_scale"] = self.precision.loss_scale
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
            pending = Rollouts.join(parts).to_json()
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "run_id": self.run_id,
            "step": self.step,
            "total_steps": self.total_steps,
            "data": self.cursor.state(),
            "num_examples": len(self.examples),
            "data_fingerprint": self.data_fingerprint,
            "model_fingerprint": self.model_fingerprint,
            "completion_tokens_total": self.completion_tokens_total,
            "skipped_steps": self.skipped_steps,
            "precision": self.precision.state(),
            "pending_rollouts": pending,
            "world_size": self.ranks.world_size,
            "config": self.config.to_dict(),
        }

    def restore(self, checkpoint: str | os.PathLike, *, allow_harmless_changes: bool = False) -> None:
        """Continue from ``checkpoint``: refuse it when the data, the model or a setting differs
        (each named), else load every state it holds."""
        check_resume(
            checkpoint,
            self.config,
            data_fingerprint=self.data_fingerprint,
            num_examples=len(self.examples),
            model_fingerprint=self.model_fingerprint,
            allow_harmless_changes=allow_harmless_changes,
        )
        if is_sharded_checkpoint(checkpoint):
            state = load_sharded_checkpoint(
                checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
            )
        else:
            state = load_checkpoint(
                checkpoint,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                weights=self.precision,
            )
        # Micro-batches per step, all ranks together: any world size that keeps it continues the run.
        saved_world, saved_accum = int(state.get("world_size", 1)), int(state["config"]["grad_accum"])
        if saved_accum * saved_world != self.config.grad_accum * self.ranks.world_size:
            raise ValueError(
                f"{checkpoint}: saved with grad_accum={saved_accum} on {saved_world} rank(s), this run "
                f"has grad_accum={self.config.grad_accum} on {self.ranks.world_size}; resume needs the same "
                "micro-batches per step (grad_accum x ranks)"
            )
        self.run_id = state["run_id"]
        self.step = int(state["step"])
        self.cursor = DataCursor(
            len(self.examples),
            seed=self.config.seed,
            shuffle=self.config.shuffle,
            epoch=int(state["data"]["epoch"]),
            position=int(state["data"]["position"]),
        )
        pending = Rollouts.from_json(state.get("pending_rollouts"))
        self.pending = None if pending is None else pending.share(self.ranks)
        self.completion_tokens_total = int(state.get("completion_tokens_total", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.precision.load_state(state.get("precision"))


def _finite(tensor: torch.Tensor | None) -> bool:
    return tensor is None or bool(torch.isfinite(tensor).all())


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
