"""The demo's report: the continual report (``demo.md``, ``demo.csv``, ``demo_matrix.csv``,
``demo.json``, ``demo.png``) with what the demo adds on top — what was trained with which settings,
the learning-against-forgetting comparison of the methods, and the run's machine and time."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from sdft_fast.continual_plan import Plan, stage_configs
from sdft_fast.continual_report import accuracy, score_matrix, write_report


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def learning_and_forgetting(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Per method: how well each task was learned right after its stage (the diagonal), what the first
    task kept after the last stage, and what was lost on the probes: the frontier the methods share."""
    first = next(iter(runs.values()))
    probes = list(first["evaluations"][0]["probes"])
    head = ["method", "new task, right after its stage (mean of the diagonal)", "task 1 after the last stage"]
    head += [f"probes ({name}) lost: worst stage / after the last" for name in probes]
    head += ["KL from start, last stage"]
    rows = [head]
    for method, state in runs.items():
        matrix = score_matrix(state)
        done = len(matrix) - 1
        if done < 1:
            continue
        diagonal = [matrix[i + 1][i] for i in range(done)]
        row = [method.upper(), f"{_pct(sum(diagonal) / done)} ({', '.join(_pct(v) for v in diagonal)})"]
        row.append(_pct(matrix[done][0]))
        for name in probes:
            series = [accuracy(ev["probes"][name]) for ev in state["evaluations"]]
            row.append(
                f"{(series[0] - min(series)) * 100:.1f} pts / {(series[0] - series[-1]) * 100:.1f} pts"
            )
        row.append(f"{state['evaluations'][-1].get('drift', {}).get('kl', float('nan')):.4f}")
        rows.append(row)
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]


def settings_lines(plan: Plan, methods: list[str]) -> list[str]:
    """What each stage trained on and with which settings, per method (from the plan itself)."""
    lines = []
    for method in methods:
        configs = stage_configs(plan, method, "demo_runs")
        parts = []
        for stage, config in zip(plan.stages, configs):
            anchors = plan.anchor_count(stage)
            repeat = f" x {stage.repeat}" if stage.repeat > 1 else ""
            rows = f"{len(stage.train)} rows{repeat}" + (f" + {anchors} anchors" if anchors else "")
            detail = f"{stage.name}: {rows}, {config.max_steps} steps x {config.batch_size}, lr {config.lr:g}"
            if config.min_lr_ratio:
                detail += (
                    " constant" if config.min_lr_ratio == 1.0 else f" (cosine floor {config.min_lr_ratio:g})"
                )
            if method == "sdft":
                source = (
                    f"{config.teacher_rollout_fraction:g} of the rollouts under the teacher prompt, the rest under the student's"
                    if config.rollout_source == "mix"
                    else f"rollouts under the {config.rollout_source} prompt"
                )
                sampling = "".join(
                    text
                    for text, on in (
                        (f" at temperature {config.temperature:g}", config.temperature != 1.0),
                        (f", top-p {config.top_p:g}", config.top_p < 1.0),
                        (f", top-k {config.top_k}", config.top_k > 0),
                    )
                    if on
                )
                detail += (
                    f", {source}{sampling}, {config.num_generations} per prompt, {config.max_new_tokens} tokens, "
                    f"teacher {config.teacher}, skip {config.skip_tokens}"
                )
            parts.append(detail)
        if plan.merge_between_stages:
            parts.append("each stage's adapter merged into the weights before the next")
        if plan.anchors is not None and plan.anchors.rehearse:
            how = {
                ("sdft", "replay"): "with their demonstration in the teacher prompt",
                ("sdft", "prompts"): "without their demonstration",
            }.get((method, plan.anchors.rehearse), "on their demonstration")
            parts.append(f"from stage 2 the anchors also rehearse the earlier stages' rows, {how}")
        seeds = ", ".join(str(c.seed) for c in configs)
        lines.append(
            f"- {method.upper()} (LoRA r{configs[0].lora_rank}, seeds {seeds}): " + "; ".join(parts) + "."
        )
    return lines


def more_threads_note(runs: dict[str, dict[str, Any]], threads: int) -> str:
    """Which stages a run trained with more threads than it started with (the cores of a run that
    had ended), as a sentence; empty where none did."""
    taken = []
    for method, state in runs.items():
        stages = [
            f"{name} ({e['train']['threads']})"
            for name, e in zip(state["stages"], state["evaluations"][1:])
            if e.get("train", {}).get("threads", threads) > threads
        ]
        if stages:
            taken.append(
                f"{method.upper()} trained {', '.join(stages)} with the cores of a run that had ended"
            )
    return (" " + "; ".join(taken) + " (threads in brackets).") if taken else ""


def write_demo_report(
    runs: dict[str, dict[str, Any]],
    plan: Plan,
    report_dir: str | Path,
    *,
    wall_s: float,
    method_s: dict[str, float],
    model_name: str,
    threads: int,
    jobs: int = 1,
) -> dict[str, Path]:
    eval_rows = ", ".join(
        f"{stage.name}: "
        + " / ".join(
            f"{sum(1 for row in stage.eval if row.meta.get('kind', 'eval') == kind)} {kind}"
            for kind in stage.kinds()
        )
        for stage in plan.stages
    )
    notes = [
        f"Written by `sdft-fast demo` on {time.strftime('%Y-%m-%d %H:%M')}: model `{model_name}`, {threads} CPU "
        f"thread(s) per run, {'the methods side by side in ' + str(jobs) + ' processes' if jobs > 1 else 'one run at a time'}; "
        f"whole demo {wall_s:.0f} s ("
        + ", ".join(f"{m.upper()} {s:.0f} s" for m, s in method_s.items())
        + "). Plan: `"
        + plan.source
        + "`."
        + more_threads_note(runs, threads),
        "",
        f"Stages, trained in this order from the same start: {', '.join(s.name for s in plan.stages)}. Evaluation "
        f"rows: {eval_rows}. The matrix shows each task's scored kind (*direct*: rephrasings of the training "
        "questions; *format*: held-out questions answered in the skill's JSON schema); *indirect* questions "
        "(the reverse relation) and *recall* (the training questions themselves) are in the table of every kind. "
        "Probes: general questions the start model answers correctly.",
        "",
        *settings_lines(plan, list(runs)),
        "",
        "Learning against forgetting:",
        "",
        *learning_and_forgetting(runs),
        "",
    ]
    title = f"Continual learning on {model_name}: SDFT beside SFT, {len(plan.stages)} stages"
    paths = write_report(runs, report_dir, stem="demo", title=title, notes=notes)
    log(f"wrote {paths['md']} and {paths['png']}")
    return paths
