"""Benchmark: what --gradient-checkpointing saves and costs on the packed one-pass path.

One SDFT step's forward_pair + fused loss + backward on a random-weight model shaped like
SmolLM2-135M (LoRA r16 on every decoder linear, EMA teacher), with and without checkpointing,
side by side in one process. Activation memory is measured exactly as the bytes autograd saves
for backward (a saved-tensor hook counts every tensor the graph keeps; the number does not depend
on the machine's load), plus the step time (median of --repeats) and, on CUDA, the peak
allocation above the model.

    python bench/bench_checkpointing.py --quick      # 6 layers, batch 4 (CPU, ~1 min)
    python bench/bench_checkpointing.py              # all 30 layers, batch 8 (CPU, several minutes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from sdft_fast.lora import LoraConfig  # noqa: E402
from sdft_fast.loss import self_distill_loss  # noqa: E402
from sdft_fast.model import PairBatch, SelfDistillModel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def step(model, batch, device) -> tuple[int, float]:
    """(bytes saved for backward, seconds) of one forward + loss + backward."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    harness.synchronize(device)
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.forward_pair(batch)
        loss = self_distill_loss(
            out.student_hidden, out.teacher_hidden, model.lm_head_weight, sequence_ids=out.sequence_ids
        )
    loss.backward()
    harness.synchronize(device)
    seconds = time.perf_counter() - started
    for p in model.trainable_parameters():
        p.grad = None
    return saved[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="6 layers, batch 4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers, batch_size = (6, 4) if args.quick else (30, 8)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = SelfDistillModel(smollm2_shaped(layers).to(args.device, dtype), lora=LoraConfig(r=16, alpha=32))
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 49152, (n,), generator=generator).tolist()

    batch = PairBatch(
        student_prompts=[ids(64) for _ in range(batch_size)],
        teacher_prompts=[ids(192) for _ in range(batch_size)],
        completions=[ids(128) for _ in range(batch_size)],
    )
    rows = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        step(model, batch, args.device)  # warm-up
        times, saved, peaks = [], 0, []
        for _ in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            saved, seconds = step(model, batch, args.device)
            times.append(seconds)
            if args.device == "cuda":
                peaks.append(torch.cuda.max_memory_allocated() - base)
        rows.append(
            {
                **harness.environment(args.device),
                "layers": layers,
                "batch": batch_size,
                "gradient_checkpointing": checkpointing,
                "saved_for_backward_mib": round(saved / 2**20, 1),
                "step_s": round(sorted(times)[len(times) // 2], 3),
                "peak_extra_mib": round(max(peaks) / 2**20, 1) if peaks else "",
            }
        )
    print(
        harness.markdown_table(
            rows, ["gradient_checkpointing", "saved_for_backward_mib", "step_s", "peak_extra_mib"]
        )
    )
    off, on = rows
    print(
        f"activation memory x{on['saved_for_backward_mib'] / off['saved_for_backward_mib']:.2f}, "
        f"step time x{on['step_s'] / off['step_s']:.2f} with checkpointing"
    )
    harness.append_csv(RESULTS / "checkpointing.csv", rows)


if __name__ == "__main__":
    main()
