"""Checkpoints of FSDP2-sharded runs: ``torch.distributed.checkpoint`` (DCP), atomic, loadable at any
number of ranks (one process included).

Layout of ``checkpoint-<step>/`` (same name and completeness rule as :mod:`sdft_fast.checkpoint`):

  sharded/               DCP: the weights, the EMA teacher and the AdamW state, each rank writing
                         its own shards (``.metadata`` + ``__<rank>_0.distcp``). Keys are parameter
                         names, so DCP reshards on load: any number of ranks, or one process with
                         the whole model, reads them.
  scheduler.json         LR scheduler state
  rng.safetensors        torch CPU (and CUDA) generator states; rng.json the python state (rank 0's)
  trainer_state.json     step, data position, config, run id, pending rollouts
  manifest.json          every file with its size and SHA-256 (checkpoint.verify_checkpoint); last

Atomic as the single-process format: every rank writes into ``.tmp-checkpoint-<step>-dcp/`` (a name
each rank derives from the step alone), rank 0 adds the small files once every rank has finished
and renames the folder; a crash before the rename leaves the previous checkpoint the newest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sdft_fast.checkpoint import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    prune_checkpoints,
    verify_checkpoint,
    write_json,
    write_manifest,
)

SHARDED_DIR = "sharded"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def _state(model, optimizer) -> dict[str, Any]:
    """What DCP saves and loads in place: {model, teacher, optimizer}, keyed by parameter name."""
    return {
        "model": get_model_state_dict(model.hf_model),
        "teacher": model.teacher_state_dict(),
        "optimizer": get_optimizer_state_dict(model.hf_model, optimizer),
    }


def save_sharded_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int,
    ranks,
) -> Path:
    """Write a checkpoint of a sharded run (a collective: every rank calls it with the same state)."""
    root = Path(output_dir)
    step = int(trainer_state["step"])
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}-dcp"
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash of an earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    ranks.barrier("preparing the checkpoint folder")
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / SHARDED_DIR))
    ranks.barrier("writing the sharded checkpoint")
    if ranks.is_main:
        try:
            write_json(tmp / "scheduler.json", scheduler.state_dict())
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            write_json(tmp / "rng.json", {"python": random.getstate()})
            write_json(tmp / TRAINER_STATE_FILE, trainer_state)
            # Last: lists every file (the shards too) with its size and SHA-256; marks it complete.
            write_manifest(tmp, run_id=str(trainer_state["run_id"]), step=step)
            if final.exists():  # re-saving a step: move the old one aside, never delete it first
                trash = root / f".old-{final.name}-dcp"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        prune_checkpoints(root, run_id=str(trainer_state["run_id"]), keep=keep, newest=final)
    ranks.barrier("waiting for rank 0 to complete the checkpoint")
    return final


def load_sharded_checkpoint(path: str | os.PathLike, *, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore a sharded checkpoint into ``model`` (sharded over any number of ranks, or whole in one
    process), its optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(path)
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file() or not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint")
    verify_checkpoint(path)
    state = _state(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP says it assumes one process, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))  # in place, resharded to this run's layout
    set_model_state_dict(model.hf_model, state["model"])
    if state["teacher"]:
        model.load_teacher_state_dict(state["teacher"])
    set_optimizer_state_dict(model.hf_model, optimizer, state["optimizer"])
    scheduler_state = json.loads((path / "scheduler.json").read_text())
    scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas") or [None])
    scheduler.load_state_dict(scheduler_state)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    python_state = json.loads((path / "rng.json").read_text())["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if dist.is_initialized():
        dist.barrier()
    return json.loads(state_file.read_text())
