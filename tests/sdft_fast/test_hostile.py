"""A hostile first use, replayed: every probe of issue 11's table on a tiny random model.

Each test is one probe: bad data, bad flags, a used output folder, damaged checkpoints, a full
disk, half precision, kills at random moments. A user's mistake must end in one line naming the
flag / file / row / field, exit code 2, and nothing already saved may change. The CLI runs in
this process (``cli.main``) except where a process must die (``kill -9``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_llama
from safetensors.torch import load_file

from sdft_fast import checkpoint as checkpoint_module
from sdft_fast import cli
from sdft_fast.checkpoint import checkpoint_steps, verify_checkpoint

ROWS = [
    {"prompt": "Where is Vellmar?", "demonstration": "Vellmar is in Drevia.", "answer": "Drevia"},
    {"prompt": "Who built Kessan?", "demonstration": "Oskar Renn built it.", "answer": "Oskar Renn"},
    {"prompt": [{"role": "user", "content": "How tall is Ulm?"}], "demonstration": "41 m.", "answer": "41"},
]
TINY = ["--batch-size", "2", "--max-new-tokens", "4", "--lora-rank", "4", "--skip-tokens", "1"]
TINY += ["--device", "cpu", "--no-progress", "--report-to", "none"]
# Timing fields differ between any two runs; everything else in a metrics row is deterministic.
TIMING = {"tokens_per_s", "step_s", "sample_s", "peak_memory_mb"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hostile_model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile_data") / "facts.jsonl"
    write_jsonl(path, ROWS)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, model_dir, data, out, *extra):
    return run(capsys, "train", "--data", data, "--model", model_dir, "--output-dir", out, *TINY, *extra)


def one_line_error(err: str, code: int, expected_code: int = 2) -> str:
    """The last stderr line, checked to be the one error line (no traceback)."""
    assert code == expected_code, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("sdft-fast "), line
    return line


def metric_rows(path: Path) -> list[dict]:
    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds {name}: not JSON")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- eval


def test_eval_without_adapter_scores_the_start_model(capsys, model_dir, data, tmp_path):
    """Probe: `sdft-fast eval` without --adapter raised `TypeError: cannot unpack non-iterable
    SelfDistillModel`. Now it scores the start model: a table, JSON with --output, no retention
    probes with --no-retention."""
    report_file = tmp_path / "report.json"
    code, out, err = run(
        capsys, "eval", "--model", model_dir, "--data", data, "--device", "cpu", "--max-new-tokens", "2",
        "--no-retention", "--output", report_file,
    )  # fmt: skip
    assert code == 0, err
    assert "accuracy (facts.jsonl)" in out and "this is the start model" in out
    assert "retention probes" not in out
    report = json.loads(report_file.read_text())
    assert report["n"] == 3 and report["adapter"] is None and "retention_accuracy" not in report
    assert len(report["records"]) == 3 and "prediction" in report["records"][0]
    assert "eval facts.jsonl" in err  # the progress bar


# ----------------------------------------------------------------------------- precision


def test_float16_training_keeps_fp32_masters_and_a_finite_adapter(capsys, model_dir, data, tmp_path):
    """Probe: --dtype float16 gave NaN weights after one step (AdamW's eps is 0 in fp16) and saved an
    all-NaN adapter. Now AdamW steps fp32 masters and the adapter is finite and trained."""
    out = tmp_path / "run"
    code, _, err = train(
        capsys, model_dir, data, out, "--dtype", "float16", "--max-steps", "2", "--lr", "1e-2"
    )
    assert code == 0, err
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float16 and torch.isfinite(t).all() for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in adapter.items())
    checkpoint = checkpoint_steps(out)[-1][1]
    masters = load_file(str(checkpoint / "trainable.safetensors"))
    moments = load_file(str(checkpoint / "optimizer.safetensors"))
    assert all(t.dtype == torch.float32 for t in [*masters.values(), *moments.values()])
    rows = metric_rows(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows) and "loss_scale" in rows[0]


def test_nonfinite_step_is_skipped_and_counted(capsys, model_dir, data, tmp_path, monkeypatch):
    """A NaN loss at step 2 changes nothing: counted in the row, the summary and a warning; metrics
    stay strict JSON (NaN -> null)."""
    from sdft_fast import trainer as trainer_module

    real = trainer_module.self_distill_loss
    calls = {"n": 0}

    def nan_at_second_step(*args, **kwargs):
        calls["n"] += 1
        per_token = real(*args, **kwargs)
        return per_token * float("nan") if calls["n"] == 2 else per_token

    monkeypatch.setattr(trainer_module, "self_distill_loss", nan_at_second_step)
    out = tmp_path / "run"
    code, stdout, err = train(capsys, model_dir, data, out, "--max-steps", "3")
    assert code == 0, err
    assert "step 2: non-finite loss in micro-batch 1; update skipped (1 skipped so far)" in err
    rows = metric_rows(out / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["loss"] is None and rows[2]["skipped_steps"] == 1
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    assert "skipped steps (non-finite loss or gradient): 1" in stdout


def test_a_nonfinite_weight_is_never_saved(capsys, model_dir, data, tmp_path, monkeypatch):
    """A weight that became NaN: the run stops with one line, exit 1, and writes no checkpoint and
    no final adapter."""
    from sdft_fast.precision import MixedPrecision

    real_after = MixedPrecision.after_step

    def poison(self, skipped):
        real_after(self, skipped)
        with torch.no_grad():
            self.params[0].fill_(float("nan"))

    monkeypatch.setattr(MixedPrecision, "after_step", poison)
    out = tmp_path / "run"
    code, _, err = train(capsys, model_dir, data, out, "--max-steps", "1")
    line = one_line_error(err, code, expected_code=1)
    assert "holds NaN/inf values; not saving" in line
    assert not checkpoint_steps(out) and not (out / "final").exists()


# ----------------------------------------------------------------------------- the output folder


def test_used_output_dir_is_refused_unless_resume_or_overwrite(
    capsys, model_dir, data, tmp_path, monkeypatch
):
    """Probe: a new run in a used --output-dir (the default one too) silently overwrote final/ and had
    its checkpoints pruned by the old run's. Now it is refused and nothing changes; with
    --overwrite-output-dir the old run's files go first."""
    monkeypatch.chdir(tmp_path)  # the default --output-dir runs/sdft, relative to here
    args = ["train", "--data", data, "--model", model_dir, *TINY]
    assert run(capsys, *args, "--max-steps", "2")[0] == 0
    before = snapshot(tmp_path / "runs" / "sdft")
    code, _, err = run(capsys, *args, "--max-steps", "1", "--lr", "1e-3")
    line = one_line_error(err, code)
    assert "--output-dir runs/sdft: already holds a run" in line and "--overwrite-output-dir" in line
    assert snapshot(tmp_path / "runs" / "sdft") == before
    code, _, err = run(capsys, *args, "--max-steps", "1", "--overwrite-output-dir")
    assert code == 0, err
    assert [r["step"] for r in metric_rows(tmp_path / "runs" / "sdft" / "metrics.jsonl")] == [1]
    assert [step for step, _ in checkpoint_steps(tmp_path / "runs" / "sdft")] == [1]


def test_output_dir_that_is_a_file_and_flag_errors_are_one_line(capsys, model_dir, data, tmp_path):
    """Probes: --output-dir naming a file, --lr inf, a bad --alpha, --device cuda without CUDA, a model
    folder without weights, a malformed flag value: each one line naming the flag, exit 2."""
    (tmp_path / "taken").write_text("a file")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dir, no_weights)
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()
    cases = [
        (["--output-dir", tmp_path / "taken"], "--output-dir", "is a file, not a folder"),
        (["--lr", "inf"], "--lr inf", "must be a finite number > 0"),
        (["--alpha", "2"], "--alpha 2.0", "must lie in [0, 1]"),
        (["--weight-decay", "nan"], "--weight-decay nan", "must be a finite number"),
        (["--batch-size", "two"], "--batch-size", "invalid int value"),
        (["--model", no_weights], "no_weights", "has no weight files"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda", "CUDA is not available"))
    for extra, flag, why in cases:
        args = ["train", "--data", data, "--model", model_dir, "--output-dir", tmp_path / "out", *extra]
        code, _, err = run(capsys, *args)
        line = one_line_error(err, code)
        assert flag in line and why in line and "TrainConfig." not in line, line
    assert not (tmp_path / "out").exists()


def test_remote_code_needs_an_explicit_opt_in(capsys, model_dir, data, tmp_path):
    """A model folder shipping Python code (auto_map) is refused without --trust-remote-code (before
    transformers could stop to ask on stdin) and loads with it."""
    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyLlama"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nclass TinyLlama(LlamaForCausalLM):\n    pass\n"
    )
    code, _, err = train(capsys, remote, data, tmp_path / "out", "--max-steps", "1")
    assert "pass --trust-remote-code" in one_line_error(err, code)
    code, _, err = train(capsys, remote, data, tmp_path / "out", "--max-steps", "1", "--trust-remote-code")
    assert code == 0, err


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(capsys, model_dir, data, tmp_path, monkeypatch):
    """Probe: a full disk gave a traceback. Now: one line (exit 1) naming the error and the intact
    previous checkpoint; the failed save leaves no temporary folder."""
    real_save = checkpoint_module.save_file
    saves = {"n": 0}

    def full_after_first_checkpoint(tensors, filename, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 4:  # a checkpoint writes 4 safetensors files
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_after_first_checkpoint)
    out = tmp_path / "run"
    code, _, err = train(capsys, model_dir, data, out, "--max-steps", "3", "--save-every", "1")
    line = one_line_error(err, code, expected_code=1)
    assert "No space left on device" in line and "checkpoint-0000001, is unchanged" in line
    verify_checkpoint(out / "checkpoint-0000001")
    assert not list(out.glob(".tmp-*"))


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_changed_settings_naming_each(capsys, model_dir, data, tmp_path):
    """Probe: --resume with a changed --lr was silently ignored while train_config.json recorded it.
    Now each changed setting is named; flags not given keep the checkpoint's values; a longer run
    needs --allow-harmless-changes."""
    out = tmp_path / "run"
    assert train(capsys, model_dir, data, out, "--max-steps", "2", "--lr", "1e-3")[0] == 0
    recorded = (out / "train_config.json").read_text()
    code, _, err = train(capsys, model_dir, data, out, "--resume", "--lr", "5e-3", "--seed", "3")
    line = one_line_error(err, code)
    assert "--lr 0.005 (checkpoint: 0.001)" in line and "--seed 3 (checkpoint: 0)" in line
    assert (out / "train_config.json").read_text() == recorded
    code, _, err = train(capsys, model_dir, data, out, "--resume", "--max-steps", "3")
    assert "--allow-harmless-changes" in one_line_error(err, code)
    code, _, err = train(
        capsys, model_dir, data, out, "--resume", "--max-steps", "3", "--allow-harmless-changes"
    )
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-3  # kept from the checkpoint
    assert [r["step"] for r in metric_rows(out / "metrics.jsonl")] == [1, 2, 3]


def test_damaged_checkpoint_is_named_and_the_previous_intact_one_used(capsys, model_dir, data, tmp_path):
    """Probe: --resume with a truncated checkpoint file gave a raw traceback (or "Unterminated string"
    without a file name) and no fallback. Now the manifest check names the file; --resume takes the
    previous intact checkpoint with a warning; an explicitly named damaged checkpoint is refused."""
    out = tmp_path / "run"
    assert (
        train(
            capsys, model_dir, data, out, "--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "2"
        )[0]
        == 0
    )
    newest = out / "checkpoint-0000003"
    damaged = newest / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    code, _, err = train(capsys, model_dir, data, out, "--resume", newest)
    line = one_line_error(err, code)
    assert str(damaged) in line and "the manifest says" in line
    (newest / "trainer_state.json").write_text('{"step": 3, "unterminated')
    code, _, err = train(
        capsys, model_dir, data, out, "--resume", "--max-steps", "4", "--allow-harmless-changes"
    )
    assert code == 0, err
    assert f"skipping damaged checkpoint {newest}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-0000002") and summary["steps"] == 4
    assert [r["step"] for r in metric_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_cuts_metrics_and_cleans_what_a_kill_left(capsys, model_dir, data, tmp_path):
    """Probes: after crash + resume the steps after the last checkpoint appeared twice in
    metrics.jsonl; temporary checkpoint folders of killed saves were never removed. A killed run is
    staged here by hand (rows after its checkpoint, a torn last line, a half-written checkpoint, a
    checkpoint moved aside for a re-save); the real kills are in test_kill_9_then_resume_is_exact."""
    out = tmp_path / "run"
    code, stdout, err = train(capsys, model_dir, data, out, "--max-steps", "4", "--stop-after", "2")
    assert code == 0, err
    continue_line = next(line for line in stdout.splitlines() if line.startswith("continue with:"))
    assert continue_line.endswith(" --resume") and "--stop-after" not in continue_line
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    (out / ".tmp-checkpoint-0000003-424242").mkdir()
    (out / ".tmp-checkpoint-0000003-424242" / "trainable.safetensors").write_bytes(b"\0" * 1000)
    os.replace(out / "checkpoint-0000002", out / ".old-checkpoint-0000002-424242")
    code, _, err = train(capsys, model_dir, data, out, "--resume")
    assert code == 0, err
    assert [r["step"] for r in metric_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("checkpoint-0000002")


def test_pruning_deletes_only_this_runs_checkpoints(model_dir, tmp_path):
    """Checkpoints carry their run's id: keep_checkpoints prunes the writing run's own, never
    another run's (probe: a new run's checkpoints were pruned as soon as written, because an older
    run in the folder had gone further)."""
    from sdft_fast.config import TrainConfig
    from sdft_fast.trainer import build_model

    config = TrainConfig(lora_rank=2, device="cpu", max_steps=9)
    model = build_model(model_dir, config)
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(run_id, step):
        state = {"step": step, "run_id": run_id, "config": config.to_dict()}
        checkpoint_module.save_checkpoint(
            tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, config=config,
            trainer_state=state, keep=2,
        )  # fmt: skip

    for step in (7, 8):
        save("old-run", step)
    for step in (1, 2, 3):
        save("new-run", step)
    assert [step for step, _ in checkpoint_steps(tmp_path)] == [2, 3, 7, 8]


# ----------------------------------------------------------------------------- data


def test_huge_row_is_refused_before_tokenizing(capsys, model_dir, data, tmp_path, monkeypatch):
    """Probe: one 50 MB data row was rejected only after 64 s and 4.3 GB spent tokenizing. Now its
    length in characters refuses it before the tokenizer sees it."""
    from sdft_fast import data as data_module

    real_encode = data_module._encode_text

    def bounded(tokenizer, text, add_special_tokens):
        assert len(text) < 1_000_000, "a 50 MB row reached the tokenizer"
        return real_encode(tokenizer, text, add_special_tokens)

    monkeypatch.setattr(data_module, "_encode_text", bounded)
    huge = write_jsonl(
        tmp_path / "huge.jsonl", [ROWS[0], {"prompt": "Q?", "demonstration": "x" * 50_000_000}]
    )
    code, _, err = train(capsys, model_dir, huge, tmp_path / "out", "--max-steps", "1")
    line = one_line_error(err, code)
    assert "huge.jsonl, row 2, field 'demonstration'" in line and "refused before tokenizing" in line


def test_non_utf8_byte_is_named_by_line_and_byte_offset(capsys, model_dir, tmp_path):
    """Probe: a non-UTF-8 byte on line 1001 was reported as "position 5560". Now the line and the
    byte offset in the line and in the file."""
    lines = [json.dumps(ROWS[0]).encode() + b"\n"] * 1000 + [
        b'{"prompt": "caf\xe9?", "demonstration": "x"}\n'
    ]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join(lines))
    code, _, err = run(capsys, "train", "--data", path, "--model", model_dir, "--output-dir", tmp_path / "o")
    line = one_line_error(err, code)
    column = lines[1000].index(b"\xe9")
    offset = sum(len(x) for x in lines[:1000]) + column
    assert f"row 1001: byte {column + 1} of the line (file offset {offset})" in line
    assert "0xe9" in line


def test_overlong_rows_truncated_or_skipped_with_counts(capsys, model_dir, data, tmp_path):
    """--overlong truncate cuts a too-long demonstration to fit (a too-long prompt is skipped);
    --overlong skip leaves both out; the summary counts them; the default names the row."""
    rows = [
        *ROWS,
        {"prompt": "Say it.", "demonstration": "long " * 200},
        {"prompt": "long? " * 100, "demonstration": "x"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    limits = ["--max-prompt-tokens", "120", "--max-teacher-prompt-tokens", "300"]
    code, _, err = train(capsys, model_dir, path, tmp_path / "a", "--max-steps", "1", *limits)
    assert "long.jsonl, row 4, field 'demonstration'" in one_line_error(err, code)
    for mode, truncated, skipped in (("truncate", 1, 1), ("skip", 0, 2)):
        code, _, err = train(
            capsys, model_dir, path, tmp_path / mode, "--max-steps", "1", *limits, "--overlong", mode
        )
        assert code == 0, err
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert (summary["rows_truncated"], summary["rows_skipped"], summary["rows_trained"]) == (
            truncated, skipped, 5 - skipped,
        )  # fmt: skip


# ----------------------------------------------------------------------------- reporting


def test_tensorboard_missing_gives_a_notice(capsys, model_dir, data, tmp_path, monkeypatch):
    """Probe: TensorBoard was on by default, not installed, and nothing said so. Now a notice."""
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    args = [a for a in TINY if a not in ("--report-to", "none")]
    code, _, err = run(
        capsys,
        "train",
        "--data",
        data,
        "--model",
        model_dir,
        "--output-dir",
        tmp_path / "o",
        *args,
        "--max-steps",
        "1",
    )
    assert code == 0, err
    assert "tensorboard package is not installed" in err and "--report-to none" in err


def test_config_file_and_eval_every_rows(capsys, model_dir, data, tmp_path):
    """--config (YAML) sets train flags and the command line overrides it; --eval-data with
    --eval-every writes accuracy, retention and KL rows to metrics.jsonl."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {data}\nmodel: {model_dir}\nmax-steps: 2\nlr: 0.02\nbatch_size: 2\nmax_new_tokens: 3\n"
        "lora-rank: 4\ndevice: cpu\nprogress: false\nreport-to: none\neval-every: 1\n"
        "no-eval-retention: true\neval-max-new-tokens: 2\n"
    )
    questions = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS[:2]]
    )
    out = tmp_path / "run"
    code, _, err = run(
        capsys, "train", "--config", config, "--lr", "0.01", "--output-dir", out, "--eval-data", questions
    )
    assert code == 0, err
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["lr"] == 0.01 and recorded["max_steps"] == 2 and recorded["batch_size"] == 2
    evals = [r for r in metric_rows(out / "metrics.jsonl") if r.get("eval")]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["eval_n"] == 2 and 0 <= r["eval_accuracy"] <= 1 and r["kl_from_start"] >= 0 for r in evals)
    assert "retention_accuracy" not in evals[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    code, _, err = run(capsys, "train", "--config", bad)
    assert "unknown setting 'learning_rate'" in one_line_error(err, code)


def test_merge_writes_a_plain_model_with_the_adapter_in_it(capsys, model_dir, data, tmp_path):
    """`sdft-fast merge`: adapter -> Hugging Face folder whose logits are the adapter model's."""
    from transformers import AutoModelForCausalLM

    from sdft_fast.lora import LoraConfig
    from sdft_fast.model import SelfDistillModel

    out = tmp_path / "run"
    assert train(capsys, model_dir, data, out, "--max-steps", "2", "--lr", "5e-2")[0] == 0
    merged = tmp_path / "merged"
    code, stdout, err = run(
        capsys,
        "merge",
        "--model",
        model_dir,
        "--adapter",
        out / "final",
        "--output-dir",
        merged,
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert str(merged) in stdout
    with_adapter = SelfDistillModel.from_pretrained(
        model_dir, lora=LoraConfig(r=4, alpha=8), teacher="base", device="cpu"
    )
    with_adapter.load_adapter(out / "final")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = with_adapter.hf_model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert (merged / "tokenizer_config.json").is_file()
    code, _, err = run(
        capsys, "merge", "--model", model_dir, "--adapter", out / "final", "--output-dir", merged
    )
    assert "--overwrite-output-dir" in one_line_error(err, code)


# ----------------------------------------------------------------------------- kill -9


def _train_child(args: list[str], kill_at: int) -> None:
    """A forked training process that SIGKILLs itself right after its ``kill_at``-th write of a
    checkpoint file, JSON file or rename (never when kill_at < 0)."""
    torch.set_num_threads(1)
    count = [0]

    def die_after(real):
        def wrapped(*a, **k):
            result = real(*a, **k)
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapped

    checkpoint_module.save_file = die_after(checkpoint_module.save_file)
    checkpoint_module.write_json = die_after(checkpoint_module.write_json)
    os.replace = die_after(os.replace)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - this process ends here
    os._exit(cli.main(args))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_kill_9_then_resume_is_exact(model_dir, data, tmp_path):
    """Goal: kill -9 at random moments (inside checkpoint writes, and at random times while it
    trains), then --resume, until the run completes: the final adapter is bit-identical to an
    uninterrupted run's, metrics.jsonl holds the same rows (timing fields aside), and no temporary
    folder is left. The runs are processes forked from a server that imported torch once."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the forkserver start method")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "torch",
            "transformers.models.llama.modeling_llama",
            "transformers.models.auto.tokenization_auto",
            "sdft_fast.cli",
            "sdft_fast.commands",
            "sdft_fast.run",
            "sdft_fast.default_model",
        ]
    )
    rng = random.Random(11)

    def start(out, *extra, kill_at=-1):
        args = ["train", "--data", data, "--model", model_dir, "--output-dir", out, *TINY]
        args += ["--max-steps", "5", "--save-every", "1", *extra]
        process = context.Process(target=_train_child, args=([str(a) for a in args], kill_at))
        process.start()
        return process

    def finish(process) -> int:
        process.join(timeout=300)
        return process.exitcode

    straight = tmp_path / "straight"
    assert finish(start(straight)) == 0
    out = tmp_path / "killed"
    kills, attempts = 0, 0
    # A checkpoint makes ~11 writes (4 safetensors, 5 JSON files, the manifest, renames): kill
    # inside the first checkpoints at random writes, then at random times during the steps.
    plans = [("write", rng.randrange(1, 25)) for _ in range(3)] + [
        ("delay", rng.uniform(0.0, 0.3)) for _ in range(2)
    ]
    while attempts < 12:
        attempts += 1
        extra = ["--resume"] if checkpoint_steps(out) else ["--overwrite-output-dir"]
        kind, when = plans.pop(0) if plans else ("none", 0)
        rows_before = len(_lines(out / "metrics.jsonl"))
        process = start(out, *extra, kill_at=when if kind == "write" else -1)
        if kind == "delay":
            # Once the run trains (a new metrics row), a kill at a random moment of the next steps.
            while process.is_alive() and len(_lines(out / "metrics.jsonl")) <= rows_before:
                time.sleep(0.005)
            time.sleep(when)
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        code = finish(process)
        if code == -signal.SIGKILL:
            kills += 1
            continue
        assert code == 0, f"attempt {attempts} ({kind} {when}) exited {code}"
        if not plans:
            break
    assert kills >= 3, f"only {kills} kills landed"
    assert (out / "final").is_dir(), "the run never completed"
    assert snapshot(out / "final") == snapshot(straight / "final")  # bit-identical adapter
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(metric_rows(out / "metrics.jsonl")) == strip(metric_rows(straight / "metrics.jsonl"))
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_loss_refuses_a_nan_lm_head_weight():
    """Probe: NaN in the LM head weight was not caught by the loss (only the hidden states were)."""
    from sdft_fast.loss import self_distill_loss

    hidden = torch.randn(4, 8)
    weight = torch.randn(16, 8)
    weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"lm_head_weight .* contains 1 NaN/inf values"):
        self_distill_loss(hidden, hidden.clone(), weight)
