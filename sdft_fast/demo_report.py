"""The demo's report: a table on stdout, ``demo.md``, ``demo.json``, ``demo_answers.json`` and ``demo.png``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def score_line(name: str, scores: dict[str, Any]) -> str:
    return (
        f"{name}: direct {scores['direct']:.0%}, indirect {scores['indirect']:.0%}, "
        f"retention {scores['retention']:.0%}, KL from start {scores['kl_from_start']:.4f}"
    )


def _demo_table(results: dict[str, Any]) -> list[list[str]]:
    start = results["start"]
    rows = [["model", "new facts: direct", "new facts: indirect", "retention", "KL from start", "train time"]]
    rows.append(
        [
            f"start ({results.get('model', 'start model')})",
            f"{start['direct']:.1%}",
            f"{start['indirect']:.1%}",
            f"{start['retention']:.1%}",
            "0",
            "-",
        ]
    )
    for method, scores in results["methods"].items():
        rows.append(
            [
                f"{method.upper()} ({scores['steps']} steps)",
                f"{scores['direct']:.1%}",
                f"{scores['indirect']:.1%}",
                f"{scores['retention']:.1%} ({(scores['retention'] - start['retention']) * 100:+.1f} pts)",
                f"{scores['kl_from_start']:.4f}",
                f"{scores['train_s']:.0f} s",
            ]
        )
    return rows


def _format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _training_data_line(results: dict[str, Any]) -> str:
    """What both methods trained on, from the loaded demo data (not a constant)."""
    data = results.get("data")
    if not data:
        return "- Training data: not recorded."
    low, high = data["train_prompts_per_fact_min"], data["train_prompts_per_fact_max"]
    per_fact = f"{low}" if low == high else f"{low}-{high}"
    return (
        f"- Training data (both methods): {data['train_prompts']} training prompts for {data['facts']} facts "
        f"({per_fact} per fact, each with a demonstration grounded in the fact's document); evaluated on "
        f"{data['direct_questions']} direct and {data['indirect_questions']} indirect held-out questions "
        "(none is a training prompt; the direct ones rephrase a training question, the indirect ones do not)."
    )


def _method_settings_line(settings: dict[str, Any]) -> str:
    batch = settings["batch_size"]
    generations = settings.get("num_generations", 1)
    sdft = (
        f"SDFT: {settings['sdft_steps']} steps x {batch} rollouts ({batch // generations} prompts x "
        f"{generations} samples each, {settings['max_new_tokens']} tokens, temperature 1), lr {settings['sdft_lr']}, "
        f"teacher {settings['teacher']}"
        + (f" (EMA rate {settings['ema_rate']})" if settings["teacher"] == "ema" else "")
        + f", forward KL, skip_tokens {settings['skip_tokens']}"
    )
    sft = f"SFT: {settings['sft_steps']} steps x {batch} demonstrations, lr {settings['sft_lr']}"
    return f"- {sdft}; {sft}; both LoRA r{settings['lora_rank']}, warmup {settings['warmup_steps']} steps, seed {settings['seed']}."


def write_demo_report(results: dict[str, Any], report_dir: Path, *, model_name: str) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = _demo_table(results)
    print(_format_table(rows))
    start = results["start"]
    settings = results["settings"]
    markdown = [
        f"# SDFT vs SFT: injecting {results.get('data', {}).get('facts', 40)} fictional facts into {model_name}",
        "",
        f"Written by `sdft-fast demo` on {time.strftime('%Y-%m-%d %H:%M')}; whole demo {results['wall_s']:.0f} s "
        f"(model `{model_name}`).",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
        "",
        "- *direct*: held-out rephrasings of each fact's question; *indirect*: questions that need the "
        "fact applied (e.g. the reverse direction); *retention*: 40 built-in general-knowledge probes; "
        "*KL from start*: mean per-token KL(trained || start) on 16 general prompts.",
        f"- With the fact in context (the teacher's view) the start model answers "
        f"{start.get('direct_in_context', float('nan')):.1%} of the direct questions: the ceiling for what "
        "self-distillation can transfer from this teacher.",
        _training_data_line(results),
        _method_settings_line(settings),
        "- All settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".",
        f"- Teacher prompt template: `{results.get('teacher_template', '')!r}`.",
        "",
        "![SDFT vs SFT](demo.png)",
        "",
    ]
    (report_dir / "demo.md").write_text("\n".join(markdown))
    summary = {k: v for k, v in results.items() if k not in ("start", "methods")}
    summary["start"] = {k: v for k, v in start.items() if k != "records"}
    summary["methods"] = {
        m: {k: v for k, v in s.items() if k != "records"} for m, s in results["methods"].items()
    }
    (report_dir / "demo.json").write_text(json.dumps(summary, indent=1))
    records = {"start": start["records"], **{m: s["records"] for m, s in results["methods"].items()}}
    (report_dir / "demo_answers.json").write_text(json.dumps(records, indent=1, ensure_ascii=False))
    _plot_demo(results, report_dir / "demo.png")
    log(f"wrote {report_dir / 'demo.md'} and {report_dir / 'demo.png'}")


def _plot_demo(results: dict[str, Any], path: Path, *, subject: str = "40 fictional facts") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("direct", "new facts: direct"),
        ("indirect", "new facts: indirect"),
        ("retention", "retention"),
    ]
    series = [("start", results["start"], "#9e9e9e")]
    colours = {"sdft": "#1f77b4", "sft": "#ff7f0e"}
    for method, scores in results["methods"].items():
        series.append((f"{method.upper()} after", scores, colours.get(method, "#2ca02c")))
    figure, axis = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    for offset, (label, scores, colour) in enumerate(series):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(metrics))]
        values = [scores[key] * 100 for key, _ in metrics]
        bars = axis.bar(xs, values, width=width, label=label, color=colour)
        axis.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    axis.set_xticks(range(len(metrics)), [name for _, name in metrics])
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 110)
    kl = ", ".join(f"{m.upper()} {s['kl_from_start']:.3f}" for m, s in results["methods"].items())
    axis.set_title(f"SmolLM2-135M-Instruct, {subject} (KL from start: {kl})", fontsize=10)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
