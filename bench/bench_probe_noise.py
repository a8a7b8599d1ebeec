"""Benchmark: how many probes does a change that teaches nothing flip? The noise floor of a probe set.

A retention probe set scored by greedy decoding counts a question as kept while the model's most
likely reply still contains the answer. For a small model many of those replies sit on a knife's
edge: two continuations of nearly equal probability, one of which names the answer within the
scored length. Any change of the weights tips some of them, whatever it teaches. This script
measures that floor: it adds random rank-``--rank`` perturbations to every decoder linear layer
(``delta_W = s * ||W|| * B A / ||B A||``, A and B Gaussian, a fresh draw per seed: directions
that carry no information), and for each scale ``s`` reports the KL from the start model (the
same measure as the continual runs', ``sdft_fast.eval.drift_from_reference``) and how many of
the probes the start model answered correctly are lost.

With ``--select OUT`` it writes the probes that survive every selection perturbation
(``--select-scale``, ``--select-seeds``) to OUT: answers the start model gives robustly rather than
by a narrow margin. The selection uses only the start model and random directions, never a trained
model; ``--seed-offset`` then measures the selected set's own floor on perturbations it was not
selected on.

    python bench/bench_probe_noise.py                                   # general-121, 3 scales x 4 seeds
    python bench/bench_probe_noise.py --select sdft_fast/assets/robust_probes.jsonl \\
        --probes sdft_fast/assets/general_probes.jsonl,sdft_fast/assets/retention_probes.jsonl
    python bench/bench_probe_noise.py --probes sdft_fast/assets/robust_probes.jsonl --seed-offset 100

Rows go to bench/results/probe_noise.csv (probe set, scale, seed, kl, dnll, correct, lost).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "probe_noise.csv"
DEFAULT_PROBES = ROOT / "sdft_fast" / "assets" / "general_probes.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probes", default=str(DEFAULT_PROBES), help="probe file(s), comma-separated")
    parser.add_argument("--name", default=None, help="the probe set's label in the CSV (default: file stem)")
    parser.add_argument("--scales", default="0.01,0.02,0.04", help="relative perturbation sizes s")
    parser.add_argument("--seeds", type=int, default=4, help="random perturbations per scale")
    parser.add_argument(
        "--seed-offset", type=int, default=0, help="first seed (use new ones to test a selection)"
    )
    parser.add_argument("--rank", type=int, default=16, help="rank of each perturbation (the adapters' rank)")
    parser.add_argument(
        "--select", default=None, help="write the probes kept under every selection draw here"
    )
    parser.add_argument("--select-scale", type=float, default=0.02)
    parser.add_argument("--select-seeds", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24, help="greedy reply length (the plans': 24)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", default=str(CSV))
    args = parser.parse_args(argv)
    try:
        args.scale_list = [float(s) for s in args.scales.split(",") if s]
    except ValueError:
        parser.error(f"--scales: comma-separated numbers expected, got {args.scales!r}")
    if args.seeds < 1 or args.select_seeds < 1 or args.rank < 1:
        parser.error("--seeds, --select-seeds and --rank must be at least 1")
    return args


def load_probes(paths: list[str]):
    """The probes of every file, duplicates (same prompt) dropped, in file order."""
    from sdft_fast.eval import retention_probes

    seen, probes = set(), []
    for path in paths:
        for probe in retention_probes(path):
            if probe.prompt not in seen:
                seen.add(probe.prompt)
                probes.append(probe)
    return probes


class Perturber:
    """Adds ``scale * ||W|| * B A / ||B A||`` (a fresh random rank-r draw per seed) to every decoder
    linear weight of ``model``; ``restore`` puts the start weights back."""

    def __init__(self, model, rank: int):
        import torch

        self.rank = rank
        self.start = {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if param.ndim == 2 and "embed" not in name and "lm_head" not in name
        }
        self.params = dict(model.named_parameters())
        self.torch = torch

    def apply(self, scale: float, seed: int) -> None:
        torch = self.torch
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in self.start.items():
                a = torch.randn(self.rank, weight.shape[1], generator=generator)
                b = torch.randn(weight.shape[0], self.rank, generator=generator)
                delta = b @ a
                self.params[name].copy_(weight + scale * weight.norm() * delta / delta.norm())

    def restore(self) -> None:
        with self.torch.no_grad():
            for name, weight in self.start.items():
                self.params[name].copy_(weight)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from sdft_fast.default_model import load_tokenizer, resolve_model_path
    from sdft_fast.eval import drift_from_reference, evaluate_accuracy, reference_logprobs

    torch.set_num_threads(args.threads)
    paths = [p for p in args.probes.split(",") if p]
    for path in paths:
        if not Path(path).is_file():
            sys.exit(f"bench_probe_noise: --probes: no file {path}")
    name = args.name or "+".join(Path(p).stem for p in paths)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    probes = load_probes(paths)
    reference = reference_logprobs(model, tokenizer, batch_size=16)

    def score() -> list[bool]:
        result = evaluate_accuracy(
            model, tokenizer, probes, max_new_tokens=args.max_new_tokens, batch_size=32
        )
        return [record["correct"] for record in result["records"]]

    start = score()
    known = [i for i, ok in enumerate(start) if ok]
    print(f"{name}: {len(probes)} probes, {len(known)} correct at the start", flush=True)
    env = harness.environment("cpu")
    perturber = Perturber(model, args.rank)
    rows = []

    def measure(scale: float, seed: int, label: str) -> list[bool]:
        t0 = time.time()
        perturber.apply(scale, seed)
        drift = drift_from_reference(model, reference)
        correct = score()
        perturber.restore()
        lost = sum(1 for i in known if not correct[i])
        row = {
            "probe_set": label,
            "probes_known": len(known),
            "scale": scale,
            "seed": seed,
            "rank": args.rank,
            "kl": round(drift["kl"], 5),
            "dnll": round(drift["dnll"], 5),
            "kept": len(known) - lost,
            "lost": lost,
            "lost_pct": round(100.0 * lost / max(1, len(known)), 2),
            "max_new_tokens": args.max_new_tokens,
            "seconds": round(time.time() - t0, 1),
            **env,
        }
        rows.append(row)
        print(f"  s={scale:g} seed {seed}: KL {drift['kl']:.4f}, lost {lost}/{len(known)}", flush=True)
        return correct

    if args.select:
        survived = set(known)
        for seed in range(args.seed_offset, args.seed_offset + args.select_seeds):
            correct = measure(args.select_scale, seed, f"{name} (selection draws)")
            survived &= {i for i, ok in enumerate(correct) if ok}
        keep = sorted(survived)
        with open(args.select, "w") as out:
            for i in keep:
                probe = probes[i]
                out.write(json.dumps({"prompt": probe.prompt, "answer": list(probe.answers)}) + "\n")
        print(f"wrote {len(keep)} of {len(known)} start-correct probes to {args.select}", flush=True)
    else:
        for scale in args.scale_list:
            for seed in range(args.seed_offset, args.seed_offset + args.seeds):
                measure(scale, seed, name)
    harness.append_csv(Path(args.csv), rows)
    print(
        harness.markdown_table(rows, ["probe_set", "scale", "seed", "kl", "dnll", "kept", "lost", "lost_pct"])
    )


if __name__ == "__main__":
    main()
