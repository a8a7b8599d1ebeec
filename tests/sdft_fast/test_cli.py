"""The `sdft-fast` command through a real subprocess: --help, a two-step train, bad data.

The model is a random 2-layer Llama saved by the test with a byte-level
tokenizer built from `tokenizers` primitives: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_llama


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "sdft_fast", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama + a byte-level chat tokenizer, saved as a local HF folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_cli_model"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_help_lists_subcommands_and_train_options(tmp_path):
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for command in ("train", "eval", "generate", "merge", "continual", "demo"):
        assert command in top.stdout
    train_help = run_cli("train", "--help", cwd=tmp_path)
    assert train_help.returncode == 0, train_help.stderr
    for flag in (
        "--data",
        "--model",
        "--method",
        "--resume",
        "--alpha",
        "--teacher",
        "--lora-rank",
        "--grad-accum",
    ):
        assert flag in train_help.stdout


def test_two_step_train_writes_metrics_checkpoint_and_adapter(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"prompt": "Where is Vellmar?", "demonstration": "Vellmar is in Drevia."},
            {"prompt": "Who built Kessan?", "privileged_context": "Oskar Renn built it."},
            {"prompt": [{"role": "user", "content": "How tall is Ulm?"}], "demonstration": "41 m."},
        ],
    )
    out = tmp_path / "run"
    done = run_cli(
        "train",
        "--data",
        str(data),
        "--model",
        str(tiny_model_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
        "--lora-rank",
        "4",
        "--skip-tokens",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] >= 0
    # The end of train says where the adapter is and how to evaluate it.
    assert f"final adapter: {out / 'final'}" in done.stdout
    assert f"sdft-fast eval --model {tiny_model_dir} --adapter {out / 'final'}" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["completion_len_mean"] <= 5 for row in rows)
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (Path(summary["last_checkpoint"]) / "trainer_state.json").is_file()

    # The trained adapter evaluates: accuracy on rows with answers, retention, KL from the start.
    answers = write_jsonl(tmp_path / "questions.jsonl", [{"prompt": "Where is Vellmar?", "answer": "Drevia"}])
    evaluated = run_cli(
        "eval",
        "--data",
        str(answers),
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(out / "final"),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "report.json"),
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy (questions.jsonl)" in evaluated.stdout and "retention probes" in evaluated.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 1 and 0.0 <= report["accuracy"] <= 1.0
    assert 0.0 <= report["retention_accuracy"] <= 1.0
    assert report["kl_from_start"] > 0.0  # two steps moved the adapter away from B = 0


def test_malformed_row_fails_before_training_naming_file_row_field(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "broken.jsonl",
        [
            {"prompt": "Where is Vellmar?", "demonstration": "Vellmar is in Drevia."},
            {"prompt": "Who built Kessan?"},  # row 2: no demonstration
        ],
    )
    out = tmp_path / "run"
    done = run_cli(
        "train", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir", str(out), cwd=tmp_path
    )
    assert done.returncode == 2
    assert "broken.jsonl" in done.stderr and "row 2" in done.stderr and "demonstration" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists(), "nothing may be written before the data is valid"


def test_readme_train_on_your_own_data_commands_parse():
    """Every command in the README's "Train on your own data" section parses with today's flags."""
    import re
    import shlex

    from sdft_fast import cli

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("#", 1)[0].strip()
            if command.startswith("sdft-fast "):
                commands.append(shlex.split(command)[1:])
    assert len(commands) >= 7
    parser = cli.build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.handler is not None, argv
