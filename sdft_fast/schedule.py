"""The plan of a run: how many steps, in which data order, at which learning rate.

Everything here is a pure function of the config and the step, so a resumed run follows the
same plan as an uninterrupted one: the data order comes from per-epoch generators seeded with
``seed + epoch`` (two integers restore it), and the learning rate from the step alone.
"""

from __future__ import annotations

import math

import torch

from sdft_fast.config import TrainConfig


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup from 1/(warmup+1), then a
    half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.Tensor], config: TrainConfig, total_steps: int):
    """AdamW (or SGD with momentum) over ``params`` (the fp32 masters of
    :class:`sdft_fast.precision.MixedPrecision`) and the cosine-with-warmup schedule over ``total_steps``.

    AdamW divides each weight's step by the root of its squared-gradient average plus ``adam_eps``, so
    with the default eps every adapter weight moves by about lr per step however small and noisy its
    gradient; an eps near the gradients' RMS lets weights with small gradients take small steps."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: nothing to train")
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
            eps=config.adam_eps,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: cosine_with_warmup(
            step, warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
        ),
    )
    return optimizer, scheduler


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


def planned_steps(num_examples: int, config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps of the run; ``world_size`` ranks take ``prompts_per_step`` prompts each per step."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_examples / (config.prompts_per_step * world_size)))
