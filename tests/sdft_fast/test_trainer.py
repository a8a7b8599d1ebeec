"""The training loop on a tiny random Llama: rollout, loss, step, EMA, checkpoint, resume, eval.

Everything is built offline: a 2-layer Llama with a 259-token byte-level
vocabulary and a tokenizer made from `tokenizers` primitives (every byte is a
token, plus three chat specials), so no test downloads anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_llama

from sdft_fast import checkpoint as checkpoint_module
from sdft_fast import trainer as trainer_module
from sdft_fast.checkpoint import latest_checkpoint
from sdft_fast.config import TrainConfig
from sdft_fast.data import (
    DEFAULT_TEACHER_TEMPLATE,
    DataLimits,
    EncodedExample,
    encode_examples,
    load_examples,
)
from sdft_fast.rollouts import teacher_rollout_mask
from sdft_fast.run import train
from sdft_fast.schedule import planned_steps
from sdft_fast.trainer import build_model

ROWS = [
    {"prompt": "Where is Vellmar?", "demonstration": "Vellmar is in Drevia.", "answer": "Drevia"},
    {"prompt": "Who built Kessan?", "demonstration": "Oskar Renn built it.", "answer": "Oskar Renn"},
    {"prompt": "How tall is Ulm?", "demonstration": "Ulm is 41 m tall.", "answer": "41"},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tokenizer) -> list[EncodedExample]:
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return encode_examples(
        load_examples(path),
        tokenizer,
        limits=DataLimits(max_prompt_tokens=128, max_teacher_prompt_tokens=512, max_completion_tokens=64),
        teacher_template=DEFAULT_TEACHER_TEMPLATE,
    )


def tiny_config(tmp_path: Path | None, **overrides) -> TrainConfig:
    values = dict(
        batch_size=2,
        max_steps=4,
        max_new_tokens=6,
        skip_tokens=1,
        lr=5e-3,
        warmup_steps=1,
        lora_rank=4,
        device="cpu",
        progress=False,
        report_to="none",
        output_dir=None if tmp_path is None else str(tmp_path),
    )
    values.update(overrides)
    return TrainConfig(**values)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def teacher_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in (model.teacher_state_dict() or {}).items()}


def test_whole_loop_rollout_loss_step_ema_checkpoint_eval(tiny_model_dir, tokenizer, encoded, tmp_path):
    config = tiny_config(tmp_path, max_steps=2, save_every=1, grad_accum=2)
    model = build_model(tiny_model_dir, config)
    student_before = snapshot(model)
    teacher_before = teacher_snapshot(model)
    eval_calls = []

    def eval_fn(m, step):
        eval_calls.append(step)
        return {"probe": 1.0}

    result = train(model, tokenizer, encoded, config, eval_fn=eval_fn)

    assert result.steps == 2 and not result.stopped_early
    # The student moved, and the EMA teacher moved towards it but not all the way.
    student_after = snapshot(model)
    assert any(not torch.equal(student_before[k], student_after[k]) for k in student_before)
    teacher_after = teacher_snapshot(model)
    assert teacher_after, "an EMA teacher must have state to checkpoint"
    assert any(not torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    ema_pairs = [(k, k.replace(".ema_", ".lora_")) for k in teacher_after]
    assert all(s in student_after for _, s in ema_pairs)
    assert any(not torch.equal(teacher_after[t], student_after[s]) for t, s in ema_pairs)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        for key in ("loss", "divergence", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"):
            assert math.isfinite(row[key]), key
        assert 1 <= row["completion_len_mean"] <= config.max_new_tokens
        assert row["loss"] >= 0
    # warmup 1 step: the first step runs at half the peak, the second at the peak of the cosine.
    assert train_rows[0]["lr"] == pytest.approx(config.lr / 2)
    assert eval_calls == [2] and rows[-1]["eval"] and rows[-1]["probe"] == 1.0

    # keep_checkpoints=2 of the saves at steps 1 and 2; the newest is complete and loadable.
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name.endswith("0000002")
    for name in (
        "trainable.safetensors",
        "teacher.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng.safetensors",
        "rng.json",
        "trainer_state.json",
    ):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"] == {"epoch": 2, "position": 2}  # 8 prompts, 3 examples
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "num_iterations, num_generations, rollout_source",
    [(1, 1, "student"), (2, 1, "student"), (1, 2, "student"), (2, 1, "mix"), (1, 1, "teacher")],
)
def test_resume_continues_exactly(
    tiny_model_dir, tokenizer, encoded, tmp_path, num_iterations, num_generations, rollout_source
):
    """4 steps in one go == 2 steps, stop, resume from the checkpoint, 2 more (stop lands mid-pass
    for num_iterations=2 only at odd steps; 2 lands on a fresh rollout, so also test stop at 1).
    num_generations=2: two rollouts of one prompt per step, the data cursor moving one prompt a step.
    mix / teacher: rollouts (partly) sampled under the teacher prompt, the mix drawn per step."""
    stop = 1 if num_iterations == 2 else 2
    knobs = dict(
        num_iterations=num_iterations, num_generations=num_generations, rollout_source=rollout_source
    )
    straight = build_model(tiny_model_dir, tiny_config(None, **knobs))
    straight_result = train(straight, tokenizer, encoded, tiny_config(None, **knobs))

    config = tiny_config(tmp_path, **knobs)
    first = build_model(tiny_model_dir, config)
    first_result = train(first, tokenizer, encoded, config, stop_after=stop)
    assert first_result.stopped_early and first_result.steps == stop
    del first
    resumed = build_model(tiny_model_dir, config)
    if num_generations > 1:
        state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
        assert state["data"] == {"epoch": 0, "position": stop * config.prompts_per_step}
    resumed_result = train(resumed, tokenizer, encoded, config, resume_from="latest")
    assert resumed_result.steps == 4

    # fp32 resume is exact: the same bits, not merely close ones.
    for key, value in snapshot(straight).items():
        assert torch.equal(snapshot(resumed)[key], value), key
    for key, value in teacher_snapshot(straight).items():
        assert torch.equal(teacher_snapshot(resumed)[key], value), key
    straight_losses = [r["loss"] for r in straight_result.metrics]
    resumed_losses = [r["loss"] for r in first_result.metrics + resumed_result.metrics]
    assert resumed_losses == straight_losses
    if num_iterations == 2:
        # The second pass over a batch of rollouts is importance-weighted.
        assert "importance_ratio" in straight_result.metrics[1]
        assert 0 < straight_result.metrics[1]["importance_ratio"] <= 2.0


def test_sft_lowers_cross_entropy_on_demonstrations(tiny_model_dir, tokenizer, encoded):
    config = tiny_config(None, method="sft", batch_size=3, max_steps=8, lr=1e-2, warmup_steps=0, lora_rank=0)
    model = build_model(tiny_model_dir, config)
    result = train(model, tokenizer, encoded, config)
    losses = [r["loss"] for r in result.metrics]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0]
    assert "divergence" not in result.metrics[0]


def test_full_finetuning_with_base_teacher_trains_all_weights(tiny_model_dir, tokenizer, encoded):
    config = tiny_config(None, lora_rank=0, teacher="base", max_steps=1)
    model = build_model(tiny_model_dir, config)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == sum(p.numel() for p in model.hf_model.parameters())
    before = snapshot(model)
    train(model, tokenizer, encoded, config)
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_examples_fail_before_any_model_work(tiny_model_dir, tokenizer, encoded):
    config = tiny_config(None)
    model = build_model(tiny_model_dir, config)
    before = snapshot(model)
    broken = list(encoded)
    broken[1] = EncodedExample(
        student_prompt_ids=[],
        teacher_prompt_ids=broken[1].teacher_prompt_ids,
        demonstration_ids=broken[1].demonstration_ids,
        answers=None,
        row=7,
        source="facts.jsonl",
    )
    with pytest.raises(ValueError, match=r"facts\.jsonl row 7.*prompt"):
        train(model, tokenizer, broken, config)
    with pytest.raises(ValueError, match="no training examples"):
        train(model, tokenizer, [], config)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_crash_during_save_keeps_last_good_checkpoint(
    tiny_model_dir, tokenizer, encoded, tmp_path, monkeypatch
):
    config = tiny_config(tmp_path, max_steps=2, save_every=1)
    model = build_model(tiny_model_dir, config)
    real_save_file = checkpoint_module.save_file
    calls = {"n": 0}

    def failing_save_file(tensors, filename, *args, **kwargs):
        # Let the whole step-1 checkpoint through, then fail inside the step-2 save.
        calls["n"] += 1
        if Path(filename).name == "optimizer.safetensors" and calls["n"] > 5:
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        train(model, tokenizer, encoded, config)
    good = latest_checkpoint(tmp_path)
    assert good is not None and good.name.endswith("0000001")
    assert json.loads((good / "trainer_state.json").read_text())["step"] == 1
    assert not list(tmp_path.glob(".tmp-*"))
    # ...and training resumes from it.
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)
    resumed = build_model(tiny_model_dir, config)
    assert train(resumed, tokenizer, encoded, config, resume_from="latest").steps == 2


def test_num_generations_samples_each_prompt_several_times(tiny_model_dir, tokenizer, encoded, monkeypatch):
    """A step of batch 4 with num_generations=2 trains 4 rollouts of 2 prompts: the copies of a prompt
    are adjacent, draw different completions (one seed per micro-batch, independent rows), and the
    data cursor advances by prompts, so an epoch is still one pass over the prompts."""
    seen = []
    real_sample = trainer_module.Trainer._sample

    def recording_sample(self, indices):
        rollouts = real_sample(self, indices)
        seen.append((list(indices), [list(c) for c in rollouts.completions]))
        return rollouts

    monkeypatch.setattr(trainer_module.Trainer, "_sample", recording_sample)
    config = tiny_config(None, batch_size=4, num_generations=2, max_steps=None, epochs=2.0, max_new_tokens=12)
    assert planned_steps(len(encoded), config) == 3  # 3 prompts x 2 epochs / 2 per step
    model = build_model(tiny_model_dir, config)
    result = train(model, tokenizer, encoded, config)
    assert result.steps == 3 and len(seen) == 3
    prompts_used = []
    for indices, completions in seen:
        assert len(indices) == 4 and indices[0] == indices[1] and indices[2] == indices[3]
        prompts_used += indices[::2]
        assert completions[0] != completions[1] or completions[2] != completions[3]
    assert sorted(prompts_used) == [0, 0, 1, 1, 2, 2]  # every prompt once per epoch
    assert all(row["completion_tokens"] > 0 for row in result.metrics)


def _record_generate(model, calls):
    """Wrap ``model.generate`` to record the prompts of each call."""
    real_generate = model.generate

    def recording_generate(prompts, **kwargs):
        calls.append([list(p) for p in prompts])
        return real_generate(prompts, **kwargs)

    model.generate = recording_generate


@pytest.mark.parametrize("rollout_source", ["student", "teacher"])
def test_rollouts_are_sampled_under_the_prompt_the_source_names(
    tiny_model_dir, tokenizer, encoded, rollout_source
):
    config = tiny_config(None, max_steps=3, rollout_source=rollout_source)
    model = build_model(tiny_model_dir, config)
    calls = []
    _record_generate(model, calls)
    result = train(model, tokenizer, encoded, config)
    teacher_prompts = [e.teacher_prompt_ids for e in encoded]
    student_prompts = [e.student_prompt_ids for e in encoded]
    expected = teacher_prompts if rollout_source == "teacher" else student_prompts
    assert len(calls) == 3
    assert all(prompt in expected for call in calls for prompt in call)
    assert all(teacher != student for teacher, student in zip(teacher_prompts, student_prompts))
    counts = [row["teacher_rollouts"] for row in result.metrics]
    assert counts == ([2, 2, 2] if rollout_source == "teacher" else [0, 0, 0])


def test_mix_samples_its_fraction_under_the_teacher_prompt(tiny_model_dir, tokenizer, encoded):
    """Per step: floor or ceil of fraction x batch rows, the teacher rows exactly those sampled under a
    teacher prompt; the choice is a function of (seed, step), so it repeats and it varies over steps."""
    config = tiny_config(None, max_steps=4, batch_size=4, rollout_source="mix", teacher_rollout_fraction=0.3)
    model = build_model(tiny_model_dir, config)
    calls = []
    _record_generate(model, calls)
    result = train(model, tokenizer, encoded, config)
    teacher_prompts = [e.teacher_prompt_ids for e in encoded]
    for step, (call, row) in enumerate(zip(calls, result.metrics)):
        mask = teacher_rollout_mask(config, step, 4)
        assert mask == teacher_rollout_mask(config, step, 4)
        assert sum(mask) in (1, 2) and row["teacher_rollouts"] == sum(mask)
        assert [prompt in teacher_prompts for prompt in call] == mask

    # Over many steps the fraction is the one asked for: each step's count is floor(f n) + Bernoulli(frac),
    # so the mean over S steps has standard deviation sqrt(p (1 - p) / S) / n; allow 5 of them.
    steps, count = 4000, 8
    for fraction in (0.3, 0.5, 0.9):
        mix = tiny_config(None, rollout_source="mix", teacher_rollout_fraction=fraction, batch_size=count)
        masks = [teacher_rollout_mask(mix, step, count) for step in range(steps)]
        mean = sum(map(sum, masks)) / (steps * count)
        p = fraction * count - math.floor(fraction * count)
        assert abs(mean - fraction) <= 5 * math.sqrt(p * (1 - p) / steps) / count + 1e-12, (fraction, mean)
        assert all(any(mask[i] for mask in masks) for i in range(count))  # every row is sometimes chosen


def test_teacher_rollouts_get_no_importance_weight(tiny_model_dir, tokenizer, encoded):
    """With several passes over one batch, student rollouts are reweighted by the drift of the student
    since sampling; teacher-prompt rollouts are off-policy by design and keep weight 1 (as in TRL)."""
    ratios = {}
    for source in ("student", "teacher"):
        config = tiny_config(None, max_steps=2, num_iterations=2, lr=5e-2, rollout_source=source)
        model = build_model(tiny_model_dir, config)
        ratios[source] = train(model, tokenizer, encoded, config).metrics[1]["importance_ratio"]
    assert ratios["teacher"] == 1.0
    assert ratios["student"] != 1.0


def test_rollout_model_teacher_samples_with_the_teacher_weights(tiny_model_dir, tokenizer, encoded):
    """rollout_model='teacher' with a frozen base teacher: every rollout is the base model's own sample
    (the same seeded draw as the untrained model's), however far the student has moved; with
    num_iterations 2 the teacher-weight rollouts take importance ratio 1."""
    config = tiny_config(
        None, max_steps=4, lr=5e-2, teacher="base", rollout_model="teacher", num_iterations=2
    )
    model = build_model(tiny_model_dir, config)
    seen = []
    real_generate = model.generate

    def recording_generate(prompts, **kwargs):
        out = real_generate(prompts, **kwargs)
        seen.append((prompts, kwargs, out))
        return out

    model.generate = recording_generate
    result = train(model, tokenizer, encoded, config)
    assert result.steps == 4 and len(seen) == 2  # two passes over each batch of rollouts
    assert all(kwargs["policy"] == "teacher" for _, kwargs, _ in seen)
    untrained = build_model(tiny_model_dir, config)
    for prompts, kwargs, out in seen:
        assert untrained.generate(prompts, **kwargs) == out
    assert any(row.get("importance_ratio") == pytest.approx(1.0) for row in result.metrics)


def test_lora_targets_reach_the_model(tiny_model_dir):
    model = build_model(tiny_model_dir, tiny_config(None, lora_targets="mlp"))
    assert model.lora_layers and all(
        path.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for path in model.lora_layers
    )
