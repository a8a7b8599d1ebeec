"""Full fine-tuning sharded with FSDP2 on 2 gloo ranks (forked CPU processes), against one process
on the same global batch; DCP checkpoints: resume, and a 2-rank checkpoint resumed by one process."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import run_ranks, tiny_training_setup
from torch.distributed.tensor import DTensor

from sdft_fast.config import TrainConfig
from sdft_fast.model import SelfDistillModel
from sdft_fast.run import train
from sdft_fast.sharded_checkpoint import is_sharded_checkpoint
from sdft_fast.trainer import build_model

ROWS = [
    {"prompt": f"Who wrote book {i}?", "demonstration": f"Book {i} was written by Ann {i}."} for i in range(6)
]
STEPS = 3
STOP = 2


def full_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        lora_rank=0,  # full fine-tuning: FSDP2 on several ranks
        teacher="ema",
        batch_size=2,  # per rank
        grad_accum=1,
        num_iterations=2,
        max_steps=STEPS,
        max_new_tokens=6,
        skip_tokens=1,
        lr=1e-3,
        warmup_steps=1,
        device="cpu",
        progress=False,
        report_to="none",
        output_dir=None if output_dir is None else str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective for a sharded model)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.hf_model.named_parameters()
    }


def run_fsdp_ranks(rank, world_size, root, model_dir, tokenizer, encoded):
    out = {}
    model = build_model(model_dir, full_config(None))
    result = train(model, tokenizer, encoded, full_config(root / "two_ranks"))
    out["weights"], out["rows"] = full_weights(model), result.metrics
    out["teacher"] = {name: shard.full_tensor() for name, shard in model.teacher_state_dict().items()}
    local = next(iter(model.hf_model.parameters())).to_local()
    out["local_rows"] = local.shape[0]  # a shard, not the whole embedding

    stopped = build_model(model_dir, full_config(None))
    train(stopped, tokenizer, encoded, full_config(root / "two_ranks_stopped"), stop_after=STOP)
    resumed = build_model(model_dir, full_config(None))
    train(resumed, tokenizer, encoded, full_config(root / "two_ranks_stopped"), resume_from="latest")
    out["resumed"] = full_weights(resumed)

    # A rank with nothing to score (its rollouts come back empty) still joins every FSDP2 pass.
    if rank == 1:
        SelfDistillModel.generate = lambda self, prompts, **kwargs: [[] for _ in prompts]
    idle = build_model(model_dir, full_config(None))
    rows = train(idle, tokenizer, encoded, full_config(None)).metrics
    out["idle_rows"], out["idle_weights"] = rows, full_weights(idle)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    model_dir, tokenizer, encoded = tiny_training_setup(root, ROWS)
    per_rank = run_ranks(run_fsdp_ranks, 2, root, root, model_dir, tokenizer, encoded)
    # One process on the same global batch, on the same scoring path (the generic two-pass one:
    # FSDP2 gathers weights through module hooks, the packed path reads them directly).
    model = build_model(model_dir, full_config(None))
    model._use_fast_path = lambda lengths: False
    result = train(model, tokenizer, encoded, full_config(root / "one_process", grad_accum=2))
    one = {"weights": full_weights(model), "teacher": model.teacher_state_dict(), "rows": result.metrics}
    start = full_weights(build_model(model_dir, full_config(None)))
    return root, model_dir, tokenizer, encoded, per_rank, one, start


def rel_err(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys()
    return max(
        ((ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for k, v in reference.items()
    )


def test_two_sharded_ranks_train_the_weights_one_process_trains(runs):
    _, _, _, _, per_rank, one, start = runs
    assert rel_err(one["weights"], start) > 1e-3, "the weights did not move: the comparison would be vacuous"
    for rank, out in enumerate(per_rank):
        assert out["local_rows"] < start["model.embed_tokens.weight"].shape[0], "parameters are not sharded"
        assert rel_err(out["weights"], one["weights"]) <= 1e-5, f"rank {rank} weights"
        assert rel_err(out["teacher"], one["teacher"]) <= 1e-5, f"rank {rank} EMA teacher"
    for row_two, row_one in zip(per_rank[0]["rows"], one["rows"], strict=True):
        assert row_two["sequences_counted"] == row_one["sequences_counted"] == 4
        assert row_two["loss"] == pytest.approx(row_one["loss"], rel=1e-5)


def test_sharded_resume_after_a_stop_equals_the_uninterrupted_run(runs):
    _, _, _, _, per_rank, _, _ = runs
    for out in per_rank:
        assert rel_err(out["resumed"], out["weights"]) <= 1e-6


def test_a_checkpoint_written_by_two_ranks_resumes_in_one_process(runs):
    root, model_dir, tokenizer, encoded, per_rank, one, _ = runs
    checkpoint = root / "two_ranks_stopped" / f"checkpoint-{STOP:07d}"
    assert is_sharded_checkpoint(checkpoint)
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    folder = root / "one_from_two"
    shutil.copytree(root / "two_ranks_stopped", folder)
    model = build_model(model_dir, full_config(None))
    model._use_fast_path = lambda lengths: False
    # The same micro-batches per step: one process, grad_accum 2.
    train(model, tokenizer, encoded, full_config(folder, grad_accum=2), resume_from=folder / checkpoint.name)
    assert rel_err(full_weights(model), one["weights"]) <= 1e-5


def test_the_final_folder_holds_the_whole_trained_model(runs):
    from transformers import AutoModelForCausalLM

    root, _, _, _, per_rank, _, _ = runs
    final = AutoModelForCausalLM.from_pretrained(root / "two_ranks" / "final")
    assert rel_err(dict(final.named_parameters()), per_rank[0]["weights"]) == 0.0


def test_a_rank_with_nothing_to_score_joins_every_pass(runs):
    _, _, _, _, per_rank, _, _ = runs
    rows = per_rank[0]["idle_rows"]
    assert len(rows) == STEPS and all(row["sequences_counted"] == 2 for row in rows)  # rank 0's only
    for name, tensor in per_rank[0]["idle_weights"].items():
        assert torch.equal(tensor, per_rank[1]["idle_weights"][name])
