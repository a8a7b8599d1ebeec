"""Checkpoints that let a run continue bit for bit, written atomically and checked on load.

A checkpoint holds everything needed to continue exactly: trainable weights, the EMA teacher,
optimizer, scheduler, RNG states, step and data position (and a pending rollout buffer when
stopped between the passes of ``num_iterations``). It is written to a temporary folder and
renamed, so a crash mid-save leaves the previous checkpoint intact; a ``manifest.json`` written
last lists every file with its size and SHA-256, and marks the folder complete. Loading checks
the manifest first, so a truncated or damaged file is named instead of half-loaded, and
:func:`find_intact_checkpoint` falls back to the newest checkpoint that is still intact.

Each checkpoint carries the id of the run that wrote it: pruning old checkpoints only ever
deletes the writing run's own. Tensors go to safetensors, the rest to JSON: nothing here
unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdft_fast.config import SettingsChanged, TrainConfig, resume_differences
from sdft_fast.model import SelfDistillModel
from sdft_fast.precision import TrainingDiverged

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TEMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX  # a checkpoint being written
TRASH_PREFIX = ".old-" + CHECKPOINT_PREFIX  # a checkpoint being replaced by a new save of its step
CHECKPOINT_FORMAT_VERSION = 2  # 2: manifest.json (sizes + SHA-256) and the run id


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, damaged, another format); the message names
    the folder and the file."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_manifest(folder: Path, *, run_id: str, step: int) -> None:
    """List every file of ``folder`` with its size and SHA-256 (each fsynced first), then write the
    manifest itself: its presence marks the checkpoint complete."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format_version": CHECKPOINT_FORMAT_VERSION, "run_id": run_id, "step": step, "files": files}
    write_json(folder / MANIFEST_FILE, manifest)
    _fsync_file(folder / MANIFEST_FILE)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint folder; CheckpointError when it is missing or unreadable."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable ({error})") from error
    if manifest.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format {manifest.get('format_version')} is not "
            f"{CHECKPOINT_FORMAT_VERSION}, the one this version reads"
        )
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest (presence, size, SHA-256); return the manifest.

    Raises CheckpointError naming the first file that is missing, truncated or changed.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {path / MANIFEST_FILE})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"{file}: SHA-256 differs from the manifest's (the file was changed or damaged)"
            )
    return manifest


def checkpoint_steps(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as (step, path), oldest first.

    A checkpoint is complete when its manifest exists: that file is written last, inside the
    temporary folder, before the rename. (Complete is not intact: see :func:`verify_checkpoint`.)
    """
    root = Path(output_dir)
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if not child.name.startswith(CHECKPOINT_PREFIX) or not child.is_dir():
            continue
        suffix = child.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (child / MANIFEST_FILE).is_file():
            found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (not verified; :func:`find_intact_checkpoint` verifies)."""
    found = checkpoint_steps(output_dir)
    return found[-1][1] if found else None


def find_intact_checkpoint(
    output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> Path | None:
    """The newest checkpoint under ``output_dir`` that passes :func:`verify_checkpoint`.

    Each damaged or incomplete newer one is reported through ``warn`` (the reason names the file)
    and skipped, so a run continues from the previous intact checkpoint.
    """
    root = Path(output_dir)
    candidates = []
    if root.is_dir():
        for child in root.iterdir():
            suffix = child.name[len(CHECKPOINT_PREFIX) :]
            if child.name.startswith(CHECKPOINT_PREFIX) and child.is_dir() and suffix.isdigit():
                candidates.append((int(suffix), child))
    for _, path in sorted(candidates, reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            if warn is not None:
                warn(f"skipping damaged checkpoint {path}: {error}")
            continue
        return path
    return None


def clean_stale_temporaries(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a killed save left behind; call it only while holding the run's lock.

    ``.tmp-checkpoint-*`` folders are unfinished saves: deleted. ``.old-checkpoint-*`` is a
    checkpoint that a new save of the same step was replacing: deleted when the new one is in
    place, renamed back when the kill came between the two renames. Returns the names handled.
    """
    root = Path(output_dir)
    handled = []
    if not root.is_dir():
        return handled
    for child in sorted(root.iterdir()):
        if child.name.startswith(TEMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
            handled.append(child.name)
        elif child.name.startswith(TRASH_PREFIX):
            # .old-checkpoint-0000004-<pid>: the folder it was renamed from.
            original = root / child.name[len(".old-") :].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, original)
            handled.append(child.name)
    return handled


def _run_id_of(path: Path) -> str | None:
    try:
        return read_manifest(path).get("run_id")
    except CheckpointError:
        return None


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: SelfDistillModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: TrainConfig,
    trainer_state: dict[str, Any],
    keep: int = 2,
    weights=None,
) -> Path:
    """Write everything needed to continue exactly, atomically (temp folder + rename).

    ``trainer_state["run_id"]`` names the run; only its own older checkpoints are pruned (to the
    newest ``keep``). ``weights`` supplies the trainable and teacher tensors
    (``trainable_state_dict()`` / ``teacher_state_dict()``, e.g. fp32 master copies); default the
    model. A non-finite tensor is refused before anything is written.

    Layout of ``checkpoint-<step>/``:
      trainable.safetensors   the trainable parameters (LoRA factors or all weights), exact
      adapter/                PEFT-format adapter (LoRA runs only; the user-facing export)
      teacher.safetensors     the EMA teacher's state (empty for base/live teachers)
      optimizer.safetensors   AdamW moments, flattened; optimizer.json holds their structure
      scheduler.json          LR scheduler state
      rng.safetensors         torch CPU (and CUDA) generator states; rng.json the python state
      trainer_state.json      step, data position, config, run id, pending rollouts
      manifest.json           every file above with its size and SHA-256; written last
    """
    weights = model if weights is None else weights
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = int(trainer_state["step"])
    run_id = str(trainer_state["run_id"])
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    trainable = {k: v.detach().cpu().contiguous() for k, v in weights.trainable_state_dict().items()}
    teacher = {k: v.detach().cpu().contiguous() for k, v in (weights.teacher_state_dict() or {}).items()}
    for what, tensors in (("trainable", trainable), ("teacher", teacher)):
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TrainingDiverged(
                    f"step {step}: {what} tensor {name} holds NaN/inf values; not saving a broken "
                    f"checkpoint (the previous one in {root} is intact)"
                )
    tmp = root / f"{TEMP_PREFIX}{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if is_lora(model):  # full fine-tuning: trainable.safetensors already is the weights
            model.save_adapter(tmp / "adapter")
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
        write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        # Written last: its presence marks the folder complete (see checkpoint_steps).
        write_manifest(tmp, run_id=run_id, step=step)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step: move the old one aside, never delete it first
            trash = root / f"{TRASH_PREFIX}{step:07d}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, run_id=run_id, keep=keep, newest=final)
    return final


def prune_checkpoints(root: Path, *, run_id: str, keep: int, newest: Path) -> None:
    """Delete the run's own checkpoints older than its ``keep`` newest (``newest`` included);
    another run's are never touched."""
    own = [path for _, path in checkpoint_steps(root) if path != newest and _run_id_of(path) == run_id]
    for old in own[: max(0, len(own) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_model_state(path: str | os.PathLike, *, model: SelfDistillModel, weights=None) -> dict[str, Any]:
    """Verify the manifest, then restore only the trainable weights and the EMA teacher (into
    ``weights``, default the model), e.g. to start the next stage of a continual run where the
    last one ended; return the trainer state. CheckpointError names the folder and file."""
    weights = model if weights is None else weights
    path = Path(path)
    verify_checkpoint(path)
    current = path / TRAINER_STATE_FILE
    try:
        trainer_state = json.loads(current.read_text())
        device = model.device
        current = path / "trainable.safetensors"
        weights.load_trainable_state_dict(load_file(str(current), device=str(device)))
        current = path / "teacher.safetensors"
        teacher = load_file(str(current), device=str(device))
        if teacher:
            weights.load_teacher_state_dict(teacher)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{current}: cannot restore it into this model: {error}") from error
    return trainer_state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: SelfDistillModel,
    optimizer: torch.optim.Optimizer,
    scheduler,
    weights=None,
) -> dict[str, Any]:
    """Verify the manifest, then restore model (or ``weights``), teacher, optimizer, scheduler and
    RNG states; return the trainer state. CheckpointError names the folder and file on failure."""
    path = Path(path)
    trainer_state = load_model_state(path, model=model, weights=weights)
    current = path
    try:
        current = path / "optimizer.safetensors"
        optimizer_tensors = load_file(str(current))
        current = path / "optimizer.json"
        optimizer_structure = json.loads(current.read_text())
        # load_state_dict moves the moments to each parameter's device and dtype.
        optimizer.load_state_dict(_unflatten_optimizer_state(optimizer_tensors, optimizer_structure))
        current = path / "scheduler.json"
        scheduler_state = json.loads(current.read_text())
        # The lambdas themselves are rebuilt from the config; their JSON entries are None (see json_default).
        scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("lr_lambdas") or [None])
        scheduler.load_state_dict(scheduler_state)
        current = path / "rng.safetensors"
        rng_tensors = load_file(str(current))
        torch.set_rng_state(rng_tensors["torch_cpu"])
        if torch.cuda.is_available():
            cuda_states = [rng_tensors[k] for k in sorted(rng_tensors) if k.startswith("torch_cuda_")]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
        current = path / "rng.json"
        python_state = json.loads(current.read_text())["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        # The checksums matched, so the file is what was written: it does not fit this run
        # (another model, LoRA rank or optimizer).
        raise CheckpointError(f"{current}: cannot restore it into this run: {error}") from error
    return trainer_state


# ----------------------------------------------------------------------------- what a resume must match


def data_fingerprint(examples: Sequence) -> str:
    """SHA-256 of the token ids of every example, in order: a resume must train on the same data
    (the same rows, template and limits), not just the same number of rows."""
    digest = hashlib.sha256()
    for example in examples:
        for ids in (example.student_prompt_ids, example.teacher_prompt_ids, example.demonstration_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()


def model_fingerprint(model: SelfDistillModel) -> str:
    """SHA-256 of the base model's architecture and of a slice of its input embedding: a resume
    must continue on the model it started from."""
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embedding = model.hf_model.get_input_embeddings().weight.detach()
    digest.update(embedding.flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_resume(
    path: str | os.PathLike,
    config: TrainConfig,
    *,
    data_fingerprint: str,
    num_examples: int,
    model_fingerprint: str,
    allow_harmless_changes: bool = False,
) -> None:
    """Refuse to continue the checkpoint at ``path`` with other settings (SettingsChanged names
    each), other data or another base model (ValueError)."""
    manifest_state = Path(path) / TRAINER_STATE_FILE
    try:
        saved = json.loads(manifest_state.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_state}: unreadable ({error})") from error
    differences = resume_differences(saved["config"], config, allow_harmless=allow_harmless_changes)
    if differences:
        raise SettingsChanged(str(path), differences)
    if saved["num_examples"] != num_examples or saved["data_fingerprint"] != data_fingerprint:
        raise ValueError(
            f"{path}: saved with other training data ({saved['num_examples']} examples; this run has "
            f"{num_examples}, or other tokens); a resume needs the same data file, template and token limits"
        )
    if saved["model_fingerprint"] != model_fingerprint:
        raise ValueError(f"{path}: saved from another base model than this run's")
