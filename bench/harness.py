"""Shared benchmark harness: environment facts, timing, peak memory, CSV rows, markdown tables.

Benchmarks are scripts, not tests. Each one measures its contenders side by side in one run
(these machines are noisy: compare ratios within a run, not across runs), appends CSV rows that
say where they came from (device, versions, commit) and prints a markdown table.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit of the checkout (-dirty when tracked files differ); $SDFT_COMMIT where no .git travels."""
    if os.environ.get("SDFT_COMMIT"):
        return os.environ["SDFT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        )
        return (
            out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else "unknown"
        )
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(steps: dict, repeats: int, device: str, warmup: int = 1) -> dict:
    """Milliseconds of every ``steps[name]()`` call over ``repeats`` rounds in interleaved order.

    Each round runs every step once, starting one further along the list each round, so that
    clock and thermal drift fall on all contenders alike. CUDA: CUDA events around each call;
    CPU: wall time (dry runs). Returns {name: [ms per round]}.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                steps[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                steps[name]()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count, for a CPU measurement's record."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss() (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_worker(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run one measurement in a fresh interpreter (so peak RSS belongs to it alone); parse its JSON."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:300] or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    new = not path.exists()
    if not new:
        with path.open() as f:
            header = next(csv.reader(f), None)
        if header != fields:  # schema changed: keep the old file, start a new one beside it
            path.rename(path.with_suffix(f".{int(time.time())}.csv"))
            new = True
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def fmt_mib(nbytes) -> str:
    return "" if nbytes is None or nbytes == "" else f"{float(nbytes) / 2**20:,.0f}"
