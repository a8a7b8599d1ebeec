"""Rollouts: which prompts a step samples under, with which seeds, and the buffer that keeps them.

A step's rollouts are one completion per entry of its prompt list (a prompt repeated
``num_generations`` times gets that many independent draws), sampled micro-batch by micro-batch
with a seed that depends on (seed, step, micro-batch) alone, so a resumed run draws the same
completions. ``rollout_source`` says under which prompt each is sampled: the student's
(on-policy), the teacher's (TRL's ``generate_from_teacher``: the answer is in the rollout, the
policy is still the student's weights), or a seeded mix. :class:`Rollouts` keeps them across the
passes of ``num_iterations`` (with the sampling policy's log-probs for the importance ratios) and
in checkpoints; on several ranks each rank samples its contiguous share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdft_fast.config import TrainConfig
from sdft_fast.distributed import Ranks
from sdft_fast.loss import token_logprobs
from sdft_fast.sampling import fill_id


@dataclass
class Rollouts:
    """One step's worth of sampled completions, kept across the passes of num_iterations."""

    example_indices: list[int]  # into the encoded examples, in micro-batch order
    completions: list[list[int]]  # token ids per prompt (EOS included when produced)
    rollout_logprobs: list[list[float]] | None  # per completion token, under the sampling policy
    passes_done: int = 0
    # Which completions were sampled under the teacher prompt (None: none, as before the field existed).
    from_teacher: list[bool] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def share(self, ranks: Ranks) -> Rollouts:
        """This rank's block of the step's rollouts (the whole step's on one process)."""
        logprobs = None if self.rollout_logprobs is None else ranks.share(self.rollout_logprobs)
        from_teacher = None if self.from_teacher is None else ranks.share(self.from_teacher)
        return Rollouts(
            ranks.share(self.example_indices),
            ranks.share(self.completions),
            logprobs,
            self.passes_done,
            from_teacher,
        )

    @classmethod
    def join(cls, parts: list[dict[str, Any]]) -> Rollouts:
        """The step's rollouts from every rank's block (to_json form, in rank order)."""
        joined = {}
        for name in ("example_indices", "completions", "rollout_logprobs", "from_teacher"):
            joined[name] = None if parts[0].get(name) is None else [x for part in parts for x in part[name]]
        return cls(**joined, passes_done=parts[0]["passes_done"])

    @classmethod
    def from_json(cls, payload: dict[str, Any] | None) -> Rollouts | None:
        return None if payload is None else cls(**payload)


def micro_batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def rollout_seed(seed: int, step: int, micro: int) -> int:
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
    generator = torch.Generator().manual_seed(rollout_seed(config.seed, step, 0) ^ 0x7EAC4E5)
    expected = config.teacher_rollout_fraction * count
    chosen = math.floor(expected) + int(
        float(torch.rand((), generator=generator)) < expected - math.floor(expected)
    )
    mask = [False] * count
    for position in torch.randperm(count, generator=generator)[:chosen].tolist():
        mask[position] = True
    return mask


def split_by_sequence(values: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int):
    """Rows of a packed [N] tensor grouped by sequence id (rows of one sequence are contiguous)."""
    counts = torch.bincount(sequence_ids, minlength=num_sequences).tolist()
    return torch.split(values, counts)


def off_policy_mask(config: TrainConfig, from_teacher: list[bool]) -> list[bool]:
    """Which rollouts the student's current policy did not sample: those under the teacher prompt,
    or all of them when the teacher's weights sample (``rollout_model``). They take importance
    weight 1 (TRL's rule for teacher-prompt rollouts) and need no sampling log-probs."""
    return [True] * len(from_teacher) if config.rollout_model != "student" else list(from_teacher)


class RolloutSampler:
    """Samples a step's rollouts from the model for the trainer (one per rank)."""

    def __init__(
        self, model, examples, config: TrainConfig, ranks: Ranks, stop_ids, pad_id, *, sharded: bool
    ):
        self.model = model
        self.examples = examples
        self.config = config
        self.ranks = ranks
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.sharded = sharded  # FSDP2: every rank runs every forward (they are collectives)

    def stand_in_completion(self) -> list[int]:
        """A one-token completion for a rank with nothing to run in a collective pass."""
        return [fill_id(self.pad_id, self.stop_ids)]

    def sample(self, indices: list[int], step: int) -> Rollouts:
        """Sample one completion per entry of ``indices`` (a prompt repeated num_generations times gets
        that many independent draws), micro-batch by micro-batch, each under the student or the teacher
        prompt as ``teacher_rollout_mask`` says, with the weights ``rollout_model`` names."""
        config = self.config
        # The whole step's mask (as one process draws it), this rank's block of it.
        from_teacher = self.ranks.share(
            teacher_rollout_mask(config, step, len(indices) * self.ranks.world_size)
        )
        completions: list[list[int]] = []
        for micro, (chunk, chunk_from_teacher) in enumerate(
            zip(micro_batches(indices, config.batch_size), micro_batches(from_teacher, config.batch_size))
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
                    seed=rollout_seed(config.seed, step, self.ranks.rank * config.grad_accum + micro),
                    policy=config.rollout_model,
                )
            )
        rollout_logprobs = None
        off_policy = off_policy_mask(config, from_teacher)
        if config.num_iterations > 1:
            # The policy that sampled the rollouts, for the importance ratios of later passes. Rollouts
            # from the teacher prompt are off-policy by design and get none (weight 1, as in TRL).
            rollout_logprobs = []
            with torch.no_grad():
                for chunk_indices, chunk_completions, chunk_from_teacher in zip(
                    micro_batches(indices, config.batch_size),
                    micro_batches(completions, config.batch_size),
                    micro_batches(off_policy, config.batch_size),
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
                            split_by_sequence(logp.float().cpu(), out.sequence_ids.cpu(), len(nonempty))
                        ):
                            per_sequence[nonempty[row]] = values.tolist()
                    elif self.sharded:  # every rank runs every FSDP2 pass (they are collectives)
                        self.model.forward_student(prompts[:1], [self.stand_in_completion()])
                    rollout_logprobs.extend(per_sequence)
        return Rollouts(
            example_indices=indices,
            completions=completions,
            rollout_logprobs=rollout_logprobs,
            from_teacher=from_teacher,
        )
