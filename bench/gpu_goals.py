"""PASS/FAIL of issue #9's GPU goals, from one run of bench_loss.py (its --json) and the
correctness step's exit status; the last line printed is the verdict.

Goals (bf16, forward KL, LM head frozen, ``ours_triton`` = the default dispatch):
  1. Qwen2.5-7B head, N = 8192: time <= liger_fused / 1.5
  2. same case: peak extra memory <= liger_fused / 4
  3. same case: >= 600 TFLOP/s counted on 3 GEMM-equivalents (3 x 2 N D V FLOP)
  4. Qwen2.5-7B head, N = 1024: faster than liger_fused
  5. Qwen2.5-0.5B head, every N measured: faster than liger_fused
  6. bf16 loss and gradient error vs float64 no worse than the bf16 full-logit reference's in the
     three regimes (the correctness step: tests/kernels/test_cuda_scale.py)

    python bench/gpu_goals.py --loss-json OUT/loss.json --correctness-rc 0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def find(rows, shape, tokens, method):
    for row in rows:
        if (row["shape"], int(row["tokens"]), row["method"]) == (shape, tokens, method) and row["ms"]:
            if float(row["alpha"]) == 0.0 and not int(row.get("head", 0)):
                return row
    return None


def evaluate(rows, correctness_rc):
    """[(goal, passed: bool | None, detail)]; None where the case was not measured."""
    results = []
    ours, liger = find(rows, "Qwen2.5-7B", 8192, "ours_triton"), find(rows, "Qwen2.5-7B", 8192, "liger_fused")
    if ours and liger:
        t_ours, t_liger = float(ours["ms"]), float(liger["ms"])
        m_ours, m_liger = float(ours["peak_mib"]), float(liger["peak_mib"])
        results.append(("7B N=8192 time <= Liger fused / 1.5", t_ours <= t_liger / 1.5,
                        f"{t_ours:.1f} ms vs {t_liger:.1f} ms ({t_liger / t_ours:.2f}x)"))  # fmt: skip
        results.append(("7B N=8192 memory <= Liger fused / 4", m_ours <= m_liger / 4,
                        f"{m_ours:.0f} MiB vs {m_liger:.0f} MiB ({m_liger / max(m_ours, 1e-9):.1f}x less)"))  # fmt: skip
        tflops = float(ours["tflops_3gemm"])
        results.append(("7B N=8192 >= 600 TFLOP/s on 3 GEMM-eq", tflops >= 600, f"{tflops:.0f} TFLOP/s"))
    else:
        for goal in ("7B N=8192 time", "7B N=8192 memory", "7B N=8192 TFLOP/s"):
            results.append((goal, None, "not measured"))
    pairs = [("7B N=1024 faster than Liger fused", "Qwen2.5-7B", 1024)]
    pairs += [(f"0.5B N={n} faster than Liger fused", "Qwen2.5-0.5B", n) for n in (8192, 4096, 1024)]
    for goal, shape, tokens in pairs:
        ours, liger = find(rows, shape, tokens, "ours_triton"), find(rows, shape, tokens, "liger_fused")
        if ours and liger:
            t_ours, t_liger = float(ours["ms"]), float(liger["ms"])
            results.append((goal, t_ours < t_liger, f"{t_ours:.1f} ms vs {t_liger:.1f} ms"))
        else:
            results.append((goal, None, "not measured"))
    if correctness_rc is None:
        results.append(("bf16 error vs float64 <= bf16 reference (3 regimes)", None, "not run"))
    else:
        results.append(("bf16 error vs float64 <= bf16 reference (3 regimes)", correctness_rc == 0,
                        f"correctness step exit status {correctness_rc}"))  # fmt: skip
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss-json", type=Path, required=True)
    parser.add_argument("--correctness-rc", type=int, default=None)
    args = parser.parse_args(argv)
    rows = json.loads(args.loss_json.read_text()) if args.loss_json.exists() else []
    results = evaluate(rows, args.correctness_rc)
    for goal, passed, detail in results:
        verdict = "PASS" if passed else ("FAIL" if passed is False else "N/A ")
        print(f"{verdict}  {goal}: {detail}")
    failed = [goal for goal, passed, _ in results if not passed]
    print(f"GOALS: {'PASS' if not failed else 'FAIL'} ({len(results) - len(failed)}/{len(results)} met)")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
