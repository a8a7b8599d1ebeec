"""A run's output folder, besides its checkpoints: who may use it, and the metrics written to it.

- :func:`check_output_dir` refuses a folder that already holds a run unless the caller resumes
  it or asks to overwrite it (the transformers convention), and a path that is a file.
  :func:`clear_previous_run` removes a previous run's files (only the files a run writes).
- :class:`RunLock` holds an exclusive lock on the folder while a run writes to it, so two
  processes never write one run; the lock dies with its process, even on ``kill -9``.
- :class:`MetricsLog` appends one strict JSON object per line to ``metrics.jsonl`` (NaN and inf
  become ``null``; every consumer of JSON can read the file). On resume it first cuts the file
  back to the checkpoint's step, so each step appears once however often the run was killed.
- :func:`open_reporter` returns the TensorBoard writer that ``report_to`` asks for, or None
  (with a notice when the package is missing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdft_fast.checkpoint import CHECKPOINT_PREFIX, TEMP_PREFIX, TRASH_PREFIX, json_default
from sdft_fast.config import ConfigError
from sdft_fast.precision import TrainingDiverged, nonfinite_tensor

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".sdft-fast.lock"
# What a run writes at the top of its folder; anything else there belongs to the user.
RUN_FILES = (METRICS_FILE, CONFIG_FILE, SUMMARY_FILE, FINAL_DIR, TENSORBOARD_DIR)


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names of the files and folders a run left in ``output_dir`` (empty for a fresh folder)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        child.name
        for child in root.iterdir()
        if child.name in RUN_FILES or child.name.startswith((CHECKPOINT_PREFIX, TEMP_PREFIX, TRASH_PREFIX))
    )


def check_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder this run may not use; change nothing.

    Raises ConfigError (field ``output_dir``): the path is a file; it holds a previous run and
    neither ``resume`` nor ``overwrite`` is set; both are set (they contradict).
    """
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError("output_dir", str(root), "is a file, not a folder")
    if resume and overwrite:
        raise ConfigError(
            "output_dir",
            str(root),
            "--resume continues the run in it, --overwrite-output-dir deletes it: choose one",
        )
    found = previous_run_files(root)
    if found and not resume and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(
            "output_dir",
            str(root),
            f"already holds a run ({shown}); continue it with --resume, replace it with "
            "--overwrite-output-dir, or choose another --output-dir",
        )


def clear_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Delete a previous run's files (checkpoints, metrics, final adapter...) and nothing else."""
    root = Path(output_dir)
    removed = previous_run_files(root)
    for name in removed:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/.sdft-fast.lock`` for the life of a run.

    The kernel drops the lock when the process ends, however it ends, so a killed run never
    leaves the folder locked. Re-entrant within a process (the CLI holds it while it picks the
    checkpoint to resume, then ``train`` takes it again). Where ``fcntl`` does not exist
    (Windows) the lock is a no-op.
    """

    _held: dict[str, list] = {}  # resolved lock path -> [open file, depth], this process's locks

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._key = ""

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux / macOS
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in RunLock._held:
            RunLock._held[self._key][1] += 1
            return self
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                "output_dir", str(self.path.parent), f"another run (pid {holder}) is writing to it right now"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        RunLock._held[self._key] = [handle, 1]
        return self

    def __exit__(self, *exc) -> None:
        entry = RunLock._held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()  # closing drops the flock
            del RunLock._held[self._key]


def _strict(value: Any) -> Any:
    """NaN / inf -> None, recursively: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def to_json_line(row: dict[str, Any]) -> str:
    """One strict JSON object (no NaN / Infinity literals), no newline."""
    return json.dumps(_strict(row), default=json_default, allow_nan=False)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed row by row."""

    def __init__(self, output_dir: str | os.PathLike, *, keep_through_step: int | None):
        """keep_through_step: on resume, the checkpoint's step (rows after it are removed);
        None for a fresh run (the file starts empty)."""
        self.path = Path(output_dir) / METRICS_FILE
        self.dropped = 0
        if keep_through_step is None:
            self.path.write_text("")
        else:
            self.dropped = self._truncate(keep_through_step)
        self._handle = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def _truncate(self, step: int) -> int:
        """Keep the rows of steps <= ``step`` (a torn last line from a kill is dropped too);
        rewrite the file atomically. Returns how many lines were dropped."""
        if not self.path.exists():
            self.path.write_text("")
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return dropped

    def write(self, row: dict[str, Any]) -> None:
        self._handle.write(to_json_line(row) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def open_reporter(report_to: str, output_dir: Path, *, purge_step: int | None, notice: Callable[[str], None]):
    """The TensorBoard SummaryWriter for ``report_to="tensorboard"`` (None for "none").

    ``purge_step`` (on resume: the checkpoint's step + 1) makes TensorBoard drop the events a
    killed run logged after its checkpoint, as :class:`MetricsLog` does for metrics.jsonl.
    """
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        notice(
            "--report-to tensorboard: the tensorboard package is not installed, so no events are "
            "written (metrics.jsonl has every row). pip install tensorboard, or pass --report-to none"
        )
        return None
    return SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR), purge_step=purge_step)


def write_scalars(writer, row: dict[str, Any]) -> None:
    """A metrics row as TensorBoard scalars: ``train/<key>`` or ``eval/<key>`` at its step."""
    prefix = "eval" if row.get("eval") else "train"
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            if math.isfinite(value):
                writer.add_scalar(f"{prefix}/{key}", value, row["step"])


def stderr_notice(message: str) -> None:
    """A line on stderr that does not tear a tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"sdft-fast: {message}", file=sys.stderr)


def save_final_adapter(model, output_dir: Path) -> Path:
    """``<output_dir>/final`` (a SelfDistillModel's adapter, or its weights for full fine-tuning):
    written to a temporary folder and renamed, never with NaN/inf."""
    bad = nonfinite_tensor(model.trainable_state_dict())
    if bad is not None:
        raise TrainingDiverged(
            f"the trained weight {bad} holds NaN/inf values; not saving it as {output_dir / FINAL_DIR}"
        )
    final = output_dir / FINAL_DIR
    tmp = output_dir / f".tmp-{FINAL_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_adapter(tmp)
        if final.exists():
            trash = output_dir / f".old-{FINAL_DIR}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
