"""The continual report: transfer metrics by hand, and the files written from a run's state."""

import csv
import math

import pytest

from sdft_fast.continual_report import accuracy, score_matrix, transfer_metrics, write_report


def test_transfer_metrics_by_hand():
    matrix = [
        [0.0, 0.1, 0.2],  # start: b_j
        [0.8, 0.2, 0.2],  # after stage 1
        [0.6, 0.9, 0.3],  # after stage 2
        [0.5, 0.7, 1.0],  # after stage 3
    ]
    metrics = transfer_metrics(matrix)
    assert metrics["acc"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25: forgetting
    assert metrics["fwt"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)  # +0.1
    assert transfer_metrics(matrix[:3]) == {"acc": None, "bwt": None, "fwt": None}  # unfinished run
    assert transfer_metrics([[0.0], [0.75]]) == {"acc": 0.75, "bwt": None, "fwt": None}  # one task
    assert math.isnan(accuracy([0, 0])) and accuracy([3, 4]) == 0.75


def fake_state(method, matrix_counts, n=4):
    """A finished two-stage run's state with [correct, n] counts per (evaluation, task)."""
    stages = ["facts", "skill"]
    evaluations = []
    for index, counts in enumerate(matrix_counts):
        evaluations.append(
            {
                "tasks": {
                    name: {"score": [c, n], "kinds": {"direct": [c, n], "indirect": [0, 2]}}
                    for name, c in zip(stages, counts)
                },
                "probes": {"retention": [40 - 2 * index, 40]},
                "drift": {"kl": 0.05 * index, "dnll": 0.02 * index},
                **({"train": {"steps": 3, "train_s": 10.0, "final_loss": 0.1}} if index else {}),
                **({"in_context": {"facts": [4, 4], "skill": [3, 4]}} if index == 0 else {}),
            }
        )
    return {
        "plan": "toy",
        "method": method,
        "stages": stages,
        "score_kinds": {"facts": "direct", "skill": None},
        "evaluations": evaluations,
    }


def test_report_files_hold_the_matrix_metrics_and_every_kind(tmp_path):
    runs = {
        "sdft": fake_state("sdft", [[0, 1], [3, 1], [2, 4]]),
        "sft": fake_state("sft", [[0, 1], [4, 0], [1, 4]]),
    }
    assert score_matrix(runs["sdft"]) == [[0.0, 0.25], [0.75, 0.25], [0.5, 1.0]]
    paths = write_report(runs, tmp_path, stem="demo", title="toy plan")
    markdown = paths["md"].read_text()
    # SDFT: ACC (0.5 + 1) / 2 = 75%, BWT 0.5 - 0.75 = -25 pts, FWT 0.25 - 0.25 = 0.
    assert "| SDFT | 75.0% | -25.0 pts | +0.0 pts |" in markdown
    assert "| SFT | 62.5% | -75.0 pts | -25.0 pts |" in markdown
    assert "**75.0% (3/4)**" in markdown  # the diagonal is bold
    assert "retention" in markdown and "95.0% (38/40) -5.0 pts" in markdown
    assert "facts: indirect" in markdown and "start, demonstration in context" in markdown
    assert "Lopez-Paz" in markdown
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    tasks = [r for r in rows if r["group"] == "task"]
    assert len(tasks) == 2 * 3 * 2  # methods x evaluations x tasks
    row = next(r for r in tasks if r["method"] == "sft" and r["after_stage"] == "1" and r["name"] == "facts")
    assert (row["correct"], row["n"], float(row["value"])) == ("4", "4", 1.0)
    matrix_lines = paths["matrix"].read_text().splitlines()
    assert matrix_lines[0] == "method,after_stage,facts,skill" and len(matrix_lines) == 2 * 4
    assert paths["png"].stat().st_size > 10_000
