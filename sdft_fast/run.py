"""One training run, start (or checkpoint) to final adapter: :func:`train`.

Around the steps of :class:`sdft_fast.trainer.Trainer`, a run settles its output folder (refuses
one that holds another run unless asked to resume or overwrite it, locks it, cleans what a killed
save left), resumes from the newest intact checkpoint, writes ``metrics.jsonl`` (and TensorBoard
events), checkpoints every ``save_every`` steps, evaluates every ``eval_every`` steps, and saves
the final adapter. A step whose loss or gradient is not finite changes nothing and is reported;
too many in a row stop the run (:class:`TrainingDiverged`).
"""

from __future__ import annotations

import contextlib
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
    clean_stale_temporaries,
    find_intact_checkpoint,
    latest_checkpoint,
    save_checkpoint,
    write_json,
)
from sdft_fast.config import TrainConfig
from sdft_fast.data import EncodedExample
from sdft_fast.distributed import Ranks
from sdft_fast.model import SelfDistillModel
from sdft_fast.precision import TrainingDiverged
from sdft_fast.run_dir import (
    CONFIG_FILE,
    FINAL_DIR,
    MetricsLog,
    RunLock,
    check_output_dir,
    clear_previous_run,
    open_reporter,
    save_final_adapter,
    stderr_notice,
    write_scalars,
)
from sdft_fast.sharded_checkpoint import save_sharded_checkpoint
from sdft_fast.trainer import Trainer

# A run stops when this many steps in a row had a non-finite loss or gradient: float16's dynamic
# loss scale needs at most 16 halvings to come down from 2**16, so more means the run diverged.
MAX_CONSECUTIVE_SKIPS = 24


@dataclass
class TrainResult:
    """What a run did: steps taken, per-step metrics, where its outputs are."""

    steps: int  # optimizer steps completed in total (including those before a resume)
    total_steps: int  # the steps the run is planned for
    final_loss: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the rows written to metrics.jsonl
    wall_time_s: float = 0.0  # time spent in this call
    completion_tokens: int = 0  # completion tokens trained on in this call
    output_dir: str | None = None
    last_checkpoint: str | None = None
    stopped_early: bool = False  # stop_after ended the run before max_steps
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update), over the whole run
    final_adapter: str | None = None  # <output_dir>/final once the run completed
    resumed_from: str | None = None  # the checkpoint this call continued from


def train(
    model: SelfDistillModel,
    tokenizer,
    encoded_examples: Sequence[EncodedExample],
    config: TrainConfig,
    *,
    resume_from: str | os.PathLike | None = None,
    stop_after: int | None = None,
    eval_fn: Callable[[SelfDistillModel, int], dict[str, Any]] | None = None,
    overwrite_output_dir: bool = False,
    allow_harmless_changes: bool = False,
    notice: Callable[[str], None] = stderr_notice,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train ``model`` on ``encoded_examples`` as ``config`` says.

    resume_from: a checkpoint folder, or ``"latest"`` for the newest intact one under
        ``config.output_dir`` (a damaged newer one is named through ``notice`` and skipped);
        continues exactly where that run stopped. Settings that differ from the checkpoint's are
        refused (:class:`SettingsChanged`), except how the run is logged and saved, and, with
        ``allow_harmless_changes``, its length, device and kernels.
    stop_after: stop once the step counter reaches this value (a time budget, or the first half
        of a resume test) without changing the schedule, which stays planned for max_steps.
    eval_fn: called as ``eval_fn(model, step)`` every ``eval_every`` steps and at the end; the
        returned numbers are written to metrics.jsonl with ``"eval": true``.
    overwrite_output_dir: delete a previous run's files in ``config.output_dir`` first; without
        it (or a resume) a folder that holds a run is refused.
    notice: where warnings go (skipped steps, damaged checkpoints, a missing reporter).
    ranks: the data-parallel group (default: the initialised default process group, if any). Only
        rank 0 locks, cleans and writes the folder; ``eval_fn`` runs on every rank and rank 0's
        numbers are written.

    A step whose loss or gradient is not finite changes nothing (counted in ``skipped_steps``,
    reported through ``notice``); :class:`TrainingDiverged` stops a run after
    ``MAX_CONSECUTIVE_SKIPS`` such steps in a row. Nothing non-finite is ever saved.
    """
    trainer = Trainer(model, tokenizer, encoded_examples, config, ranks)
    ranks = trainer.ranks
    if not ranks.is_main:
        notice = _quiet
    output_dir = Path(config.output_dir) if config.output_dir else None
    if output_dir is None:
        if resume_from is not None and str(resume_from) == "latest":
            raise ValueError("resume_from='latest' needs config.output_dir")
        return _run(trainer, None, resume_from, stop_after, eval_fn, allow_harmless_changes, notice)
    # Every rank reads the same folder, so every rank refuses it alike.
    check_output_dir(output_dir, resume=resume_from is not None, overwrite=overwrite_output_dir)
    with RunLock(output_dir) if ranks.is_main else contextlib.nullcontext():
        if ranks.is_main:
            # Holding the lock, nothing else writes here: every temporary folder is a killed save's.
            leftovers = clean_stale_temporaries(output_dir)
            if leftovers:
                notice(f"removed what an interrupted save left in {output_dir}: {', '.join(leftovers)}")
            if overwrite_output_dir:
                removed = clear_previous_run(output_dir)
                if removed:
                    notice(
                        f"--overwrite-output-dir: removed the previous run's {', '.join(removed)} from "
                        f"{output_dir}"
                    )
        ranks.barrier("waiting for rank 0 to settle the output folder")
        if resume_from is not None and str(resume_from) == "latest":
            found = find_intact_checkpoint(output_dir, warn=notice)
            if found is None:
                raise FileNotFoundError(f"no intact checkpoint under {output_dir} to resume from")
            resume_from = found
        return _run(trainer, output_dir, resume_from, stop_after, eval_fn, allow_harmless_changes, notice)


def _run(
    trainer, output_dir, resume_from, stop_after, eval_fn, allow_harmless_changes, notice
) -> TrainResult:
    """The loop of :func:`train` once the output folder is settled."""
    model, config = trainer.model, trainer.config
    if resume_from is not None:
        trainer.restore(resume_from, allow_harmless_changes=allow_harmless_changes)
    else:
        # Same seed -> same run: the torch/python generators start from the config's seed.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    saved_step = trainer.step if resume_from is not None else None

    end_step = trainer.total_steps if stop_after is None else min(trainer.total_steps, stop_after)
    metrics = None
    writer = None
    ranks = trainer.ranks
    if output_dir is not None and ranks.is_main:  # one writer: rank 0
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / CONFIG_FILE, config.to_dict())
        # On resume the rows a killed run wrote after its checkpoint go: each step appears once.
        metrics = MetricsLog(output_dir, keep_through_step=saved_step)
        writer = open_reporter(
            config.report_to,
            output_dir,
            purge_step=None if saved_step is None else saved_step + 1,
            notice=notice,
        )

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
    final_adapter: str | None = None
    started = time.perf_counter()
    tokens_this_call = 0

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if metrics is not None:
            metrics.write(row)
        if writer is not None:
            write_scalars(writer, row)

    def checkpoint() -> None:
        nonlocal last_checkpoint, saved_step
        if output_dir is None or saved_step == trainer.step:
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
        else:
            ranks.check_in_step({**model.trainable_state_dict(), **model.teacher_state_dict()})
            if ranks.is_main:
                save_checkpoint(
                    output_dir,
                    model=model,
                    optimizer=trainer.optimizer,
                    scheduler=trainer.scheduler,
                    config=config,
                    trainer_state=state,
                    keep=config.keep_checkpoints,
                    weights=trainer.precision,
                )
            ranks.barrier("waiting for rank 0 to write the checkpoint")
            last_checkpoint = str(latest_checkpoint(output_dir))
        saved_step = trainer.step

    model.hf_model.eval()  # dropout off: rollouts and scores come from the same deterministic network
    try:
        while trainer.step < end_step:
            row = trainer.train_step()
            tokens_this_call += row["completion_tokens"]
            if row["skipped"]:
                notice(
                    f"step {trainer.step}: {trainer.last_skip_reason}; update skipped "
                    f"({trainer.skipped_steps} skipped so far)"
                )
            if trainer.step % config.log_every == 0 or trainer.step == end_step or row["skipped"]:
                emit(row)
            if trainer.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingDiverged(
                    f"{trainer.consecutive_skips} steps in a row (up to step {trainer.step}) had a non-finite "
                    f"loss or gradient ({trainer.last_skip_reason}); the run diverged or its dtype overflows "
                    "(try a lower --lr, or --dtype bfloat16 / float32)"
                    + (f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else "")
                )
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
            # The user-facing result: a PEFT adapter folder (LoRA) or the full weights (full FT;
            # sharded: every rank sends its shards, rank 0 writes).
            if trainer.sharded:
                model.save_adapter(output_dir / FINAL_DIR)
                final_adapter = str(output_dir / FINAL_DIR)
            elif ranks.is_main:
                final_adapter = str(save_final_adapter(model, output_dir))
        if eval_fn is not None and trainer.step == trainer.total_steps:
            emit({"step": trainer.step, "eval": True, **eval_fn(model, trainer.step)})
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()

    train_rows = [r for r in rows if not r.get("eval")]
    return TrainResult(
        steps=trainer.step,
        total_steps=trainer.total_steps,
        final_loss=train_rows[-1]["loss"] if train_rows else None,
        metrics=rows,
        wall_time_s=time.perf_counter() - started,
        completion_tokens=tokens_this_call,
        output_dir=None if output_dir is None else str(output_dir),
        last_checkpoint=last_checkpoint,
        stopped_early=trainer.step < trainer.total_steps,
        skipped_steps=trainer.skipped_steps,
        final_adapter=final_adapter,
        resumed_from=None if resume_from is None else str(resume_from),
    )


def _quiet(message: str) -> None:
    """The notices of ranks other than 0: rank 0 says them once."""
