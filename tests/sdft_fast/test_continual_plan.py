"""Reading a continual plan: the settings' precedence, and bad plans refused naming the file and stage."""

import json

import pytest

from sdft_fast.continual_plan import (
    PlanError,
    load_plan,
    plan_from_stage_args,
    stage_configs,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TRAIN = [
    {"prompt": "Where is Vellmar?", "demonstration": "Vellmar is in Drevia.", "answer": "Drevia"},
    {"prompt": "Who built Kessan?", "demonstration": "Oskar Renn built it."},
]
EVAL = [
    {"prompt": "Vellmar lies in which land?", "answer": ["Drevia"], "kind": "direct"},
    {"prompt": "What is in Drevia?", "answer": "Vellmar", "kind": "indirect"},
    {"prompt": "Answer in JSON: where is Vellmar?", "pattern": '^\\{"answer": "[^"]*"\\}'},
]


@pytest.fixture
def files(tmp_path):
    write_jsonl(tmp_path / "a_train.jsonl", TRAIN)
    write_jsonl(tmp_path / "a_eval.jsonl", EVAL)
    write_jsonl(tmp_path / "b_train.jsonl", TRAIN[:1])
    return tmp_path


def write_plan(folder, plan, name="plan.yaml"):
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(plan) if name.endswith(".yaml") else json.dumps(plan))
    return path


GOOD = {
    "name": "toy",
    "settings": {"max_steps": 4, "lr": 1e-3, "seed": 5},
    "sdft": {"rollout_source": "mix", "teacher_rollout_fraction": 0.25},
    "sft": {"lr": 3e-4},
    "eval": {"max_new_tokens": 12},
    "stages": [
        {"name": "facts-a", "train": "a_train.jsonl", "eval": "a_eval.jsonl", "score": "direct",
         "settings": {"max_steps": 6}, "sft": {"max_steps": 2}},
        {"name": "facts-b", "train": "b_train.jsonl", "teacher_template": "{demonstration}\n{prompt}"},
    ],
}  # fmt: skip


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_good_plan_and_the_precedence_of_its_settings(files, suffix):
    plan = load_plan(write_plan(files, GOOD, f"plan.{suffix}"))
    assert plan.name == "toy" and [s.name for s in plan.stages] == ["facts-a", "facts-b"]
    first, second = plan.stages
    assert (
        len(first.eval) == 3 and first.score == "direct" and first.kinds() == ["direct", "eval", "indirect"]
    )
    assert first.score_rows() == [0]
    assert [row.answers for row in second.eval] == [["Drevia"]]  # no eval file: answer-bearing training rows
    assert second.teacher_template == "{demonstration}\n{prompt}" and plan.eval_max_new_tokens == 12
    assert [p.name for p in plan.probes] == ["retention"] and len(plan.probes[0].rows) >= 20

    sdft = stage_configs(plan, "sdft", files / "run", {"lr": 5e-3})
    assert [c.max_steps for c in sdft] == [6, 4]
    assert [c.lr for c in sdft] == [5e-3, 5e-3]  # the command line wins
    assert [c.seed for c in sdft] == [5, 6]  # one seed per stage
    assert all(c.rollout_source == "mix" and c.teacher_rollout_fraction == 0.25 for c in sdft)
    assert sdft[1].output_dir == str(files / "run" / "stage-2-facts-b")
    sft = stage_configs(plan, "sft", files / "run")
    assert [c.max_steps for c in sft] == [2, 4] and [c.lr for c in sft] == [3e-4, 3e-4]
    assert all(c.method == "sft" and c.rollout_source == "student" for c in sft)


def test_stages_from_arguments(files, monkeypatch):
    monkeypatch.chdir(files)
    plan = plan_from_stage_args(["a_train.jsonl,a_eval.jsonl", "b_train.jsonl"])
    assert [s.name for s in plan.stages] == ["a_train", "b_train"] and len(plan.stages[0].eval) == 3
    with pytest.raises(
        PlanError, match=r"--stage arguments, stage 1: expected TRAIN.jsonl or TRAIN.jsonl,EVAL"
    ):
        plan_from_stage_args(["a.jsonl,b.jsonl,c.jsonl"])


def bad(stage_changes=None, **plan_changes):
    plan = json.loads(json.dumps(GOOD))
    plan.update(plan_changes)
    if stage_changes:
        plan["stages"][1].update(stage_changes)
    return plan


@pytest.mark.parametrize(
    "plan, message",
    [
        (bad({"train": "missing.jsonl"}), r"stage 2 \('facts-b'\), field 'train': file .*missing.jsonl does not exist"),
        (bad({"eval": "broken.jsonl"}), r"stage 2 \('facts-b'\), field 'eval': .*broken.jsonl, row 2: invalid JSON"),
        (bad({"eval": "badpattern.jsonl"}), r"stage 2 \('facts-b'\), field 'eval': .*row 1, field 'pattern': is not a valid"),
        (bad({"eval": "noanswer.jsonl"}), r"stage 2 \('facts-b'\), field 'eval': .*needs an answer or a pattern"),
        (bad({"train": "a_eval.jsonl"}), r"stage 2 \('facts-b'\), field 'train': .*row 1, field 'demonstration': is missing"),
        (bad({"epochs": 3}), r"stage 2 \('facts-b'\), field 'stage': unknown key\(s\) \['epochs'\]"),
        (bad({"repeat": 0}), r"stage 2 \('facts-b'\), field 'repeat': must be an integer >= 1, got 0"),
        (bad({"repeat": "15"}), r"stage 2 \('facts-b'\), field 'repeat': must be an integer >= 1, got '15'"),
        (bad({"score": "reverse"}), r"stage 2 \('facts-b'\), field 'score': no evaluation row has kind 'reverse'"),
        (bad({"settings": {"lora_rank": 8}}), r"stage 2 \('facts-b'\), field 'settings.lora_rank': .*cannot change"),
        (bad({"sdft": {"learning_rate": 1}}), r"stage 2 \('facts-b'\), field 'sdft': unknown key"),
        (bad({"name": "a b"}), r"stage 2 \('a b'\), field 'name': a stage name is"),
        (bad({"name": "facts-a"}), r"stage 2 \('facts-a'\), field 'name': two stages are named 'facts-a'"),
        (bad({"teacher_template": "{prompt} only"}), r"stage 2 \('facts-b'\), field 'teacher_template'"),
        (bad(settings={"method": "sft"}), r"plan.yaml, field 'settings.method': 'method' comes from the run"),
        (bad(stages=[]), r"plan.yaml, field 'stages': the plan needs a non-empty list of stages"),
        (bad(stages=["a_train.jsonl"]), r"plan.yaml, stage 1, field 'stage': must be a mapping, got str"),
        (bad(eval={"probes": ["nope.jsonl"]}), r"plan.yaml, field 'eval.probes\[0\]': file .*nope.jsonl does not exist"),
        (bad(eval={"max_new_tokens": 0}), r"field 'eval.max_new_tokens': must be an integer >= 1"),
    ],
)  # fmt: skip
def test_bad_plans_name_the_file_the_stage_and_the_field(files, plan, message):
    (files / "broken.jsonl").write_text('{"prompt": "q", "answer": "a"}\n{"prompt": \n')
    write_jsonl(files / "badpattern.jsonl", [{"prompt": "q", "pattern": "(unclosed"}])
    write_jsonl(files / "noanswer.jsonl", [{"prompt": "q"}])
    with pytest.raises(PlanError, match=message):
        load_plan(write_plan(files, plan))


def test_unreadable_plans_and_settings_that_make_no_config(files):
    (files / "plan.yaml").write_text("stages: [\n  - name: x\n")
    with pytest.raises(PlanError, match=r"plan.yaml: invalid YAML"):
        load_plan(files / "plan.yaml")
    (files / "plan.json").write_text('{"stages": [}')
    with pytest.raises(PlanError, match=r"plan.json: invalid JSON at line 1"):
        load_plan(files / "plan.json")
    with pytest.raises(PlanError, match=r"nowhere.yaml: plan file does not exist"):
        load_plan(files / "nowhere.yaml")
    # A value the TrainConfig refuses is reported with its stage, before any model work.
    plan = load_plan(write_plan(files, bad({"settings": {"max_steps": 4, "lr": -1.0}})))
    with pytest.raises(
        PlanError, match=r"plan.yaml, stage 2 \('facts-b'\): TrainConfig.lr=-1.0: must be a finite"
    ):
        stage_configs(plan, "sdft", files / "run")
    # Sampling settings are SDFT's: a plan that gives them to every method fails for SFT, naming the stage.
    plan = load_plan(write_plan(files, bad(settings={"rollout_source": "teacher"})))
    with pytest.raises(
        PlanError, match=r"stage 1 \('facts-a'\): TrainConfig.rollout_source='teacher': only method"
    ):
        stage_configs(plan, "sft", files / "run")


def test_anchors_mix_a_fraction_of_general_prompts_into_each_stage(files):
    write_jsonl(files / "anchors.jsonl", [{"prompt": f"What is {i} + 1?"} for i in range(10)])
    plan = load_plan(
        write_plan(
            files,
            bad(
                {"anchor_fraction": 0.0},
                anchors={"path": "anchors.jsonl", "fraction": 1 / 3, "max_new_tokens": 16},
            ),
        )
    )
    assert len(plan.anchors.rows) == 10 and plan.anchors.max_new_tokens == 16
    # Stage 1: 2 training rows -> round(2 x (1/3) / (2/3)) = 1 anchor; stage 2 turns them off.
    assert [plan.anchor_count(stage) for stage in plan.stages] == [1, 0]
    # A stage whose rows repeat keeps the fraction of its rows as trained: at 0.5, one anchor a row.
    repeated = load_plan(
        write_plan(files, bad({"repeat": 3}, anchors={"path": "anchors.jsonl", "fraction": 0.5}))
    )
    assert [stage.repeat for stage in repeated.stages] == [1, 3]
    assert [repeated.anchor_count(stage) for stage in repeated.stages] == [
        len(repeated.stages[0].train),
        3 * len(repeated.stages[1].train),
    ]


@pytest.mark.parametrize(
    "anchors, stage, message",
    [
        ({"fraction": 0.2}, {}, r"field 'anchors.path': is missing"),
        ({"path": "nope.jsonl"}, {}, r"field 'anchors.path': file .*nope.jsonl does not exist"),
        ({"path": "anchors.jsonl", "fraction": 1.0}, {}, r"field 'anchors.fraction': must be a number in \[0, 1\)"),
        ({"path": "anchors.jsonl", "share": 0.2}, {}, r"field 'anchors': unknown key\(s\) \['share'\]"),
        ({"path": "anchors.jsonl", "rehearse": "all"}, {}, r"field 'anchors.rehearse': must be false, true, 'prompts' or 'replay', got 'all'"),
        (None, {"anchor_fraction": 0.2}, r"stage 2 \('facts-b'\), field 'anchor_fraction': the plan has no anchors"),
        ({"path": "anchors.jsonl"}, {"anchor_fraction": -0.1}, r"stage 2 .*'anchor_fraction': must be a number"),
    ],
)  # fmt: skip
def test_bad_anchors_name_the_field(files, anchors, stage, message):
    write_jsonl(files / "anchors.jsonl", [{"prompt": "What is 2 + 2?"}])
    changes = {} if anchors is None else {"anchors": anchors}
    with pytest.raises(PlanError, match=message):
        load_plan(write_plan(files, bad(stage, **changes)))


def test_merging_between_stages_is_a_flag_and_needs_an_adapter(files):
    plan = load_plan(write_plan(files, bad(merge_between_stages=True)))
    assert plan.merge_between_stages and not load_plan(write_plan(files, GOOD)).merge_between_stages
    with pytest.raises(PlanError, match=r"plan.yaml, field 'merge_between_stages': must be true or false"):
        load_plan(write_plan(files, bad(merge_between_stages="yes")))
    with pytest.raises(PlanError, match=r"field 'merge_between_stages': full fine-tuning \(lora_rank 0\)"):
        stage_configs(plan, "sdft", files / "run", {"lora_rank": 0})
