"""Benchmark: one process vs N processes (torchrun) on the same global batch.

Every configuration trains the same run — the embedded SmolLM2-135M-Instruct (or ``--model``),
the built-in demo's training facts, SDFT with forward KL and an EMA teacher, rollouts of exactly
``--completion`` tokens, ``--global-batch`` sequences per optimizer step — and differs only in how
the work is spread (``--layouts``, processes x threads per process):

  1xT   one process, ``grad_accum`` = the number of micro-batches of the global batch
  NxT   ``torchrun --nproc-per-node N``: each rank samples and scores 1/N of the batch; LoRA sums
        the adapter's gradients (all-reduce), full fine-tuning shards with FSDP2 (and scores on
        the generic two-pass path, where one process takes the packed one-pass path)

Each configuration runs in fresh interpreters, ``--rounds`` times in alternating order; the figure
is the median step time after ``--warmup`` steps (a multi-rank step lasts as long as its slowest
rank, as the trainer reports it), turned into sequences per second and a speed-up over the first
layout. ``cores_used_rank0`` is the CPU time rank 0 got per second of training (1.0 = one whole
core) and ``cpu_s_per_seq`` the CPU seconds all ranks spent per sequence: the work itself, which
the machine's load does not change. On a CPU with C cores, N processes share those C cores with
each other and with whatever else runs on the machine (on a busy machine N processes also take N
shares of it from the other jobs): 2x1 competes with 1x2, not with 1x1. On GPUs each process has
its own.

    python bench/bench_scale.py                                  # CPU: 1x1, 1x2, 2x1; LoRA and full FT
    python bench/bench_scale.py --device cuda --layouts 1x1,2x1,4x1,8x1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args) -> None:
    """One rank of one configuration (started by torchrun, or alone for procs=1)."""
    import torch

    from sdft_fast.config import TrainConfig
    from sdft_fast.data import DEFAULT_TEACHER_TEMPLATE, DataLimits, encode_examples
    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.demo import load_demo_facts
    from sdft_fast.distributed import Launch, Ranks, end_process_group, init_process_group
    from sdft_fast.run import train
    from sdft_fast.trainer import build_model

    torch.set_num_threads(args.threads)
    launch = Launch.from_environment()
    micro_batches = args.global_batch // args.batch_size
    if micro_batches % launch.world_size:
        raise SystemExit(f"{micro_batches} micro-batches do not split over {launch.world_size} ranks")
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    encoded = encode_examples(  # the built-in demo's training facts
        load_demo_facts().train, tokenizer, limits=DataLimits(), teacher_template=DEFAULT_TEACHER_TEMPLATE
    )
    config = TrainConfig(
        batch_size=args.batch_size,
        grad_accum=micro_batches // launch.world_size,  # per rank: the global batch stays the same
        max_new_tokens=args.completion,
        ignore_eos=True,  # equal work per step
        max_steps=args.warmup + args.steps,
        lora_rank=args.lora_rank,
        teacher="ema",
        dtype="float32" if args.device == "cpu" else "bfloat16",
        device=args.device,
        progress=False,
        report_to="none",
    )
    config.device = init_process_group(launch, config.device, config.dist_timeout_s)
    try:
        model = build_model(model_path, config)
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        rows = train(model, tokenizer, encoded, config, ranks=Ranks()).metrics
        # CPU seconds this rank got per wall second of training (1.0 = one core all the time).
        cores_used = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
    finally:
        end_process_group(launch)
    if launch.rank == 0:
        step_s = [row["step_s"] for row in rows][args.warmup :]
        peak = max(r["peak_memory_mb"] for r in rows)
        print(json.dumps({"step_s": step_s, "peak_memory_mb": peak, "cores_used": cores_used}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configuration(args, procs: int, threads: int, lora_rank: int) -> dict:
    worker_args = [
        "--worker",
        "--device", args.device,
        "--threads", str(threads),
        "--lora-rank", str(lora_rank),
        "--global-batch", str(args.global_batch),
        "--batch-size", str(args.batch_size),
        "--completion", str(args.completion),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.model:
        worker_args += ["--model", args.model]
    script = str(Path(__file__).resolve())
    if procs == 1:
        command = [sys.executable, script, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
        command += [f"--master-port={free_port()}", script, *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="local HF folder (default: embedded SmolLM2-135M)")
    parser.add_argument(
        "--layouts",
        default="1x1,1x2,2x1",
        help="processes x threads per process to compare; the first is the speed-up's baseline",
    )
    parser.add_argument("--modes", default="lora,full", help="lora (adapter all-reduce), full (FSDP2)")
    parser.add_argument(
        "--threads", type=int, default=1, help=argparse.SUPPRESS
    )  # the worker's, from --layouts
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--completion", type=int, default=24, help="rollout tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="repeats of every configuration, alternating")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    cores = os.cpu_count() or 1
    env = harness.environment(args.device)
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    configurations = [(mode, procs, threads) for mode in args.modes.split(",") for procs, threads in layouts]
    # Rounds in alternating order: slow drift of a shared machine hits every configuration alike.
    measured: dict[tuple[str, int, int], list[dict]] = {c: [] for c in configurations}
    for round_index in range(args.rounds):
        for mode, procs, threads in configurations if round_index % 2 == 0 else configurations[::-1]:
            print(f"round {round_index + 1}: {mode} {procs}x{threads} ...", file=sys.stderr, flush=True)
            lora_rank = args.lora_rank if mode == "lora" else 0
            measured[(mode, procs, threads)].append(run_configuration(args, procs, threads, lora_rank))

    def median_step(runs):
        return statistics.median(s for r in runs for s in r["step_s"]) if runs else None

    rows = []
    for mode, procs, threads in configurations:
        runs = [r for r in measured[(mode, procs, threads)] if "step_s" in r]
        errors = [r["error"] for r in measured[(mode, procs, threads)] if "error" in r]
        step = median_step(runs)
        base = median_step([r for r in measured[(mode, *layouts[0])] if "step_s" in r])
        cores_used = statistics.median(r["cores_used"] for r in runs) if runs else 0.0
        rows.append(
            {
                **env,
                "cores": cores,
                "load_avg_1min": round(os.getloadavg()[0], 1),
                "mode": mode,
                "procs": procs,
                "threads_per_proc": threads,
                "global_batch": args.global_batch,
                "completion": args.completion,
                "steps_timed": sum(len(r["step_s"]) for r in runs),
                "step_s": "" if step is None else round(step, 2),
                "seq_per_s": "" if step is None else round(args.global_batch / step, 3),
                "speedup": "" if step is None or base is None else round(base / step, 2),
                "cores_used_rank0": "" if not runs else round(cores_used, 2),
                # CPU seconds spent per sequence, all ranks (assumed alike): the work, whatever the load
                "cpu_s_per_seq": ""
                if step is None
                else round(step * cores_used * procs / args.global_batch, 2),
                "peak_mib_rank0": round(max(r["peak_memory_mb"] for r in runs)) if runs else "",
                "error": " / ".join(errors)[:300],
            }
        )
    harness.append_csv(RESULTS / "scale.csv", rows)
    print(f"\n{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}")
    columns = ["mode", "procs", "threads_per_proc", "steps_timed", "step_s", "seq_per_s", "speedup"]
    columns += ["cores_used_rank0", "cpu_s_per_seq", "peak_mib_rank0", "load_avg_1min", "error"]
    print(harness.markdown_table(rows, columns))


if __name__ == "__main__":
    main()
