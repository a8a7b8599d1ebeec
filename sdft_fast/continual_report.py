"""A continual run's report: the accuracy matrix, transfer metrics, Markdown, CSV and a plot.

With T tasks trained in order and R[i][j] the accuracy on task j after stage i (row 0: the start
model, b_j = R[0][j]), as in Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for Continual
Learning", section 4; their b_j is a randomly initialised model's accuracy, here the start model's,
the baseline that fine-tuning starts from):

    ACC = 1/T     sum_{j=1..T}   R[T][j]                 average accuracy after the last stage
    BWT = 1/(T-1) sum_{j=1..T-1} (R[T][j] - R[j][j])     backward transfer; negative = forgetting
    FWT = 1/(T-1) sum_{j=2..T}   (R[j-1][j] - b_j)       forward transfer: what the earlier stages
                                                          gave a task before its own stage

BWT and FWT need T >= 2; an unfinished run has none of the three.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFINITIONS = (
    "R[i][j] is the accuracy on task j after stage i (row 0: the start model, b_j = R[0][j]); T tasks. "
    "**ACC** = mean_j R[T][j], the average accuracy after the last stage. **BWT** (backward transfer) = "
    "mean over j < T of R[T][j] - R[j][j]: how much training the later stages changed each task after its "
    "own stage; negative is forgetting. **FWT** (forward transfer) = mean over j >= 2 of R[j-1][j] - b_j: "
    "what the earlier stages gave a task before its own stage. As in Lopez-Paz & Ranzato 2017 (GEM), with "
    "the start model's accuracy as b_j. *Demonstration in context*: the task's scored rows answered with "
    "their demonstration in the prompt (the stage's teacher template) — by the start model, and for the "
    "next task by the model about to train on it: the ceiling its teacher view offers, and the quality of "
    "rollouts sampled under the teacher prompt."
)


def accuracy(tally: Sequence[int] | None) -> float:
    """[correct, n] -> correct / n (nan when there is nothing to count)."""
    if not tally or not tally[1]:
        return math.nan
    return tally[0] / tally[1]


def score_matrix(state: dict[str, Any]) -> list[list[float]]:
    """R: one row per evaluation (start, then after each finished stage), one column per task."""
    return [[accuracy(ev["tasks"][name]["score"]) for name in state["stages"]] for ev in state["evaluations"]]


def transfer_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """ACC, BWT and FWT of a full matrix (T + 1 rows of T); None where undefined or unfinished."""
    tasks = len(matrix[0]) if matrix else 0
    if tasks == 0 or len(matrix) < tasks + 1:
        return {"acc": None, "bwt": None, "fwt": None}
    last = matrix[tasks]
    acc = sum(last) / tasks
    if tasks < 2:
        return {"acc": acc, "bwt": None, "fwt": None}
    bwt = sum(last[j] - matrix[j + 1][j] for j in range(tasks - 1)) / (tasks - 1)
    fwt = sum(matrix[j][j] - matrix[0][j] for j in range(1, tasks)) / (tasks - 1)
    return {"acc": acc, "bwt": bwt, "fwt": fwt}


def _stage_labels(state: dict[str, Any]) -> list[str]:
    done = len(state["evaluations"]) - 1
    return ["start"] + [f"{i}. {name}" for i, name in enumerate(state["stages"][:done], start=1)]


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 100:.1f}%"


def _pp(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f} pts"


def _cell(tally: Sequence[int] | None) -> str:
    return "-" if not tally else f"{_pct(accuracy(tally))} ({tally[0]}/{tally[1]})"


def _probe_names(state: dict[str, Any]) -> list[str]:
    return list(state["evaluations"][0].get("probes", {})) if state["evaluations"] else []


def _score_kind(state: dict[str, Any], task: str) -> str | None:
    return (state.get("score_kinds") or {}).get(task)


def _markdown_table(rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]


def method_tables(state: dict[str, Any]) -> list[str]:
    """Markdown: the matrix (tasks, probes, drift per stage), then every other row kind per task."""
    tasks = state["stages"]
    probes = _probe_names(state)
    head = ["after stage"]
    for number, task in enumerate(tasks, start=1):
        kind = _score_kind(state, task)
        head.append(f"task {number}: {task}" + (f" ({kind})" if kind else ""))
    head += [f"probes: {name}" for name in probes] + ["KL from start", "NLL increase"]
    next_in_context = any("next_in_context" in ev for ev in state["evaluations"])
    if next_in_context:
        head.append("next task, demonstration in context")
    rows = [head]
    start = state["evaluations"][0] if state["evaluations"] else {}
    for label, ev in zip(_stage_labels(state), state["evaluations"]):
        row = [label]
        for number, task in enumerate(tasks, start=1):
            cell = _cell(ev["tasks"][task]["score"])
            row.append(f"**{cell}**" if label.startswith(f"{number}. ") else cell)
        for name in probes:
            tally = ev["probes"][name]
            delta = accuracy(tally) - accuracy(start["probes"][name])
            row.append(_cell(tally) + ("" if label == "start" else f" {_pp(delta)}"))
        drift = ev.get("drift") or {}
        row += [
            f"{drift['kl']:.4f}" if "kl" in drift else "-",
            f"{drift['dnll']:+.4f}" if "dnll" in drift else "-",
        ]
        if next_in_context:
            row.append(_cell(ev.get("next_in_context")))
        rows.append(row)
    in_context = start.get("in_context") or {}
    if in_context:
        row = ["start, demonstration in context"]
        row += [_cell(in_context.get(task)) for task in tasks]
        row += ["" for _ in probes] + ["", ""] + ([""] if next_in_context else [])
        rows.append(row)
    lines = _markdown_table(rows)
    # Every row kind of every task, where a task has more than the one the matrix shows.
    extra = []
    for task in tasks:
        kinds = sorted(start.get("tasks", {}).get(task, {}).get("kinds", {})) if start else []
        if len(kinds) > 1 or (kinds and _score_kind(state, task) not in (None, *kinds)):
            extra += [(task, kind) for kind in kinds]
    if extra:
        rows = [["after stage"] + [f"{task}: {kind}" for task, kind in extra]]
        for label, ev in zip(_stage_labels(state), state["evaluations"]):
            rows.append([label] + [_cell(ev["tasks"][task]["kinds"].get(kind)) for task, kind in extra])
        lines += ["", "Every kind of evaluation row:", "", *_markdown_table(rows)]
    return lines


def summary_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per method: transfer metrics, probes and drift after the last stage, training time."""
    out = []
    for method, state in runs.items():
        metrics = transfer_metrics(score_matrix(state))
        last = state["evaluations"][-1]
        row: dict[str, Any] = {"method": method, **metrics, "stages_done": len(state["evaluations"]) - 1}
        for name in _probe_names(state):
            series = [accuracy(ev["probes"][name]) for ev in state["evaluations"]]
            row[f"probes:{name}:start"] = series[0]
            row[f"probes:{name}:last"] = series[-1]
            row[f"probes:{name}:worst_drop"] = max(series[0] - value for value in series)
        row["kl_last"] = (last.get("drift") or {}).get("kl")
        row["dnll_last"] = (last.get("drift") or {}).get("dnll")
        row["train_s"] = sum((ev.get("train") or {}).get("train_s", 0.0) for ev in state["evaluations"])
        out.append(row)
    return out


def summary_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(runs.values()))
    probes = _probe_names(first)
    head = ["method", "ACC", "BWT", "FWT"]
    head += [f"probes: {name}, start -> last (worst drop)" for name in probes]
    head += ["KL from start (last)", "NLL increase (last)", "train time"]
    rows = [head]
    for row in summary_rows(runs):
        cells = [row["method"].upper(), _pct(row["acc"]), _pp(row["bwt"]), _pp(row["fwt"])]
        for name in probes:
            cells.append(
                f"{_pct(row[f'probes:{name}:start'])} -> {_pct(row[f'probes:{name}:last'])} "
                f"({row[f'probes:{name}:worst_drop'] * 100:.1f} pts)"
            )
        cells += [
            "-" if row["kl_last"] is None else f"{row['kl_last']:.4f}",
            "-" if row["dnll_last"] is None else f"{row['dnll_last']:+.4f}",
            f"{row['train_s']:.0f} s",
        ]
        rows.append(cells)
    return _markdown_table(rows)


def csv_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Long format: one row per (method, evaluation, measured thing)."""
    out = []
    for method, state in runs.items():
        for index, (label, ev) in enumerate(zip(_stage_labels(state), state["evaluations"])):
            base = {"method": method, "after_stage": index, "after_stage_name": label}
            for task in state["stages"]:
                entry = ev["tasks"][task]
                out.append(
                    {
                        **base,
                        "group": "task",
                        "name": task,
                        "kind": _score_kind(state, task) or "all",
                        "correct": entry["score"][0],
                        "n": entry["score"][1],
                        "value": accuracy(entry["score"]),
                    }
                )
                for kind, tally in entry["kinds"].items():
                    out.append(
                        {
                            **base,
                            "group": "task_kind",
                            "name": task,
                            "kind": kind,
                            "correct": tally[0],
                            "n": tally[1],
                            "value": accuracy(tally),
                        }
                    )
            for name, tally in ev.get("probes", {}).items():
                out.append(
                    {
                        **base,
                        "group": "probes",
                        "name": name,
                        "kind": "",
                        "correct": tally[0],
                        "n": tally[1],
                        "value": accuracy(tally),
                    }
                )
            for name, value in (ev.get("drift") or {}).items():
                out.append(
                    {
                        **base,
                        "group": "drift",
                        "name": name,
                        "kind": "",
                        "correct": "",
                        "n": "",
                        "value": value,
                    }
                )
    return out


def write_report(
    runs: dict[str, dict[str, Any]],
    report_dir: str | Path,
    *,
    stem: str = "continual",
    title: str | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (long format), ``<stem>_matrix.csv`` (R per method),
    ``<stem>.json`` (the summary) and ``<stem>.png``; return their paths."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))
    title = title or f"Continual learning: {first.get('plan', 'plan')} ({len(first['stages'])} stages)"
    lines = [f"# {title}", "", *notes, "" if notes else None, *summary_table(runs), ""]
    for method, state in runs.items():
        lines += [f"## {method.upper()}: accuracy after each stage (rows) on each task (columns)", ""]
        lines += method_tables(state) + [""]
    lines += [
        "## Definitions",
        "",
        DEFINITIONS,
        "",
        f"![accuracy matrix, probes and drift per stage]({stem}.png)",
        "",
    ]
    paths = {"md": report_dir / f"{stem}.md"}
    paths["md"].write_text("\n".join(line for line in lines if line is not None))

    paths["csv"] = report_dir / f"{stem}.csv"
    rows = csv_rows(runs)
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["matrix"] = report_dir / f"{stem}_matrix.csv"
    with open(paths["matrix"], "w", newline="") as handle:
        writer = csv.writer(handle)
        for method, state in runs.items():
            writer.writerow(["method", "after_stage", *state["stages"]])
            for label, row in zip(_stage_labels(state), score_matrix(state)):
                writer.writerow([method, label, *(f"{value:.6f}" for value in row)])
    paths["json"] = report_dir / f"{stem}.json"
    paths["json"].write_text(
        json.dumps({"title": title, "summary": summary_rows(runs)}, indent=1, default=str)
    )
    paths["png"] = report_dir / f"{stem}.png"
    plot_runs(runs, paths["png"], title=title)
    return paths


def plot_runs(runs: dict[str, dict[str, Any]], path: Path, *, title: str) -> None:
    """One heatmap of R per method, side by side, then the probes and the KL from start per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(runs)
    figure, axes = plt.subplots(1, count + 2, figsize=(4.2 * count + 7.5, 4.2), squeeze=False)
    axes = axes[0]
    colours = {"sdft": "#1f77b4", "sft": "#ff7f0e"}
    for axis, (method, state) in zip(axes, runs.items()):
        matrix = score_matrix(state)
        image = axis.imshow(
            [[v * 100 for v in row] for row in matrix], vmin=0, vmax=100, cmap="viridis", aspect="auto"
        )
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                text = "-" if math.isnan(value) else f"{value * 100:.0f}"
                axis.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if value < 0.6 else "black",
                    fontweight="bold" if i == j + 1 else None,
                )
        axis.set_xticks(range(len(state["stages"])), state["stages"], rotation=20, fontsize=8)
        axis.set_yticks(range(len(matrix)), _stage_labels(state), fontsize=8)
        axis.set_xlabel("task")
        axis.set_ylabel("after stage")
        metrics = transfer_metrics(matrix)
        axis.set_title(f"{method.upper()}: ACC {_pct(metrics['acc'])}, BWT {_pp(metrics['bwt'])}", fontsize=9)
    figure.colorbar(image, ax=axes[count - 1], fraction=0.046, pad=0.04, label="accuracy (%)")
    probes_axis, drift_axis = axes[count], axes[count + 1]
    for method, state in runs.items():
        colour = colours.get(method)
        xs = list(range(len(state["evaluations"])))
        for style, name in zip(("-", "--", ":"), _probe_names(state)):
            probes_axis.plot(
                xs,
                [accuracy(ev["probes"][name]) * 100 for ev in state["evaluations"]],
                style,
                marker="o",
                color=colour,
                label=f"{method.upper()} {name}",
            )
        drift_axis.plot(
            xs,
            [(ev.get("drift") or {}).get("kl", math.nan) for ev in state["evaluations"]],
            marker="o",
            color=colour,
            label=method.upper(),
        )
    labels = _stage_labels(next(iter(runs.values())))
    for axis, name in ((probes_axis, "probe accuracy (%)"), (drift_axis, "KL from start (per token)")):
        axis.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        axis.set_xlabel("after stage")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    probes_axis.set_title("retention: general probes", fontsize=9)
    drift_axis.set_title("drift from the start model", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
