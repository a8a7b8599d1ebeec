"""Several ranks, one run: 2 gloo ranks (forked CPU processes) on a tiny random Llama against one
process on the same global batch; resume; agreement checks; launcher detection."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_ranks, tiny_training_setup

from sdft_fast.config import TrainConfig
from sdft_fast.distributed import Launch, Ranks, SameOnEveryRank, check_run_agrees
from sdft_fast.run import train
from sdft_fast.run_dir import LOCK_FILE
from sdft_fast.trainer import build_model

ROWS = [{"prompt": f"Where is place {i}?", "demonstration": f"Place {i} lies in land {i}."} for i in range(6)]
STEPS = 4
STOP = 3  # mid-way through the second batch of rollouts (num_iterations=2): pending rollouts saved


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return (root, *tiny_training_setup(root, ROWS))


def lora_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        batch_size=2,  # per rank
        grad_accum=1,
        num_iterations=2,  # importance ratios, and rollouts pending across a checkpoint
        max_steps=STEPS,
        max_new_tokens=6,
        skip_tokens=1,
        lr=5e-3,
        warmup_steps=1,
        lora_rank=4,
        device="cpu",
        progress=False,
        report_to="none",
        output_dir=None if output_dir is None else str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_lora_ranks(rank, world_size, setup):
    root, model_dir, tokenizer, encoded = setup
    ranks = Ranks()
    out = {}
    # A setting that differs on one rank ends the job on every rank with one message.
    try:
        check_run_agrees(
            ranks, build_model(model_dir, lora_config(None)), encoded, lora_config(None, lr=1e-3 * (1 + rank))
        )
        out["mismatch"] = None
    except SameOnEveryRank as error:
        out["mismatch"] = str(error)
    # A setup step that fails on one rank fails on all at once (not at the next collective's timeout);
    # the same failure on every rank becomes one message.
    try:
        with ranks.together("loading the data"):
            if rank == 1:
                raise FileNotFoundError("facts.jsonl: no such file")
        out["one_failed"] = None
    except Exception as error:  # noqa: BLE001 - the test looks at which error each rank got
        out["one_failed"] = f"{type(error).__name__}: {error}"
    try:
        with ranks.together("loading the data"):
            raise ValueError("facts.jsonl row 3: field 'prompt' is missing")
    except SameOnEveryRank as error:
        out["all_failed"] = str(error)

    model = build_model(model_dir, lora_config(None))
    result = train(model, tokenizer, encoded, lora_config(root / "two_ranks"))
    out["adapter"], out["teacher"] = model.trainable_state_dict(), model.teacher_state_dict()
    out["rows"] = result.metrics

    stopped = build_model(model_dir, lora_config(None))
    train(stopped, tokenizer, encoded, lora_config(root / "two_ranks_resumed"), stop_after=STOP)
    resumed = build_model(model_dir, lora_config(None))
    train(resumed, tokenizer, encoded, lora_config(root / "two_ranks_resumed"), resume_from="latest")
    out["resumed_adapter"], out["resumed_teacher"] = (
        resumed.trainable_state_dict(),
        resumed.teacher_state_dict(),
    )

    sft = build_model(model_dir, lora_config(None))
    train(sft, tokenizer, encoded, lora_config(None, method="sft", num_iterations=1))
    out["sft_adapter"] = sft.trainable_state_dict()
    return out


@pytest.fixture(scope="module")
def lora_runs(setup):
    root, model_dir, tokenizer, encoded = setup
    per_rank = run_ranks(run_lora_ranks, 2, root, setup)
    # One process on the same global batch: 2 ranks x 1 micro-batch = 2 micro-batches.
    model = build_model(model_dir, lora_config(None))
    result = train(model, tokenizer, encoded, lora_config(root / "one_process", grad_accum=2))
    sft = build_model(model_dir, lora_config(None))
    train(sft, tokenizer, encoded, lora_config(None, method="sft", num_iterations=1, grad_accum=2))
    return per_rank, {
        "sft_adapter": sft.trainable_state_dict(),
        "adapter": model.trainable_state_dict(),
        "teacher": model.teacher_state_dict(),
        "rows": result.metrics,
    }


def assert_close(ours: dict, reference: dict, rel: float, what: str) -> None:
    assert ours.keys() == reference.keys()
    for name, ref in reference.items():
        err = ((ours[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= rel, f"{what}: {name} differs by {err:.2e} (relative)"


def test_two_ranks_train_the_adapter_one_process_trains_on_the_same_global_batch(lora_runs):
    per_rank, one = lora_runs
    moved = max(t.abs().max().item() for name, t in one["adapter"].items() if name.endswith("lora_B"))
    assert moved > 0, "the adapter did not train: the comparison would be vacuous"
    for rank, out in enumerate(per_rank):
        assert_close(out["adapter"], one["adapter"], 1e-5, f"rank {rank} adapter")
        assert_close(out["teacher"], one["teacher"], 1e-5, f"rank {rank} EMA teacher")
        assert_close(out["sft_adapter"], one["sft_adapter"], 1e-5, f"rank {rank} SFT adapter")
    # Metrics are the whole step's: the global sequence count, the global mean loss.
    for row_two, row_one in zip(per_rank[0]["rows"], one["rows"], strict=True):
        assert row_two["sequences_counted"] == row_one["sequences_counted"] == 4
        assert row_two["completion_tokens"] == row_one["completion_tokens"]
        for key in ("loss", "divergence", "grad_norm"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-5), key


def test_every_rank_holds_the_same_adapter_and_ema_teacher(lora_runs):
    per_rank, _ = lora_runs
    for key in ("adapter", "teacher"):
        for name, tensor in per_rank[0][key].items():
            assert torch.equal(tensor, per_rank[1][key][name]), f"{key} {name} differs between ranks"


def test_resume_after_a_stop_mid_run_equals_the_uninterrupted_run(lora_runs):
    per_rank, _ = lora_runs
    for out in per_rank:
        assert_close(out["resumed_adapter"], out["adapter"], 1e-6, "resumed adapter")
        assert_close(out["resumed_teacher"], out["teacher"], 1e-6, "resumed EMA teacher")


def test_only_rank_0_writes_metrics_and_checkpoints(setup, lora_runs):
    root = setup[0]
    lines = (root / "two_ranks" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))  # not one copy per rank
    state = json.loads((root / "two_ranks" / "checkpoint-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    resumed_lines = (root / "two_ranks_resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(resumed_lines) == STEPS
    leftovers = [p.name for p in (root / "two_ranks").iterdir() if p.name.startswith(".")]
    assert leftovers == [LOCK_FILE]  # rank 0's lock on the folder, nothing else hidden


def test_a_setting_that_differs_across_ranks_is_named_on_every_rank(lora_runs):
    per_rank, _ = lora_runs
    for out in per_rank:
        assert out["mismatch"] is not None
        assert "lr (rank 0: 0.001, rank 1: 0.002)" in out["mismatch"]
        assert "seed" not in out["mismatch"]  # only what differs


def test_a_setup_failure_on_one_rank_ends_every_rank(lora_runs):
    per_rank, _ = lora_runs
    assert per_rank[1]["one_failed"] == "FileNotFoundError: facts.jsonl: no such file"
    assert per_rank[0]["one_failed"] == (
        "RankLost: rank 0: stopping because rank 1 failed while loading the data: "
        "FileNotFoundError: facts.jsonl: no such file"
    )
    for out in per_rank:
        assert out["all_failed"] == "facts.jsonl row 3: field 'prompt' is missing"


def test_resume_needs_the_same_micro_batches_per_step(setup, lora_runs):
    root, model_dir, tokenizer, encoded = setup
    model = build_model(model_dir, lora_config(None))
    with pytest.raises(ValueError, match=r"grad_accum=1 on 2 rank\(s\), this run has grad_accum=1 on 1"):
        train(model, tokenizer, encoded, lora_config(root / "two_ranks_resumed"), resume_from="latest")


def test_launch_is_read_from_torchrun_and_accelerate_variables():
    assert Launch.from_environment({}) == Launch(0, 1, 0, "none")
    assert Launch.from_environment({"WORLD_SIZE": "1", "RANK": "0"}) == Launch(0, 1, 0, "none")
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert Launch.from_environment({**torchrun, "TORCHELASTIC_RUN_ID": "x"}) == Launch(3, 4, 1, "torchrun")
    assert (
        Launch.from_environment({**torchrun, "ACCELERATE_MIXED_PRECISION": "no"}).launcher
        == "accelerate launch"
    )
    with pytest.raises(ValueError, match="not LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        Launch.from_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="do not describe a rank"):
        Launch.from_environment({**torchrun, "RANK": "4"})


def test_one_process_needs_no_process_group():
    ranks = Ranks()
    assert (ranks.rank, ranks.world_size, ranks.is_main) == (0, 1, True)
    assert ranks.share([1, 2, 3]) == [1, 2, 3] and ranks.sum([2, 5]) == [2, 5]


def cli_rank_killed_after_checkpoint_2(rank, world_size, data, model_dir, out):
    """`sdft-fast train` as torchrun would start it (RANK, WORLD_SIZE, ... set; the group already
    joined here); rank 1 is killed once checkpoint 2 exists."""
    import contextlib
    import io
    import os
    import signal
    import threading
    import time

    from sdft_fast.checkpoint import latest_checkpoint
    from sdft_fast.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="-", MASTER_PORT="0")
    if rank == 1:

        def kill_after_checkpoint_2():
            while (found := latest_checkpoint(out)) is None or int(found.name.split("-")[1]) < 2:
                time.sleep(0.05)
            (out / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=kill_after_checkpoint_2, daemon=True).start()
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out)]
    argv += ["--device", "cpu", "--batch-size", "2", "--max-steps", "1000", "--max-new-tokens", "6"]
    argv += ["--lora-rank", "4", "--save-every", "1", "--no-progress", "--report-to", "none"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue(), time.time()


def test_a_killed_rank_ends_the_others_with_one_clear_line_and_keeps_the_checkpoints(setup, tmp_path):
    from sdft_fast.checkpoint import latest_checkpoint

    _, model_dir, _, _ = setup
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "run"
    args = (data, model_dir, out)
    code, stderr, ended = run_ranks(cli_rank_killed_after_checkpoint_2, 2, tmp_path, *args, timeout_s=90)[0]
    assert code == 1
    assert ended - float((out / "killed_at").read_text()) < 60
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("sdft-fast train: error: rank 0 of 2:"), stderr[-2000:]
    assert "resume with --resume" in lines[-1] and "Traceback" not in stderr
    checkpoint = latest_checkpoint(out)  # complete: trainer_state.json is written last
    assert int(checkpoint.name.split("-")[1]) >= 2
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def hang_rank_1(rank, world_size, setup):
    import os
    import signal

    from sdft_fast.distributed import RankLost

    root, model_dir, tokenizer, encoded = setup

    def stop_rank_1(model, step):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # hung, not dead: its sockets stay open
        return {}

    try:
        train(
            build_model(model_dir, lora_config(None)),
            tokenizer,
            encoded,
            lora_config(None, eval_every=1, max_steps=5),
            eval_fn=stop_rank_1,
        )
    except RankLost as error:
        return str(error)
    return None


def test_a_hung_rank_ends_the_others_after_the_collective_timeout(setup):
    # Rank 1 stops (SIGSTOP) at step 2 and never ends by itself: run_ranks kills it once rank 0 returned.
    per_rank = run_ranks(hang_rank_1, 2, setup[0], setup, timeout_s=60, group_timeout_s=3, wait_for=[0])
    message = per_rank[0]
    assert message is not None, "rank 0 finished the run although rank 1 hung"
    assert message.startswith("rank 0 of 2:") and "resume with --resume" in message
    # Ended by the group's 3 s collective timeout (gloo names it), not by run_ranks' 60 s kill.
    assert "Timed out waiting 3000ms" in message
