"""The built-in demo: the paper's continual-learning result, small.

``sdft-fast demo`` trains the built-in three-stage plan (``assets/continual_demo/plan.yaml``: a
skill the start model lacks but performs with a demonstration in context, then 4 fictional facts,
then 4 other facts) on the embedded SmolLM2-135M-Instruct, once with SDFT and once with SFT from
the same start (side by side where the cores allow), through
:func:`sdft_fast.continual.run_continual`. It writes ``report/demo.md`` and
``report/demo.png``: each method's accuracy matrix (after stage i, task j), ACC / BWT / FWT, the
retention probes and the drift from the start model per stage (plus ``demo.csv``, the matrices as
CSV and each reply under ``report/demo_runs/<method>/answers/``). The plan's comments say where each
setting comes from.

The fact stages' data come from ``assets/demo_facts.jsonl``, 40 fictional facts, one JSON line each::

    {"id": str, "document": str (1-2 sentences),
     "train":    [{"prompt": question, "demonstration": answer grounded in the document}, ...],
     "direct":   [{"prompt": question, "answer": [acceptable short answers]}, ...],
     "indirect": [{"prompt": question, "answer": [...]}, ...]}

Direct questions ask for the fact itself in new words; indirect ones need it applied (the reverse
direction, or a detail reached through another entity). All entities are invented, so the start
model scores about 0 on both. :func:`load_demo_facts` reads and checks that file (the recipe
benchmark, ``bench/bench_recipe.py``, draws its fact sets from it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_fast.data import DataError, Example, parse_record

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_FACTS_PATH = ASSETS / "demo_facts.jsonl"
DEMO_PLAN_PATH = ASSETS / "continual_demo" / "plan.yaml"


@dataclass(frozen=True)
class DemoFacts:
    train: list[Example]  # prompt + demonstration rows (the demonstration: an answer sentence)
    direct: list[Example]  # held-out questions with short answers; demonstration = the fact's document
    indirect: list[Example]  # questions that apply the fact; demonstration = the fact's document
    documents: dict[str, str]  # fact id -> document


def load_demo_facts(path: str | os.PathLike | None = None) -> DemoFacts:
    """Read the demo facts; every row goes through the same validation as user data."""
    path = Path(path) if path is not None else DEMO_FACTS_PATH
    source = str(path)
    train, direct, indirect, documents = [], [], [], {}
    with open(path, encoding="utf-8") as handle:
        lines = list(handle)
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fact = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(source, line_number, None, f"invalid JSON: {error.msg}") from error
        fact_id, document = fact.get("id"), fact.get("document")
        if not isinstance(fact_id, str) or not fact_id:
            raise DataError(source, line_number, "id", "must be a non-empty string")
        if fact_id in documents:
            raise DataError(source, line_number, "id", f"duplicate fact id {fact_id!r}")
        if not isinstance(document, str) or not document.strip():
            raise DataError(source, line_number, "document", "must be a non-empty string")
        documents[fact_id] = document
        for kind, bucket in (("train", train), ("direct", direct), ("indirect", indirect)):
            rows = fact.get(kind)
            if not isinstance(rows, list) or not rows:
                raise DataError(source, line_number, kind, "must be a non-empty list")
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise DataError(source, line_number, f"{kind}[{index}]", "must be an object")
                record = dict(row, fact=fact_id, kind=kind, index=index)
                if kind != "train":
                    if not row.get("answer"):
                        raise DataError(source, line_number, f"{kind}[{index}].answer", "is missing")
                    record["demonstration"] = document
                try:
                    bucket.append(parse_record(record, source=source, row=line_number))
                except DataError as error:
                    # Re-raise with the nested location, e.g. field "direct[0].prompt".
                    field_name = f"{kind}[{index}]" + (f".{error.field}" if error.field else "")
                    raise DataError(source, line_number, field_name, error.problem) from error
    if not documents:
        raise DataError(source, None, None, "contains no facts")
    return DemoFacts(train, direct, indirect, documents)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_jobs(methods: list[str]) -> int:
    """Methods trained side by side: one process per method where the machine has a core for each.

    Two runs of one small model side by side, each at its own share of the cores, finish sooner than
    the same runs one after the other at all cores (torch's threads scale poorly at this size, and
    on a busy machine threads wait for one another at every barrier)."""
    return max(1, min(len(methods), usable_cores()))


_finished_runs = None  # a pool worker's view of how many of the demo's runs have ended (shared)


def _init_worker(finished) -> None:
    global _finished_runs
    _finished_runs = finished


def _take_released_cores(job: dict[str, Any]) -> None:
    """Before a stage: once other runs of the demo have ended, share all the cores among the runs
    still training (torch's thread count is set per thread, so only the training thread can)."""
    import torch

    if _finished_runs is None or not job["share_cores"]:
        return
    running = max(1, job["jobs"] - _finished_runs.value)
    threads = max(job["threads"], job["cores"] // running)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def _train_method(job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One method's continual run: in this process, or in a pool worker of its own (jobs > 1)."""
    import torch

    from sdft_fast.continual import run_continual
    from sdft_fast.continual_plan import load_plan

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    try:
        state = run_continual(
            load_plan(job["plan"]),
            model_path=job["model_path"],
            run_dir=job["run_dir"],
            method=job["method"],
            overrides=job["overrides"],
            start=job["start"],
            before_stage=lambda number: _take_released_cores(job),
        )
    finally:
        if _finished_runs is not None:
            with _finished_runs.get_lock():
                _finished_runs.value += 1
    return state, time.perf_counter() - started


def run_demo(args) -> dict[str, Any]:
    """Train the demo plan with each method of ``args.methods`` from the same start; write the report.

    The start model is scored once, and every method's run starts from that evaluation (the same
    model, rows and scorer). With ``args.jobs`` > 1 (default: one process per method where the cores
    allow, see :func:`default_jobs`) the methods train side by side in processes of their own, each
    with ``args.threads`` threads (default: its share of the cores). ``args.resume`` continues an
    interrupted demo from ``report/demo_runs/``; without it that folder starts empty.
    """
    import multiprocessing

    import torch

    from sdft_fast.continual import load_state, log, score_start_model
    from sdft_fast.continual_plan import load_plan
    from sdft_fast.default_model import resolve_model_path
    from sdft_fast.demo_report import write_demo_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("sdft", "sft") for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"--methods: a comma-separated list of sdft and sft, got {args.methods!r}")
    jobs = getattr(args, "jobs", 0) or default_jobs(methods)
    if jobs < 1:
        raise ValueError(f"--jobs: expected a number >= 1 (0: automatic), got {jobs}")
    jobs = min(jobs, len(methods))
    cores = usable_cores()
    threads = args.threads or max(1, cores // jobs)
    started = time.perf_counter()
    plan_path = args.plan or DEMO_PLAN_PATH
    plan = load_plan(plan_path)  # a bad plan fails before the model loads
    model_path = resolve_model_path(args.model)
    report_dir = Path(args.report_dir)
    runs_dir = report_dir / "demo_runs"
    if not args.resume and runs_dir.exists():
        shutil.rmtree(runs_dir)
    overrides = {"device": args.device, "dtype": args.dtype, "progress": not args.no_progress and jobs == 1}
    runs: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    # One scoring of the start model for every method: a resumed demo takes it from a run's state.
    start = None
    for method in methods:
        saved = load_state(runs_dir / method) if args.resume else None
        if saved and saved.get("evaluations"):
            start = saved["evaluations"][0]
            break
    if start is None and (jobs > 1 or len(methods) > 1):
        torch.set_num_threads(args.threads or cores)
        log(f"scoring the start model once for {', '.join(methods)}")
        start = score_start_model(plan, model_path=model_path, method=methods[0], overrides=overrides)
    method_jobs = [
        {
            "plan": str(plan_path),
            "model_path": str(model_path),
            "run_dir": str(runs_dir / method),
            "method": method,
            "overrides": overrides,
            "start": start,
            "threads": threads,
            "cores": cores,
            "jobs": jobs,
            # --threads fixes every run's thread count; by default a run that starts a stage after
            # the others have ended takes up their cores (the SFT run ends first).
            "share_cores": not args.threads,
        }
        for method in methods
    ]
    if jobs > 1:
        # spawn: a fresh interpreter per run (no forked torch thread pools or locks).
        context = multiprocessing.get_context("spawn")
        finished = context.Value("i", 0)
        with context.Pool(jobs, initializer=_init_worker, initargs=(finished,)) as pool:
            results = pool.map(_train_method, method_jobs, chunksize=1)
    else:
        results = [_train_method(job) for job in method_jobs]
    for method, (state, method_s) in zip(methods, results):
        runs[method], seconds[method] = state, method_s
    write_demo_report(
        runs,
        plan,
        report_dir,
        wall_s=time.perf_counter() - started,
        method_s=seconds,
        model_name=model_path.name,
        threads=threads,
        jobs=jobs,
    )
    return runs
