"""Vocabulary-parallel fused self-distillation loss: the LM head split by rows across ranks.

Tensor parallelism over the vocabulary (what Megatron does for cross-entropy, here for a
divergence between two distributions). Rank r of ``group`` holds a contiguous block of the head's
rows, W[v0:v1] (and of the bias: ``vocab_shard``), and the SAME hidden states as every other rank
(all N tokens). Each rank runs the chunked twin's sweeps (``torch_sdft``) over its block only. Its
per-token statistics are relative to its own running max, so they merge exactly:

    M_s = max_r m_s^r,   l_s = sum_r l_s^r exp(m_s^r - M_s)   (C and A likewise)
    M_t = max_r m_t^r,   l_t = sum_r l_t^r exp(m_t^r - M_t)   (B likewise)

with one all-gather of the [6, N] statistics per call (after a 4-number header that checks that
every rank passed the same tokens and settings): every rank merges the same gathered
tensor in rank order, so the merged values are bitwise equal on every rank whatever the timing
or the backend's reduction order. The generalized JSD needs the whole-vocabulary lse before its
value, so it gathers a second time: its [2, N] partial sums KL(T||M), KL(S||M).

Gradients. Every dh formula of the twin is linear in its accumulators (sums over the vocabulary of
a per-token weight times a W row), so a rank's accumulators, rescaled to the merged max, give its
share of dh; the backward sums the shares with one all-reduce of [N, D] (the gradient of an
input replicated across the group, like Megatron's copy-to-tensor-parallel region). dW and dbias
of a rank's block need no communication: they come from the block's own tiles of g and the
replicated h_s.

No rank ever holds [N, V] logits or more than its block of the head. Per rank: the twin's
[R, Vt] tiles, plus the [2N, D] accumulators (compute dtype) when dh is formed in the forward
(KL modes, frozen head). Communication per call and rank: 6 x N floats (8 x N for the JSD) in
the forward, N x D in the backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from sdft_kernels.torch_sdft import (
    SweepStats,
    grad_tiles,
    jsd_finish,
    jsd_sweep,
    kl_finish,
    kl_sweep,
    log_sum_exps,
    stack_pair,
)
from sdft_kernels.torch_tiles import (
    DEFAULT_MEMORY_BUDGET_MB,
    compute_dtype,
    recompute_grads,
    spans,
    tile_sizes,
)


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [v0, v1) of a vocabulary of ``vocab_size`` that rank ``rank`` holds: contiguous blocks,
    the first ``vocab_size % world_size`` ranks one row more (``torch.tensor_split``'s split)."""
    base, extra = divmod(vocab_size, world_size)
    v0 = rank * base + min(rank, extra)
    return v0, v0 + base + (1 if rank < extra else 0)


def vocab_shard(tensor: torch.Tensor | None, group) -> torch.Tensor | None:
    """This rank's block of rows of a full LM head weight [V, D] or bias [V] (a view)."""
    if tensor is None:
        return None
    v0, v1 = vocab_range(tensor.shape[0], dist.get_rank(group), dist.get_world_size(group))
    return tensor[v0:v1]


def _gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """[P, *shape]: every rank's ``tensor``, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _check_same_call(num_tokens, hidden_dim, alpha, temperature, device, group) -> None:
    """Every rank must score the same tokens with the same settings: a rank that passes other
    tokens would be merged with statistics of different rows and return a wrong loss silently."""
    header = torch.tensor([num_tokens, hidden_dim, alpha, temperature], dtype=torch.float64, device=device)
    everyone = _gather(header, group).cpu()  # [P, 4]
    if not bool((everyone == everyone[0]).all()):
        rows = ", ".join(
            f"rank {r}: N={int(n)} D={int(d)} alpha={a:g} temperature={t:g}"
            for r, (n, d, a, t) in enumerate(everyone.tolist())
        )
        raise ValueError(
            "self_distill_loss(process_group=...): every rank must pass the same tokens (the counted "
            f"rows of the same hidden states) and the same alpha/temperature; got {rows}"
        )


def _merge_kl_stats(chunks: list[SweepStats], alpha: float, group) -> list[SweepStats]:
    """Whole-vocabulary statistics from every rank's, per row chunk; each chunk's accumulators
    rescaled from this rank's max to the merged max (so they give this rank's share of dh)."""
    local = torch.stack(
        [torch.cat([getattr(c, name) for c in chunks]) for name in SweepStats._fields[:6]]
    )  # [6, N]
    everyone = _gather(local, group)  # [P, 6, N]
    m_s, l_s, m_t, l_t, cross, shift = everyone.unbind(1)  # [P, N] each
    merged_m_s, merged_m_t = m_s.max(0).values, m_t.max(0).values  # [N]
    scale_s = torch.exp(m_s - merged_m_s)  # [P, N]; 0 for a rank whose block is empty (m = -inf)
    scale_t = torch.exp(m_t - merged_m_t)
    merged = (
        merged_m_s,
        (l_s * scale_s).sum(0),
        merged_m_t,
        (l_t * scale_t).sum(0),
        (cross * (scale_t if alpha == 0.0 else scale_s)).sum(0),  # B is teacher-relative, A student
        (shift * scale_s).sum(0),
    )
    rank = dist.get_rank(group)
    out, start = [], 0
    for chunk in chunks:
        stop = start + chunk.m_s.shape[0]
        acc = chunk.acc
        if acc is not None:
            rows = stop - start
            own_s, own_t = scale_s[rank, start:stop], scale_t[rank, start:stop]
            second = own_t if alpha == 0.0 else own_s  # [sum e_s W ; sum e_t W] or [A-weighted ; e_s]
            acc = acc * torch.cat([own_s, second])[:, None]
            assert acc.shape[0] == 2 * rows
        out.append(SweepStats(*(t[start:stop] for t in merged), acc))
        start = stop
    return out


def _forward(h_s, h_t, weight, bias, alpha, inv_tau, tiles, want_dh, group):
    """Per-token (loss, lse_s, lse_t, grad_center) [N], equal on every rank, and this rank's share
    of dh [N, D] when wanted (formed in the forward)."""
    rows, vocab_tile = tiles
    chunks = list(spans(h_s.shape[0], rows)) or [(0, 0)]  # no tokens: the ranks still meet
    stats = [
        kl_sweep(stack_pair(h_s[r0:r1], h_t[r0:r1]), weight, bias, alpha, inv_tau, vocab_tile, want_dh)
        for r0, r1 in chunks
    ]
    merged = _merge_kl_stats(stats, alpha, group)
    if alpha in (0.0, 1.0):
        outs = [kl_finish(s, alpha, inv_tau) for s in merged]
    else:
        lses = [log_sum_exps(s) for s in merged]
        partial = [
            jsd_sweep(
                stack_pair(h_s[r0:r1], h_t[r0:r1]), weight, bias, alpha, inv_tau, vocab_tile, *lse, want_dh
            )
            for (r0, r1), lse in zip(chunks, lses)
        ]
        sums = _gather(
            torch.stack([torch.cat([p[0] for p in partial]), torch.cat([p[1] for p in partial])]), group
        )
        kl_t_m, kl_s_m = sums.sum(0)  # [N] each, summed in rank order
        outs = []
        for (r0, r1), (lse_s, lse_t), (_, _, acc) in zip(chunks, lses, partial):
            loss, grad_center, dh = jsd_finish(kl_t_m[r0:r1], kl_s_m[r0:r1], acc, alpha, inv_tau)
            outs.append((loss, lse_s, lse_t, grad_center, dh))
    loss, lse_s, lse_t, grad_center = (torch.cat([o[i] for o in outs]) for i in range(4))
    dh = torch.cat([o[4] for o in outs]) if want_dh else None
    return loss, lse_s, lse_t, grad_center, dh


class VocabParallelSelfDistill(torch.autograd.Function):
    """Per-token divergences [N] over the whole vocabulary from this rank's block of the head."""

    @staticmethod
    def forward(
        ctx, student_hidden, teacher_hidden, weight, bias, alpha, temperature, memory_budget_mb, group
    ):
        # student_hidden, teacher_hidden: [N, D] (the same on every rank); weight: [V_r, D]; bias: [V_r]
        inv_tau = 1.0 / temperature
        tiles = tile_sizes(student_hidden.shape[0], max(weight.shape[0], 1), memory_budget_mb)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[3])
        dh_in_forward = need_dh and not need_dw  # as in the twin: dW needs grad_output inside its sum
        loss, lse_s, lse_t, grad_center, dh = _forward(
            student_hidden, teacher_hidden, weight, bias, alpha, inv_tau, tiles, dh_in_forward, group
        )
        ctx.alpha, ctx.inv_tau, ctx.tiles, ctx.group = alpha, inv_tau, tiles, group
        ctx.dh_in_forward, ctx.student_dtype = dh_in_forward, student_hidden.dtype
        if dh_in_forward:
            ctx.save_for_backward(dh)
        elif need_dh or need_dw:
            ctx.save_for_backward(student_hidden, teacher_hidden, weight, bias, lse_s, lse_t, grad_center)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # grad_loss: [N] dLoss/d(per-token divergence), the same on every rank
        if ctx.dh_in_forward:
            (dh,) = ctx.saved_tensors
            dh = dh * grad_loss.to(dh.dtype)[:, None]  # this rank's share, in the compute dtype
            dist.all_reduce(dh, group=ctx.group)
            return dh.to(ctx.student_dtype), None, None, None, None, None, None, None
        h_s, h_t, weight, bias, lse_s, lse_t, grad_center = ctx.saved_tensors
        rows, vocab_tile = ctx.tiles

        tile_grads = grad_tiles(
            h_t, weight, bias, (lse_s, lse_t, grad_center), ctx.alpha, ctx.inv_tau, vocab_tile
        )
        need_dh = ctx.needs_input_grad[0]
        needs = (True, ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3])
        # h_s in the compute dtype: dh comes back unrounded, and the ranks' shares are summed unrounded.
        dh, dw, db = recompute_grads(
            h_s.to(compute_dtype(h_s.dtype)), weight, bias, grad_loss, ctx.inv_tau, rows, needs, tile_grads
        )
        if need_dh:
            dist.all_reduce(dh, group=ctx.group)
            dh = dh.to(ctx.student_dtype)
        else:
            dh = None
        return dh, None, dw, db, None, None, None, None


def vocab_parallel_token_losses(
    student_hidden: torch.Tensor,  # [N, D], the same on every rank of the group
    teacher_hidden: torch.Tensor,  # [N, D], the same on every rank; a constant
    weight: torch.Tensor,  # [V_r, D] this rank's block of the LM head's rows (vocab_shard)
    bias: torch.Tensor | None = None,  # [V_r]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    process_group=None,  # the ranks that split the vocabulary (None: the default group)
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:  # [N] fp32 (fp64 for fp64 inputs), equal on every rank
    """Per-token divergences over the whole vocabulary, the head split by rows across the group.

    Collective: every rank of the group must call it, with the same tokens. Differentiable
    w.r.t. h_s (the full dh on every rank) and this rank's W block and bias.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_token_losses needs an initialised torch.distributed process group")
    if not (0.0 <= alpha <= 1.0 and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"alpha must lie in [0, 1] and temperature be > 0, got {alpha!r}, {temperature!r}")
    teacher_hidden = teacher_hidden.detach()
    _check_same_call(
        student_hidden.shape[0],
        student_hidden.shape[1],
        alpha,
        temperature,
        student_hidden.device,
        process_group,
    )
    grad_wanted = torch.is_grad_enabled() and (
        student_hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not grad_wanted:
        with torch.no_grad():
            tiles = tile_sizes(student_hidden.shape[0], max(weight.shape[0], 1), memory_budget_mb)
            return _forward(
                student_hidden,
                teacher_hidden,
                weight,
                bias,
                alpha,
                1.0 / temperature,
                tiles,
                False,
                process_group,
            )[0]
    return VocabParallelSelfDistill.apply(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        float(alpha),
        float(temperature),
        memory_budget_mb,
        process_group,
    )
