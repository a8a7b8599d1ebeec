"""Several processes, one run: launcher detection, the process group, and the collectives of the loop.

``sdft-fast train`` runs as one process, or as N under ``torchrun --nproc-per-node N`` or
``accelerate launch --num-processes N`` (both start the processes and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`Launch.from_environment`
reads them). Each process holds the whole model (LoRA: the adapter's gradients are summed
across ranks after the backward, like DDP's bucketed all-reduce) or its shard of it (full
fine-tuning: FSDP2, :mod:`sdft_fast.fsdp`), samples its own share of the global batch and
scores it; :class:`Ranks` holds what the trainer needs from the others:

* its share of a list (the step's prompts) and the sums and maxima of numbers (the step's
  sequence count, its metrics) over all ranks;
* the sum of the gradients (LoRA) and rank 0's weights at the start (identical starts);
* agreement checks: every rank runs the same settings on the same data and model, and stays
  in step (the trainable weights and the EMA teacher are compared at every checkpoint);
* failure that ends the job instead of hanging it: every collective has the group's timeout, a
  failed collective is re-raised as :class:`RankLost` naming what the rank was doing, and a setup
  step that fails on one rank fails on all (:meth:`Ranks.together`).

One process needs no launcher and no process group: ``Ranks()`` is then rank 0 of 1, and every
method is the identity.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sdft_fast.checkpoint import data_fingerprint

# Set by torchrun / torch.distributed.run and by accelerate launch (which runs torchrun's launcher).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_BUCKET_ELEMENTS = 2**24  # gradients are summed in flat buckets of at most this many elements (64 MiB fp32)


class RankLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


class SameOnEveryRank(ValueError):
    """An error every rank raises with the same message (a setting differs across ranks): the CLI
    prints it once, from rank 0."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as the launcher told it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun", "accelerate launch", "environment" or "none"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Launch:
        """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun, accelerate launch); one process without them."""
        environ = dict(os.environ if environ is None else environ)
        if ("WORLD_SIZE" not in environ and "RANK" not in environ) or environ.get("WORLD_SIZE") == "1":
            return cls()  # one process (torchrun --nproc-per-node 1 included): no process group
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        if missing:
            raise ValueError(
                f"the environment sets {', '.join(n for n in LAUNCH_VARIABLES if n in environ)} but not "
                f"{', '.join(missing)}: start the processes with torchrun or accelerate launch"
            )
        try:
            rank, world, local = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        except ValueError as error:
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from None
        if not (world >= 1 and 0 <= rank < world and local >= 0):
            raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a rank")
        if any(name.startswith("ACCELERATE_") for name in environ):
            launcher = "accelerate launch"
        elif "TORCHELASTIC_RUN_ID" in environ:
            launcher = "torchrun"
        else:
            launcher = "environment"
        return cls(rank, world, local, launcher)


def init_process_group(launch: Launch, device: str, timeout_s: float) -> str:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA); return this rank's device.

    ``device`` "auto" or "cuda" becomes ``cuda:LOCAL_RANK`` (one GPU per process). Nothing to do
    for one process. Every collective of the run waits at most ``timeout_s`` for the other ranks.
    """
    if launch.world_size == 1:
        return device
    if device in ("auto", "cuda"):
        device = f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def end_process_group(launch: Launch) -> None:
    """Leave the process group :func:`init_process_group` joined (nothing for one process)."""
    if launch.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """This process's place in a data-parallel run and the collectives the training loop needs.

    ``Ranks()`` (no process group, or a group of one) is rank 0 of 1 and every method the identity.
    """

    def __init__(self, group=None):
        self.group = group
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if active else 0
        self.world_size = dist.get_world_size(group) if active else 1
        backend = dist.get_backend(group) if active else "none"
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    # -- failures ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def collectives(self, what: str) -> Iterator[None]:
        """Re-raise a failed collective inside the block as :class:`RankLost` saying what this rank
        was doing (the block may hold other code: only communication failures are converted)."""
        try:
            yield
        except RankLost:
            raise
        except Exception as error:
            if self.world_size == 1 or not is_collective_failure(error):
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RankLost(
                f"rank {self.rank} of {self.world_size}: {what} failed; another rank stopped, hung past "
                f"the timeout, or lost its connection ({first_line[:300]}). Checkpoints already written "
                "are intact: resume with --resume"
            ) from error

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a setup step that must succeed on every rank: when it fails on one, every rank raises
        (the failing one its own error, the others :class:`RankLost` naming it) instead of the
        others waiting at their next collective until the timeout."""
        error: BaseException | None = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = caught
        if self.world_size > 1:
            failures = self.gather_objects(
                None if error is None else f"{type(error).__name__}: {error}", what=what
            )
            failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
            if len(failed) == self.world_size and len({text for _, text in failed}) == 1:
                raise SameOnEveryRank(str(error)) from error  # e.g. the same bad data row on every rank
            if error is None and failed:
                rank, text = failed[0]
                raise RankLost(f"rank {self.rank}: stopping because rank {rank} failed while {what}: {text}")
        if error is not None:
            raise error

    # -- collectives ----------------------------------------------------------------------------
    def _tensor(self, values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def gather_objects(self, value: Any, *, what: str = "exchanging state") -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        with self.collectives(what):
            dist.all_gather_object(out, value, group=self.group)
        return out

    def sum(self, values: Sequence[float], *, what: str = "summing across ranks") -> list[float]:
        """Element-wise sums over the ranks (float64: counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        tensor = self._tensor(list(values), torch.float64)
        with self.collectives(what):
            dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def reduce_metrics(self, sums: dict[str, float], maxima: dict[str, float]) -> tuple[dict, dict]:
        """Sums and maxima of this step's numbers over every rank, with one all-gather."""
        if self.world_size == 1:
            return dict(sums), dict(maxima)
        keys = list(sums) + list(maxima)
        local = self._tensor(
            [float(sums[k]) for k in sums] + [float(maxima[k]) for k in maxima], torch.float64
        )
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        with self.collectives("reducing the step's metrics"):
            dist.all_gather(parts, local, group=self.group)
        everyone = torch.stack(parts).cpu()  # [P, K]
        total, peak = everyone.sum(0).tolist(), everyone.max(0).values.tolist()
        n = len(sums)
        return dict(zip(keys[:n], total[:n])), dict(zip(keys[n:], peak[n:]))

    def barrier(self, what: str) -> None:
        if self.world_size > 1:
            with self.collectives(what):
                dist.barrier(group=self.group)

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous block of ``items`` (its share of the step's global batch): rank r
        of P gets items[r n / P : (r + 1) n / P], so the blocks in rank order are the whole list."""
        if len(items) % self.world_size:
            raise ValueError(f"{len(items)} items do not split evenly over {self.world_size} ranks")
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[torch.Tensor], *, what: str) -> None:
        """Overwrite ``tensors`` with rank 0's (in place, flattened per dtype)."""
        if self.world_size == 1:
            return
        with self.collectives(what):
            for bucket in _buckets(tensors):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
                dist.broadcast(flat, src=source, group=self.group)
                _unflatten_into(flat, bucket)

    @torch.no_grad()
    def sum_gradients_(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks (in place), bucketed like DDP.

        Each rank's loss is already divided by the GLOBAL number of sequences, so the sum is the
        gradient of the global sequence mean. A parameter without a gradient on this rank (no
        sequence of this rank counted) contributes zeros: every rank sends the same buckets.
        """
        if self.world_size == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with self.collectives("summing the gradients across ranks"):
            for bucket in _buckets([p.grad for p in parameters]):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, group=self.group)
                _unflatten_into(flat, bucket)

    # -- agreement ---------------------------------------------------------------------------------
    def check_same(self, what: str, values: dict[str, Any]) -> None:
        """Raise :class:`SameOnEveryRank` on every rank unless ``values`` (JSON-able) agree on all,
        naming each field that differs and each rank's value."""
        if self.world_size == 1:
            return
        digest = _digest(values)
        digests = self.gather_objects(digest, what=f"comparing {what} across ranks")
        if len(set(digests)) == 1:
            return
        everyone = self.gather_objects(values, what=f"comparing {what} across ranks")
        differences = []
        for key in sorted({k for v in everyone for k in v}):
            seen = [v.get(key, "<missing>") for v in everyone]
            if any(_digest(s) != _digest(seen[0]) for s in seen[1:]):
                per_rank = ", ".join(f"rank {r}: {_short(s)}" for r, s in enumerate(seen))
                differences.append(f"{key} ({per_rank})")
        raise SameOnEveryRank(
            f"{what} differ across the {self.world_size} ranks: " + "; ".join(differences or ["(unknown)"])
        )

    def check_in_step(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every rank must hold the same ``tensors`` (the LoRA adapter and the EMA teacher after an
        optimizer step): compare exact checksums, raise :class:`RankLost` on divergence."""
        if self.world_size == 1:
            return
        mine = {name: bit_checksum([t]) for name, t in tensors.items()}
        everyone = self.gather_objects(mine, what="comparing the weights across ranks")
        diverged = sorted(name for name in mine if any(other.get(name) != mine[name] for other in everyone))
        if diverged:
            raise RankLost(
                f"rank {self.rank}: the ranks' weights diverged ({', '.join(diverged[:3])}"
                f"{' ...' if len(diverged) > 3 else ''}); the run is not data-parallel any more"
            )


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when a peer dies, hangs or disconnects: torch's
    DistError family (NCCL, stores, timeouts) and gloo's transport errors (plain RuntimeErrors)."""
    if isinstance(error, getattr(dist, "DistError", ())) or isinstance(error, ConnectionError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")
    )


def bit_checksum(tensors: Sequence[torch.Tensor]) -> int:
    """Exact checksum of some tensors' bits (the sum of their elements read as integers): equal on
    every rank that holds equal tensors, whatever the hardware's summation order."""
    total = 0
    with torch.no_grad():
        for t in tensors:
            as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
            total += int(t.detach().contiguous().view(as_int).sum(dtype=torch.int64))
    return total


def check_run_agrees(ranks: Ranks, model, examples: Sequence[Any], config) -> None:
    """Every rank must run the same settings on the same examples and start model, or the job ends
    here with one message naming what differs (:class:`SameOnEveryRank`). The device (one GPU per
    rank) and the progress bar (rank 0's only) may differ."""
    if ranks.world_size == 1:
        return
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "progress")}
    # Every weight, not a model fingerprint: FSDP2 shards each rank's own copy, so they must be equal.
    weights = bit_checksum(list(model.hf_model.parameters()))
    identity = {
        **settings,
        "examples": f"{len(examples)} examples, token ids {data_fingerprint(examples)[:16]}",
        "model": f"{type(model.hf_model).__name__}, weights checksum {weights}",
    }
    ranks.check_same("the settings, data and start model", identity)


def _digest(values: Any) -> str:
    text = json.dumps(values, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of one dtype and device, each at most _BUCKET_ELEMENTS (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (
            t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + t.numel() > _BUCKET_ELEMENTS
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
