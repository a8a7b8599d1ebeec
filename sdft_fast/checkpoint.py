"""Checkpoints that let a run continue bit for bit, written atomically.

A checkpoint holds everything needed to continue exactly: trainable weights, the EMA teacher,
optimizer, scheduler, RNG states, step and data position (and a pending rollout buffer when
stopped between the passes of ``num_iterations``). It is written to a temporary folder and
renamed, so a crash mid-save leaves the previous checkpoint intact. Tensors go to safetensors,
the rest to JSON: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdft_fast.config import TrainConfig
from sdft_fast.model import SelfDistillModel

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT_VERSION = 1


def is_lora(model: SelfDistillModel) -> bool:
    """True when only an adapter trains (fewer trainable elements than the base network has)."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    base = sum(p.numel() for p in model.hf_model.parameters())
    return trainable < base


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


def json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if callable(value):  # LambdaLR keeps the lambdas; they are rebuilt from the config on resume
        return None
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, default=json_default))


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
        write_json(tmp / "optimizer.json", optimizer_structure)
        write_json(tmp / "scheduler.json", scheduler.state_dict())
        rng_tensors = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                rng_tensors[f"torch_cuda_{index}"] = cuda_state
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "rng.json", {"python": random.getstate()})
        # Written last: its presence marks the folder complete (see checkpoint_steps).
        write_json(tmp / TRAINER_STATE_FILE, trainer_state)
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


def load_model_state(path: str | os.PathLike, *, model: SelfDistillModel) -> dict[str, Any]:
    """Restore only the model's trainable weights and EMA teacher from a checkpoint (e.g. to start
    the next stage of a continual run where the last one ended); return the trainer state."""
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
    return trainer_state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: SelfDistillModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> dict[str, Any]:
    """Restore model, teacher, optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(path)
    trainer_state = load_model_state(path, model=model)
    optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_structure = json.loads((path / "optimizer.json").read_text())
    # load_state_dict moves the moments to each parameter's device and dtype.
    optimizer.load_state_dict(_unflatten_optimizer_state(optimizer_tensors, optimizer_structure))
    scheduler_state = json.loads((path / "scheduler.json").read_text())
    # The lambdas themselves are rebuilt from the config; their JSON entries are None (see json_default).
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
