"""The continual runner on a tiny random Llama: the matrix from a fake scorer, exact resume inside a
stage and at a stage boundary, refusing another plan's folder, and the real scorer end to end."""

import json

import pytest
import torch
from helpers import save_tiny_llama

from sdft_fast import trainer as trainer_module
from sdft_fast.continual import STATE_FILE, run_continual, task_scores
from sdft_fast.continual_plan import load_plan, stage_configs
from sdft_fast.continual_report import score_matrix, transfer_metrics


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    write_jsonl(
        folder / "a.jsonl",
        [
            {"prompt": "Where is Vellmar?", "demonstration": "In Drevia.", "answer": "Drevia"},
            {"prompt": "Who built Kessan?", "demonstration": "Oskar Renn.", "answer": "Oskar Renn"},
            {"prompt": "How tall is Ulm?", "demonstration": "41 m.", "answer": "41"},
        ],
    )
    write_jsonl(
        folder / "b.jsonl",
        [
            {"prompt": "Capital of Peru? JSON.", "demonstration": '{"answer": "Lima"}'},
            {"prompt": "Capital of Chile? JSON.", "demonstration": '{"answer": "Santiago"}'},
        ],
    )
    write_jsonl(
        folder / "b_eval.jsonl",
        [
            {
                "prompt": "Capital of Spain? JSON.",
                "pattern": '^\\{"answer"',
                "kind": "format",
                "demonstration": "x",
            },
            {
                "prompt": "Capital of Italy? JSON.",
                "pattern": '^\\{"answer"',
                "kind": "format",
                "demonstration": "x",
            },
            {
                "prompt": "Capital of Italy? JSON.",
                "pattern": '^\\{"answer"',
                "answer": "Rome",
                "kind": "exact",
            },
        ],
    )
    write_jsonl(folder / "probes.jsonl", [{"prompt": "What is 2+2?", "answer": ["4", "four"]}])
    plan = {
        "name": "toy",
        "settings": {
            "max_steps": 3,
            "batch_size": 2,
            "max_new_tokens": 5,
            "skip_tokens": 0,
            "lr": 1e-2,
            "lora_rank": 4,
            "save_every": 1,
            "device": "cpu",
            "report_to": "none",
            "progress": False,
        },
        "eval": {"max_new_tokens": 6, "probes": ["probes.jsonl"]},
        "stages": [
            {"name": "facts", "train": "a.jsonl"},
            {"name": "skill", "train": "b.jsonl", "eval": "b_eval.jsonl", "score": "format"},
        ],
    }
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder / "plan.json"


def weights(model):
    """Every weight: the network's (base weights and LoRA factors) and the EMA teacher's."""
    state = {f"model.{k}": v.detach().clone() for k, v in model.hf_model.state_dict().items()}
    state.update({f"teacher.{k}": v.detach().clone() for k, v in (model.teacher_state_dict() or {}).items()})
    return state


class FakeScorer:
    """Row k of task j is correct after stage i when k < (i + j) % 4; probes 5 - i of 5; the 'KL'
    is the sum of the adapter's absolute weights, so it changes with every step. Records each call and
    the model's weights at that moment."""

    def __init__(self, model, tokenizer, plan):
        self.plan = plan
        self.calls = []

    def __call__(self, model, after_stage):
        self.calls.append((after_stage, weights(model)))
        tasks = {}
        for j, stage in enumerate(self.plan.stages):
            correct = [k < (after_stage + j) % 4 for k in range(len(stage.eval))]
            tasks[stage.name] = task_scores(stage, correct)
        kl = float(sum(v.abs().sum() for v in model.trainable_state_dict().values()))
        return {"tasks": tasks, "probes": {"general": [5 - after_stage, 5]}, "drift": {"kl": kl, "dnll": 0.0}}


def record_training_rows(monkeypatch) -> list:
    """Every stage's training rows (tasks and anchors) as `sdft_fast.run.train` receives them."""
    from sdft_fast import run as run_module

    seen = []
    real_train = run_module.train

    def recording_train(model, tok, rows, config, **kwargs):
        seen.append(list(rows))
        return real_train(model, tok, rows, config, **kwargs)

    monkeypatch.setattr(run_module, "train", recording_train)
    return seen


def expected_entry(stage_rows, score_rows, after_stage, j):
    correct = [k < (after_stage + j) % 4 for k in range(stage_rows)]
    return sum(correct[k] for k in score_rows) / len(score_rows)


def run(plan_path, tiny_model_dir, tokenizer, run_dir, scorers, **kwargs):
    def factory(model, tok, plan):
        scorer = FakeScorer(model, tok, plan)
        scorers.append(scorer)
        return scorer

    return run_continual(
        load_plan(plan_path),
        model_path=tiny_model_dir,
        run_dir=run_dir,
        tokenizer=tokenizer,
        evaluator_factory=factory,
        **kwargs,
    )


def test_matrix_from_a_fake_scorer(plan_path, tiny_model_dir, tokenizer, tmp_path):
    scorers = []
    state = run(plan_path, tiny_model_dir, tokenizer, tmp_path / "sdft", scorers)
    matrix = score_matrix(state)
    # The facts task scores all 3 of its rows (the training rows: they carry answers); the skill task
    # only its 2 "format" rows.
    expected = [[expected_entry(3, [0, 1, 2], i, 0), expected_entry(3, [0, 1], i, 1)] for i in range(3)]
    assert expected == [[0.0, 0.5], [1 / 3, 1.0], [2 / 3, 1.0]]
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
    assert [value for row in matrix for value in row] == pytest.approx([v for row in expected for v in row])
    assert state["evaluations"][0]["tasks"]["skill"]["kinds"] == {"format": [1, 2], "exact": [0, 1]}
    assert state["evaluations"][2]["tasks"]["skill"]["kinds"] == {"format": [2, 2], "exact": [1, 1]}
    assert [ev["probes"]["general"] for ev in state["evaluations"]] == [[5, 5], [4, 5], [3, 5]]
    assert [call[0] for call in scorers[0].calls] == [0, 1, 2]
    # The adapter moves in every stage, and stage 2 starts where stage 1 ended.
    kls = [ev["drift"]["kl"] for ev in state["evaluations"]]
    assert kls[0] < kls[1] and kls[1] != kls[2]
    assert all(ev["train"]["steps"] == 3 for ev in state["evaluations"][1:])
    metrics = transfer_metrics(matrix)
    assert metrics["bwt"] == pytest.approx(matrix[2][0] - matrix[1][0])
    assert metrics["fwt"] == pytest.approx(matrix[1][1] - matrix[0][1])
    saved = json.loads((tmp_path / "sdft" / STATE_FILE).read_text())
    assert saved["evaluations"] == json.loads(json.dumps(state["evaluations"]))
    assert (tmp_path / "sdft" / "stage-2-skill" / "final" / "adapter_config.json").is_file()
    # SFT on the same plan, reusing the start evaluation: trains on the demonstrations.
    sft = run(
        plan_path,
        tiny_model_dir,
        tokenizer,
        tmp_path / "sft",
        [],
        method="sft",
        start=state["evaluations"][0],
    )
    assert len(sft["evaluations"]) == 3 and sft["evaluations"][0] == state["evaluations"][0]
    assert sft["identity"]["stages"][0]["config"]["method"] == "sft"


def merged_plan(plan_path):
    plan = json.loads(plan_path.read_text())
    plan["merge_between_stages"] = True
    path = plan_path.parent / "merged.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.mark.parametrize("merge", [False, True], ids=["adapter-continues", "merged-between-stages"])
@pytest.mark.parametrize("crash_at_call", [5, 4], ids=["inside-stage-2", "at-the-stage-boundary"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(
    plan_path, tiny_model_dir, tokenizer, tmp_path, monkeypatch, crash_at_call, merge
):
    """Stages of 3 steps, a checkpoint after every step. The crash hits train_step call 5 (stage 2,
    step 2: its step-1 checkpoint exists) or call 4 (stage 2's first step: only stage 1's end exists).
    With merging, the rerun rebuilds the merged base weights from stage 1's checkpoint."""
    if merge:
        plan_path = merged_plan(plan_path)
    straight_scorers = []
    straight = run(plan_path, tiny_model_dir, tokenizer, tmp_path / "straight", straight_scorers)

    real_step = trainer_module.Trainer.train_step
    calls = {"n": 0}

    def crashing_step(self):
        calls["n"] += 1
        if calls["n"] == crash_at_call:
            raise RuntimeError("power cut (simulated)")
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        run(plan_path, tiny_model_dir, tokenizer, tmp_path / "crashed", [])
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)
    saved = json.loads((tmp_path / "crashed" / STATE_FILE).read_text())
    assert len(saved["evaluations"]) == 2  # the start and stage 1 were scored before the crash

    scorers = []
    resumed = run(plan_path, tiny_model_dir, tokenizer, tmp_path / "crashed", scorers)
    # The rerun scored only what was left: stage 2.
    assert [call[0] for call in scorers[0].calls] == [2]
    assert resumed["evaluations"][:2] == saved["evaluations"]
    for a, b in zip(straight["evaluations"], resumed["evaluations"]):
        assert a["tasks"] == b["tasks"] and a["probes"] == b["probes"]
        assert a["drift"]["kl"] == pytest.approx(b["drift"]["kl"], rel=1e-6)

    # The weights at the end, and every loss of stage 2, as in the run that never stopped.
    def losses(folder):
        rows = [
            json.loads(line) for line in (folder / "stage-2-skill" / "metrics.jsonl").read_text().splitlines()
        ]
        return {row["step"]: row["loss"] for row in rows if not row.get("eval")}

    assert losses(tmp_path / "crashed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5, abs=1e-7)
    (_, straight_final), (_, resumed_final) = straight_scorers[0].calls[-1], scorers[0].calls[-1]
    assert straight_final.keys() == resumed_final.keys()
    for key, value in straight_final.items():
        torch.testing.assert_close(resumed_final[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_merging_between_stages_makes_each_stage_start_from_a_fresh_adapter(
    plan_path, tiny_model_dir, tokenizer, tmp_path, monkeypatch
):
    """Before stage 2 the stage-1 adapter is folded into the base weights: the model after stage 1 and
    the model stage 2 starts from compute the same function (the fake scorer saw the former), the
    base weights now differ from the start model's, and stage 2's adapter starts from B = 0."""
    from sdft_fast import run as run_module

    starts = []
    real_train = run_module.train

    def recording_train(model, tok, rows, config, **kwargs):
        starts.append(weights(model))
        return real_train(model, tok, rows, config, **kwargs)

    scorers = []
    monkeypatch.setattr(run_module, "train", recording_train)
    run(merged_plan(plan_path), tiny_model_dir, tokenizer, tmp_path / "merged", scorers)
    after_stage_1 = scorers[0].calls[1][1]
    stage_2_start = starts[1]
    for key, value in stage_2_start.items():
        if key.endswith("lora_B"):
            assert not value.any(), key
    base_keys = [k for k in stage_2_start if k.endswith("base.weight")]
    assert base_keys and any(not torch.equal(stage_2_start[k], starts[0][k]) for k in base_keys)
    # Same function: the merged base equals the old base plus the stage-1 delta, layer by layer.
    for key in base_keys:
        prefix = key[: -len("base.weight")]
        a, b = after_stage_1[prefix + "lora_A"], after_stage_1[prefix + "lora_B"]
        scaling = 8 / 4  # lora_alpha (2 x rank) / rank
        # float32 sums of O(0.1) values: rounding ~1e-8, far below the 1e-6 allowed.
        torch.testing.assert_close(
            stage_2_start[key], after_stage_1[key] + scaling * b @ a, rtol=1e-6, atol=1e-6
        )


def test_a_folder_of_another_plan_is_refused(plan_path, tiny_model_dir, tokenizer, tmp_path):
    run(plan_path, tiny_model_dir, tokenizer, tmp_path / "run", [], overrides={"max_steps": 1})
    with pytest.raises(
        ValueError, match=r"belongs to a different run \(stages\[0\].config.max_steps: saved 1, now 2\)"
    ):
        run(plan_path, tiny_model_dir, tokenizer, tmp_path / "run", [], overrides={"max_steps": 2})
    state = run(
        plan_path, tiny_model_dir, tokenizer, tmp_path / "run", [], overrides={"max_steps": 2}, restart=True
    )
    assert all(ev["train"]["steps"] == 2 for ev in state["evaluations"][1:])


def test_the_real_scorer_and_the_command_line(plan_path, tiny_model_dir, tmp_path):
    """`sdft-fast continual` end to end with greedy decoding, the probes and the drift; a second
    method in the same folder joins the report."""
    from sdft_fast.cli import main

    out = tmp_path / "cli"
    common = ["continual", "--plan", str(plan_path), "--model", str(tiny_model_dir), "--output-dir", str(out)]
    assert main(common + ["--max-steps", "2", "--no-progress"]) == 0
    assert main(common + ["--method", "sft", "--max-steps", "2", "--no-progress"]) == 0
    state = json.loads((out / "sdft" / STATE_FILE).read_text())
    start = state["evaluations"][0]
    assert start["drift"] == pytest.approx({"kl": 0.0, "dnll": 0.0}, abs=1e-5)  # the start model itself
    assert state["evaluations"][2]["drift"]["kl"] > 0
    # In-context accuracy of every task at the start (rows with demonstrations), and of the next task
    # by the model about to train on it.
    assert start["in_context"]["facts"][1] == 3 and start["in_context"]["skill"][1] == 2
    assert (
        state["evaluations"][1]["next_in_context"][1] == 2
        and "next_in_context" not in state["evaluations"][2]
    )
    assert start["probes"]["probes"][1] == 1 and start["tasks"]["skill"]["score"][1] == 2
    answers = json.loads((out / "sdft" / "answers" / "after-2-skill.json").read_text())
    assert len(answers["facts"]) == 3 and len(answers["probes:probes"]) == 1
    markdown = (out / "continual.md").read_text()
    assert "## SDFT" in markdown and "## SFT" in markdown and (out / "continual.png").is_file()
    assert "next task, demonstration in context" in markdown
    assert main(common + ["--method", "sdft", "--lr", "-1"]) == 2  # a bad flag: one line, exit 2


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_anchor_rows_train_toward_the_start_model(
    plan_path, tiny_model_dir, tokenizer, tmp_path, monkeypatch, method
):
    """Each stage trains on its rows plus its share of anchors: the teacher prompt is the student prompt,
    and SFT's target is the start model's own greedy answer (+ EOS), whatever the stage."""
    from sdft_fast.config import TrainConfig
    from sdft_fast.continual import anchor_choice
    from sdft_fast.data import encode_prompt
    from sdft_fast.eval import greedy_completions
    from sdft_fast.trainer import build_model

    plan = json.loads(plan_path.read_text())
    anchors = [{"prompt": f"Name a colour number {i}."} for i in range(5)]
    write_jsonl(plan_path.parent / "anchors.jsonl", anchors)
    plan["anchors"] = {"path": "anchors.jsonl", "fraction": 0.5, "max_new_tokens": 4}
    anchored = plan_path.parent / "anchored.json"
    anchored.write_text(json.dumps(plan))

    seen = record_training_rows(monkeypatch)
    run(anchored, tiny_model_dir, tokenizer, tmp_path / method, [], method=method, overrides={"max_steps": 1})
    assert [len(rows) for rows in seen] == [3 + 3, 2 + 2]  # fraction 1/2: as many anchors as rows
    start = build_model(tiny_model_dir, TrainConfig(lora_rank=4, device="cpu"))
    prompts = {row["prompt"]: encode_prompt(tokenizer, row["prompt"]) for row in anchors}
    for rows in seen:
        drawn = [row for row in rows if row.meta.get("anchor")]
        assert drawn and all(row.teacher_prompt_ids == row.student_prompt_ids for row in drawn)
        assert all(row.student_prompt_ids in prompts.values() for row in drawn)
        for row in drawn:
            if method == "sft":
                (answer,) = greedy_completions(start, tokenizer, [row.student_prompt_ids], max_new_tokens=4)
                answer = [t for t in answer if t != tokenizer.eos_token_id]
                assert row.demonstration_ids == answer + [tokenizer.eos_token_id]
            else:
                assert row.demonstration_ids == []
    # The draw is a function of the stage's seed: the same on a rerun, another for the next stage.
    loaded = load_plan(anchored)
    assert anchor_choice(loaded, 1, seed=0) == anchor_choice(loaded, 1, seed=0)
    assert sorted(anchor_choice(loaded, 1, seed=0)) != sorted(anchor_choice(loaded, 1, seed=1))


def test_shared_questions_are_decoded_once_and_scored_per_row(plan_path, tokenizer, monkeypatch):
    """A probe set that repeats another's questions (a subset) costs no extra decoding; each row is
    still scored with its own accepted answers."""
    import dataclasses

    from sdft_fast import eval as eval_module
    from sdft_fast.continual import Evaluator
    from sdft_fast.continual_plan import ProbeSet
    from sdft_fast.data import Example, encode_prompt

    full = [Example(prompt="What is 2+2?", demonstration="4", answers=["4"]),
            Example(prompt="Capital of Peru?", demonstration="Lima", answers=["Lima"])]  # fmt: skip
    subset = [Example(prompt="Capital of Peru?", demonstration="Lima", answers=["Cusco"])]
    plan = dataclasses.replace(
        load_plan(plan_path), probes=[ProbeSet("full", full, "full"), ProbeSet("subset", subset, "subset")]
    )
    replies = {
        tuple(encode_prompt(tokenizer, "What is 2+2?")): "It is 4.",
        tuple(encode_prompt(tokenizer, "Capital of Peru?")): "Cusco, I think.",
    }
    decoded = []

    def fake_greedy(model, tok, prompt_ids, **kwargs):
        decoded.extend(tuple(ids) for ids in prompt_ids)
        return [
            tok.encode(replies.get(tuple(ids), "no idea"), add_special_tokens=False) for ids in prompt_ids
        ]

    class Model:
        def generate(self, *args, **kwargs):
            raise AssertionError("decoding goes through greedy_completions")

    monkeypatch.setattr(eval_module, "greedy_completions", fake_greedy)
    monkeypatch.setattr(Evaluator, "in_context", lambda self, model, stages=None: {})
    evaluation = Evaluator(tokenizer, plan)(model=Model(), after_stage=0)
    prompts = [row.prompt for stage in plan.stages for row in stage.eval] + [row.prompt for row in full]
    assert sorted(decoded) == sorted({tuple(encode_prompt(tokenizer, p)) for p in prompts})  # each once
    assert evaluation["probes"] == {"full": [1, 2], "subset": [1, 1]}
    assert evaluation["records"]["probes:subset"][0]["prediction"] == "Cusco, I think."


@pytest.mark.parametrize(
    "method, mode", [("sdft", True), ("sdft", "replay"), ("sft", True), ("sft", "replay")]
)
def test_rehearsal_anchors_draw_the_earlier_stages_rows(
    plan_path, tiny_model_dir, tokenizer, tmp_path, monkeypatch, method, mode
):
    """With ``anchors.rehearse`` a later stage's anchors come from the general prompts and the earlier
    stages' training rows as trained (a stage's ``repeat`` copies each): SDFT rehearses an earlier
    prompt without its demonstration in the teacher prompt (``true``) or with it (``replay``), SFT
    trains on its demonstration either way; stage 1 has nothing earlier to draw."""
    from sdft_fast.continual import anchor_choice, run_identity

    plan = json.loads(plan_path.read_text())
    write_jsonl(plan_path.parent / "one_anchor.jsonl", [{"prompt": "Name a colour."}])
    plan["anchors"] = {"path": "one_anchor.jsonl", "fraction": 0.5, "max_new_tokens": 4, "rehearse": mode}
    plan["merge_between_stages"] = True
    plan["stages"][0]["repeat"] = 2
    rehearsing = plan_path.parent / "rehearsing.json"
    rehearsing.write_text(json.dumps(plan))
    loaded = load_plan(rehearsing)
    first = len(loaded.stages[0].train)
    assert loaded.anchor_count(loaded.stages[0]) == 2 * first  # half of the rows as trained (2 x first)
    assert set(anchor_choice(loaded, 1, seed=0)) == {0}  # stage 1: only the general prompt
    assert set(anchor_choice(loaded, 2, seed=0)) <= set(range(1 + 2 * first)) and any(
        i > 0 for s in range(5) for i in anchor_choice(loaded, 2, seed=s)
    )
    identity = run_identity(loaded, stage_configs(loaded, method, tmp_path, {}), method, "tiny")
    assert identity["anchors"]["rehearse"] == mode and identity["stages"][0]["repeat"] == 2
    assert "repeat" not in identity["stages"][1]  # 1: as saved before the key existed

    seen = record_training_rows(monkeypatch)
    # A fixed draw: stage 2's anchors are the general prompt (index 0) and the second copy of stage 1's
    # first row (index 1 + first: the earlier rows are stage 1's rows twice, in order).
    monkeypatch.setattr(
        "sdft_fast.continual.anchor_choice",
        lambda plan, number, seed: [0] * first if number == 1 else [0, 1 + first],
    )
    run(
        rehearsing,
        tiny_model_dir,
        tokenizer,
        tmp_path / method,
        [],
        method=method,
        overrides={"max_steps": 1},
    )
    stage_one_rows = [row for row in seen[0] if not row.meta.get("anchor")]
    assert len(stage_one_rows) == 2 * first and stage_one_rows[first:] == stage_one_rows[:first]
    assert len(seen[0]) == 3 * first  # and the fixed draw's `first` anchors
    rehearsed = [row for row in seen[1] if row.meta.get("rehearsal")]
    assert [row.row for row in rehearsed] == [stage_one_rows[0].row]
    old = stage_one_rows[0]
    assert rehearsed[0].student_prompt_ids == old.student_prompt_ids
    assert old.teacher_prompt_ids != old.student_prompt_ids  # the stage itself had the demonstration
    if method == "sdft" and mode == "replay":
        assert rehearsed[0].teacher_prompt_ids == old.teacher_prompt_ids
    elif method == "sdft":
        assert rehearsed[0].teacher_prompt_ids == old.student_prompt_ids
    if method == "sft":
        assert rehearsed[0].demonstration_ids == old.demonstration_ids and old.demonstration_ids


def test_rehearsal_needs_merged_stages(plan_path):
    from sdft_fast.continual_plan import PlanError

    plan = json.loads(plan_path.read_text())
    write_jsonl(plan_path.parent / "one_anchor.jsonl", [{"prompt": "Name a colour."}])
    plan["anchors"] = {"path": "one_anchor.jsonl", "rehearse": True}
    bad = plan_path.parent / "rehearse_unmerged.json"
    bad.write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=r"anchors\.rehearse.*merge_between_stages"):
        load_plan(bad)
