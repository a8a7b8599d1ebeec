"""The recipe study as a benchmark: what makes SDFT learn new facts on a small model, and what it costs.

One call trains ONE configuration on fictional facts of the demo (SmolLM2-135M-Instruct, the embedded
default) for a fixed budget of rollouts per fact, and scores it the same way every time:

    direct    rephrasings of the training questions (3 per fact)   - did it learn the fact?
    indirect  the reverse relation (1 per fact)                     - can it use it?
    recall    the training questions themselves (1 per fact)
    probes    general questions the start model answers: the 121 of assets/general_probes.jsonl
              (all correct at the start), the 40 built-in retention probes, and robust-111
              (assets/robust_probes.jsonl: those of both that survive random perturbations)
    kl, dnll  KL(trained || start) per token and the NLL increase of the start model's own answers on
              general prompts (sdft_fast.eval.drift_from_reference)

and appends one row to bench/results/recipe.csv (with the machine, versions, commit, wall time). A
sweep is a shell loop of calls, so it runs in small pieces on a shared machine; ``--plot`` draws
bench/results/recipe.png (new-fact accuracy against forgetting: the frontier both methods share).

    python bench/bench_recipe.py --name R2 --rollout-source teacher
    python bench/bench_recipe.py --name sft-lr1e-3 --method sft --lr 1e-3
    python bench/bench_recipe.py --plot
    python bench/bench_recipe.py --fair-sft R2   # the lowest SFT lr reaching SDFT row R2's accuracy
    python bench/bench_recipe.py --peer     # TRL's SDFTTrainer vs `sdft-fast train`, same flags and scorer

Factors (the defaults are the issue's peer setup; "budget" = rollouts per fact, so steps =
rollouts_per_fact x facts / batch_size):
    --demo-form answer|fact|sentence  "Background fact: <doc>\\nAnswer: <answer>" | "Background fact: <doc>" |
                                      the demo's answer sentence
    --template trl|paper|fact-first   "{prompt}\\n\\n{demonstration}" | the paper's wording | fact first, one sentence
    --lr, --teacher base|ema|live, --ema-rate, --skip-tokens, --num-generations (rollouts per prompt),
    --temperature, --top-p, --min-lr-ratio, --rollout-source student|teacher|mix, --teacher-rollout-fraction,
    --facts (1-16), --questions 1|2 (training questions per fact), --rollouts-per-fact, --method sdft|sft

``--peer`` reproduces the side-by-side of issue 8: 8 facts x 4 copies of one question, the answer-bearing
demonstration, TRL's template, frozen base teacher, forward KL, no skipped tokens, LoRA r16/32 on all
linear layers, lr 2e-3, batch 8, one 24-token rollout per prompt at temperature 1, 60 steps, fp32; TRL 1.16's
SDFTTrainer (full logits) and ``sdft-fast train`` with the same flags, in fresh processes; both adapters
are loaded through PEFT into the same HF model and scored by the same greedy scorer. Rows go to
bench/results/recipe_peer.csv.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE_CSV = RESULTS / "recipe.csv"
PEER_CSV = RESULTS / "recipe_peer.csv"
TEMPLATES = {
    "trl": "{prompt}\n\n{demonstration}",
    "paper": None,  # sdft_fast.data.DEFAULT_TEACHER_TEMPLATE
    # The old demo's: the fact first and one short sentence asked for (docs/history/2026-11-demo-before-recipe-study.md).
    "fact-first": "Fact: {demonstration}\n\nQuestion: {prompt}\nAnswer with one short sentence that uses the fact.",
}
DEMO_FORMS = ("answer", "fact", "sentence")
# Probes the start model answers under every one of 8 random perturbations (bench/bench_probe_noise.py).
ROBUST_PROBES = Path(__file__).resolve().parent.parent / "sdft_fast" / "assets" / "robust_probes.jsonl"


# The study's two fact sets, in order (--facts N takes the first N): the demo plan's fact stages train the
# first 4 of each; the other rows live in assets/continual_demo/study_facts_*.jsonl.
FACT_SET_A = ["velmora-mayor", "quorvath-bridge", "zephrin-prize", "glimmerfin",
              "korrin-marathon", "talwyn-tower", "perrowind-festival", "halvex-ceo"]  # fmt: skip
FACT_SET_B = ["aurelkin-ship", "pellacor-president", "ashcrest-warbler", "greymoor-swim",
              "ferrovane-dam", "lexibrook-app", "thessaly-vorn-comet", "calder-cup"]  # fmt: skip


def fact_stage_rows(facts: int, questions: int, demo_form: str, fact_set: str = "ab"):
    """Training rows and evaluation rows for the first ``facts`` facts of FACT_SET_A + FACT_SET_B
    (``fact_set`` "ab"), or of one of them ("a", "b": the demo's facts-a and facts-b stages are their
    first 4)."""
    from sdft_fast.continual_plan import load_plan
    from sdft_fast.data import load_examples
    from sdft_fast.demo import DEMO_PLAN_PATH, load_demo_facts

    plan = load_plan(DEMO_PLAN_PATH)
    study_eval = load_examples(DEMO_PLAN_PATH.parent / "study_facts_eval.jsonl", require_demonstration=False)
    eval_rows = [row for stage in plan.stages if stage.score == "direct" for row in stage.eval] + study_eval
    fact_ids = {"ab": FACT_SET_A + FACT_SET_B, "a": FACT_SET_A, "b": FACT_SET_B}[fact_set][:facts]
    demo = load_demo_facts()
    train = []
    for fact in fact_ids:
        document = demo.documents[fact]
        answer = next(row.answers[0] for row in demo.direct if row.meta["fact"] == fact)
        for example in [row for row in demo.train if row.meta["fact"] == fact][:questions]:
            demonstration = {
                "answer": f"Background fact: {document}\nAnswer: {answer}",
                "fact": f"Background fact: {document}",
                "sentence": example.demonstration,
            }[demo_form]
            train.append(dataclasses.replace(example, demonstration=demonstration, answers=[answer]))
    evals = [row for fact in fact_ids for row in eval_rows if row.meta["fact"] == fact]
    return train, evals, plan.probes


def recipe_plan(args):
    """A one-stage plan of the chosen facts, scored on direct / indirect / recall and two probe sets;
    with ``--anchor-fraction`` the demo plan's anchors (general questions trained toward the start model)
    make that fraction of the rows."""
    import dataclasses as dc

    from sdft_fast.continual_plan import Plan, ProbeSet, Stage, load_plan
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE
    from sdft_fast.demo import DEMO_PLAN_PATH
    from sdft_fast.eval import RETENTION_PROBES_PATH, retention_probes

    train, evals, probes = fact_stage_rows(args.facts, args.questions, args.demo_form, args.fact_set)
    template = TEMPLATES[args.template] or DEFAULT_TEACHER_TEMPLATE
    stage = Stage(name="facts", train=train, eval=evals, score="direct", teacher_template=template)
    robust = ProbeSet("robust-111", retention_probes(ROBUST_PROBES), str(ROBUST_PROBES))
    probes = [probes[0], ProbeSet("retention-40", retention_probes(), str(RETENTION_PROBES_PATH)), robust]
    anchors = None
    if args.anchor_fraction > 0:
        anchors = dc.replace(load_plan(DEMO_PLAN_PATH).anchors, fraction=args.anchor_fraction)
    return Plan(
        name="recipe",
        stages=[stage],
        source="bench_recipe",
        eval_max_new_tokens=24,
        probes=probes,
        anchors=anchors,
    )


def skill_stage():
    """The demo plan's skill stage: its in-context rate after a fact stage is what a later skill stage's
    teacher-prompt rollouts (and a merged teacher) can teach."""
    from sdft_fast.continual_plan import load_plan
    from sdft_fast.demo import DEMO_PLAN_PATH

    return next(s for s in load_plan(DEMO_PLAN_PATH).stages if s.score == "format")


def steps_for(args) -> int:
    """Steps that give every fact ``rollouts_per_fact`` rollouts; anchors take their fraction of each batch."""
    fact_rows_per_step = args.batch_size * (1.0 - args.anchor_fraction)
    return max(1, math.ceil(args.rollouts_per_fact * args.facts * args.questions / fact_rows_per_step))


def train_settings(args) -> dict:
    settings = dict(
        max_steps=steps_for(args),
        lr=args.lr,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        optimizer=args.optimizer,
        adam_eps=args.adam_eps,
        momentum=args.momentum,
        device="cpu",
        dtype="float32",
        progress=not args.no_progress,
        report_to="none",
        save_every=0,
    )
    if args.method == "sdft":
        settings.update(
            teacher=args.teacher,
            ema_rate=args.ema_rate,
            skip_tokens=args.skip_tokens,
            num_generations=args.num_generations,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            rollout_source=args.rollout_source,
            rollout_model=args.rollout_model,
        )
        if args.rollout_source == "mix":
            settings["teacher_rollout_fraction"] = args.teacher_rollout_fraction
    return settings


def run_one(args) -> dict:
    """Train and score one configuration; return the CSV row."""
    import torch
    from harness import environment

    from sdft_fast.continual import Evaluator, run_continual
    from sdft_fast.data import DataLimits
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.eval import reference_logprobs

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plan = recipe_plan(args)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    # The start model's scores depend on the rows and the scorer only: cached across calls.
    digest = hashlib.sha256(
        json.dumps([[str(r.prompt), r.answers] for r in plan.stages[0].eval] + [model_path.name]).encode()
    ).hexdigest()[:12]
    cache = Path(args.work_dir) / f"start-{digest}.json"
    start = json.loads(cache.read_text()) if cache.is_file() else None
    eval_seconds = []
    skill = skill_stage()

    def timed_evaluator(model, tok, the_plan):
        evaluator = Evaluator(tok, the_plan, reference_logprobs(model, tok))

        def evaluate(m, after_stage):
            began = time.perf_counter()
            out = evaluator(m, after_stage)
            if after_stage > 0:  # the skill's in-context rate of the trained model (start: 24/24)
                out["skill_in_context"] = evaluator.in_context(m, [skill])[skill.name]
            eval_seconds.append(time.perf_counter() - began)
            return out

        return evaluate

    with tempfile.TemporaryDirectory(dir=args.work_dir) as run_dir:
        state = run_continual(
            plan,
            model_path=model_path,
            run_dir=run_dir,
            method=args.method,
            overrides=train_settings(args),
            tokenizer=tokenizer,
            evaluator_factory=timed_evaluator,
            start=start,
            limits=DataLimits(max_completion_tokens=256),  # the SFT target: the demonstration
        )
    if start is None:
        cache.write_text(json.dumps(state["evaluations"][0]))
    after = state["evaluations"][-1]
    kinds = after["tasks"]["facts"]["kinds"]
    row = {
        **environment("cpu"),
        "threads": args.threads,
        "name": args.name,
        "method": args.method,
        "facts": args.facts,
        "fact_set": args.fact_set,
        "questions": args.questions,
        "demo_form": args.demo_form,
        "template": args.template,
        "lr": args.lr,
        "teacher": args.teacher if args.method == "sdft" else "",
        "ema_rate": args.ema_rate if args.method == "sdft" and args.teacher == "ema" else "",
        "skip_tokens": args.skip_tokens if args.method == "sdft" else "",
        "num_generations": args.num_generations if args.method == "sdft" else "",
        "temperature": args.temperature if args.method == "sdft" else "",
        "top_p": args.top_p if args.method == "sdft" else "",
        "rollout_source": args.rollout_source if args.method == "sdft" else "",
        "teacher_rollout_fraction": args.teacher_rollout_fraction if args.rollout_source == "mix" else "",
        "max_new_tokens": args.max_new_tokens if args.method == "sdft" else "",
        "rollout_model": args.rollout_model if args.method == "sdft" else "",
        "anchor_fraction": args.anchor_fraction,
        "lora_rank": args.lora_rank,
        "lora_targets": args.lora_targets,
        "optimizer": args.optimizer,
        "adam_eps": args.adam_eps if args.optimizer == "adamw" else "",
        "momentum": args.momentum if args.optimizer == "sgd" else "",
        "warmup_steps": args.warmup_steps,
        "min_lr_ratio": args.min_lr_ratio,
        "rollouts_per_fact": args.rollouts_per_fact,
        "steps": steps_for(args),
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    for kind in ("direct", "indirect", "recall"):
        row[kind], row[f"{kind}_n"] = kinds[kind]
    for name, (correct, total) in after["probes"].items():
        row[f"probes:{name}"], row[f"probes:{name}_n"] = correct, total
    row["skill_in_context"], row["skill_in_context_n"] = after["skill_in_context"]
    row["kl"] = round(after["drift"]["kl"], 5)
    row["dnll"] = round(after["drift"]["dnll"], 5)
    row["train_s"] = round(after["train"]["train_s"], 1)
    row["eval_s"] = round(sum(eval_seconds), 1)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with path.open() as handle:
            header = next(csv.reader(handle), None)
        if header != list(row):
            raise SystemExit(
                f"{path}: its columns differ from this version's; move it aside to start a new file"
            )
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot(path: Path, out: Path) -> None:
    """Direct (rephrased) accuracy against the probe drop and against KL, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    probe = "probes:general-121"
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for row in rows:
        colour = "#1f77b4" if row["method"] == "sdft" else "#ff7f0e"
        direct = 100 * int(row["direct"]) / int(row["direct_n"])
        drop = 100 * (1 - int(row[probe]) / int(row[f"{probe}_n"]))
        for axis, x in ((axes[0], drop), (axes[1], float(row["kl"]))):
            axis.scatter(x, direct, color=colour, s=30)
            axis.annotate(row["name"], (x, direct), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("forgetting: general-121 probes lost (% of the start model's correct answers)")
    axes[1].set_xlabel("KL(trained || start) per token, general prompts")
    for axis in axes:
        axis.set_ylabel("new facts: rephrased questions correct (%)")
        axis.grid(alpha=0.3)
    axes[0].scatter([], [], color="#1f77b4", label="SDFT")
    axes[0].scatter([], [], color="#ff7f0e", label="SFT")
    axes[0].legend()
    figure.suptitle(f"Recipe study, SmolLM2-135M-Instruct ({len(rows)} runs, {path.name})", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def fair_sft(path: Path, sdft_name: str) -> None:
    """The SFT learning rate to compare with SDFT row ``sdft_name``: among the SFT rows on the same
    data and budget, the lowest lr whose direct accuracy reaches SDFT's (the issue's rule: compare
    forgetting at comparable new-task accuracy). Prints the candidates and the choice."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    sdft = [r for r in rows if r["method"] == "sdft" and r["name"] == sdft_name]
    if not sdft:
        raise SystemExit(f"{path}: no SDFT row named {sdft_name!r}")
    target = sdft[-1]
    same = ("facts", "fact_set", "questions", "demo_form", "rollouts_per_fact", "batch_size")
    candidates = sorted(
        (r for r in rows if r["method"] == "sft" and all(r[k] == target[k] for k in same)),
        key=lambda r: float(r["lr"]),
    )
    goal = int(target["direct"])
    probe = "probes:general-121"
    print(
        f"SDFT {sdft_name}: direct {goal}/{target['direct_n']}, {probe} {target[probe]}/{target[probe + '_n']}"
    )
    print("| SFT lr | direct | probes (121) | KL | reaches SDFT |")
    print("|---|---|---|---|---|")
    for r in candidates:
        print(
            f"| {r['lr']} | {r['direct']}/{r['direct_n']} | {r[probe]} | {r['kl']} | {int(r['direct']) >= goal} |"
        )
    chosen = next((r for r in candidates if int(r["direct"]) >= goal), None)
    print("fair SFT lr:", "none of these reaches SDFT's accuracy" if chosen is None else chosen["lr"])


# ----------------------------------------------------------------------------- --peer: TRL beside sdft_fast

PEER = dict(facts=8, copies=4, lr=2e-3, batch_size=8, steps=60, max_new_tokens=24, lora_rank=16)


def peer_rows_file(folder: Path) -> Path:
    train, _, _ = fact_stage_rows(PEER["facts"], 1, "answer")
    path = folder / "peer_rows.jsonl"
    lines = [json.dumps({"prompt": r.prompt, "demonstration": r.demonstration}) for r in train] * PEER[
        "copies"
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def peer_train_ours(args, rows: Path, out: Path) -> float:
    command = [
        sys.executable, "-m", "sdft_fast", "train", "--data", str(rows), "--model", str(args.model_path),
        "--output-dir", str(out), "--teacher-template", TEMPLATES["trl"], "--teacher", "base", "--alpha", "0",
        "--skip-tokens", "0", "--lora-rank", str(PEER["lora_rank"]), "--lr", str(PEER["lr"]),
        "--batch-size", str(PEER["batch_size"]), "--num-generations", "1",
        "--max-new-tokens", str(PEER["max_new_tokens"]), "--temperature", "1.0",
        "--max-steps", str(PEER["steps"]), "--warmup-steps", "0", "--rollout-source", args.rollout_source,
        "--dtype", "float32", "--device", "cpu", "--no-progress", "--report-to", "none",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    return time.perf_counter() - started


def peer_train_trl(args, rows: Path, out: Path) -> None:
    """Runs inside its own process (``--only-trl``): TRL's SDFTTrainer with the same settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    records = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["prompt"]}], "privileged_context": r["demonstration"]}
            for r in records
        ]
    )
    config = SDFTConfig(
        output_dir=str(out), per_device_train_batch_size=PEER["batch_size"], num_generations=1,
        max_completion_length=PEER["max_new_tokens"], temperature=1.0, distillation_mode="full_logits",
        distillation_alpha=0.0, teacher_model_kind="base", num_loss_tokens_to_skip=0,
        teacher_prompt_template=TEMPLATES["trl"].replace("{demonstration}", "{privileged_context}"),
        generate_from_teacher=args.rollout_source == "teacher", learning_rate=PEER["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, max_steps=PEER["steps"], logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    peft_config = LoraConfig(
        r=PEER["lora_rank"], lora_alpha=2 * PEER["lora_rank"], lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SDFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    trainer.model.save_pretrained(str(out / "final"))


def peer_score(args, adapter: Path | None, reference, tokenizer) -> dict:
    """The same greedy scorer for every contender: the adapter loaded through PEFT and merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sdft_fast.eval import evaluate_accuracy, kl_from_reference

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    _, evals, probes = fact_stage_rows(PEER["facts"], 1, "answer")
    out = {}
    for kind in ("recall", "direct", "indirect"):
        rows = [r for r in evals if r.meta["kind"] == kind]
        result = evaluate_accuracy(model, tokenizer, rows, max_new_tokens=24, batch_size=32)
        out[kind], out[f"{kind}_n"] = result["correct"], result["n"]
    result = evaluate_accuracy(model, tokenizer, probes[0].rows, max_new_tokens=24, batch_size=32)
    out["probes:general-121"], out["probes:general-121_n"] = result["correct"], result["n"]
    out["kl"] = round(kl_from_reference(model, reference), 5)
    return out


def run_peer(args) -> None:
    import torch
    from harness import environment
    from transformers import AutoModelForCausalLM

    from sdft_fast.default_model import load_tokenizer
    from sdft_fast.eval import reference_logprobs

    if args.rollout_source == "mix":
        raise SystemExit("--peer: TRL has no mix of rollout sources (student or teacher only)")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(dir=args.work_dir, prefix="peer-"))
    rows = peer_rows_file(work)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--only-trl", str(work), "--model", str(args.model_path),
         "--threads", str(args.threads), "--rollout-source", args.rollout_source],
        check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
    )  # fmt: skip
    trl_s = time.perf_counter() - started
    ours_s = peer_train_ours(args, rows, work / "ours")
    tokenizer = load_tokenizer(args.model_path)
    base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    reference = reference_logprobs(base, tokenizer)
    table = []
    for name, adapter, seconds in (
        ("start", None, 0.0),
        ("trl", work / "trl" / "final", trl_s),
        ("sdft_fast", work / "ours" / "final", ours_s),
    ):
        scores = peer_score(args, adapter, reference, tokenizer)
        row = {**environment("cpu"), "threads": args.threads, "contender": name, "rollout_source": args.rollout_source,
               **{k: v for k, v in PEER.items()}, **scores, "train_process_s": round(seconds, 1)}  # fmt: skip
        append_row(Path(args.csv or PEER_CSV), row)
        table.append(row)
    print("| contender | recall | direct | indirect | probes (121) | KL from start | train process s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['contender']} | {r['recall']}/{r['recall_n']} | {r['direct']}/{r['direct_n']} | "
              f"{r['indirect']}/{r['indirect_n']} | {r['probes:general-121']}/{r['probes:general-121_n']} | "
              f"{r['kl']} | {r['train_process_s']} |")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="run", help="a label for this row")
    parser.add_argument("--method", choices=("sdft", "sft"), default="sdft")
    parser.add_argument(
        "--facts", type=int, default=8, help="facts per run (1-16, the demo's two fact stages)"
    )
    parser.add_argument(
        "--fact-set", choices=("ab", "a", "b"), default="ab",
        help="take the facts from both sets in order, or from set a or b only (1-8)",
    )  # fmt: skip
    parser.add_argument(
        "--questions", type=int, choices=(1, 2), default=1, help="training questions per fact"
    )
    parser.add_argument("--demo-form", choices=DEMO_FORMS, default="answer")
    parser.add_argument("--template", choices=tuple(TEMPLATES), default="trl")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher", choices=("base", "ema", "live"), default="base")
    parser.add_argument("--ema-rate", type=float, default=0.01)
    parser.add_argument("--skip-tokens", type=int, default=0)
    parser.add_argument("--num-generations", type=int, default=1, help="rollouts per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    parser.add_argument(
        "--min-lr-ratio", type=float, default=0.0, help="cosine floor (1.0: constant lr after the warmup)"
    )
    parser.add_argument("--rollout-source", choices=("student", "teacher", "mix"), default="student")
    parser.add_argument("--teacher-rollout-fraction", type=float, default=0.5)
    parser.add_argument(
        "--rollout-model", choices=("student", "teacher"), default="student", help="whose weights sample"
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--anchor-fraction",
        type=float,
        default=0.0,
        help="fraction of each batch drawn from the demo plan's anchor questions (trained toward the start)",
    )
    parser.add_argument("--lora-targets", default="all", help="all | mlp | attention | module names")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--adam-eps", type=float, default=1e-8)
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument(
        "--rollouts-per-fact", type=int, default=60, help="the budget: steps = this x facts / batch"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument(
        "--model", default=None, help="local HF folder (default: embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "sdft_recipe"))
    parser.add_argument(
        "--csv", default=None, help="results file (default: recipe.csv; --peer: recipe_peer.csv)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--plot", action="store_true", help="draw recipe.png from the CSV and exit")
    parser.add_argument("--peer", action="store_true", help="TRL beside sdft_fast on the issue's setup")
    parser.add_argument(
        "--fair-sft",
        metavar="SDFT_NAME",
        help="print the lowest SFT lr (same data) that reaches that SDFT row",
    )
    parser.add_argument("--only-trl", default=None, help=argparse.SUPPRESS)  # --peer's TRL process
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.plot or args.fair_sft:
        results = Path(args.csv or RECIPE_CSV)
        if args.plot:
            plot(results, results.with_suffix(".png"))
        if args.fair_sft:
            fair_sft(results, args.fair_sft)
        return 0
    if args.fact_set != "ab" and args.facts > 8:
        parser.error(f"--facts: set {args.fact_set} has 8 facts, got {args.facts}")
    if not 1 <= args.facts <= 16:
        parser.error("--facts must lie in 1..16 (the demo plan's two fact stages)")
    from sdft_fast.default_model import resolve_model_path

    args.model_path = resolve_model_path(args.model)
    if args.only_trl:
        work = Path(args.only_trl)
        peer_train_trl(args, work / "peer_rows.jsonl", work / "trl")
        return 0
    if args.peer:
        run_peer(args)
        return 0
    try:
        row = run_one(args)
    except ValueError as error:  # a bad setting or row: one line, as the CLI does
        raise SystemExit(f"bench_recipe: {error}") from None
    append_row(Path(args.csv or RECIPE_CSV), row)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
