"""Chunked linear cross-entropy and target log-probabilities (PyTorch; used by SFT and ratios).

Per token: z = (W h + b) / tau, loss = lse(z) - z[target]. Never holds [N, V] logits: the
vocabulary is swept in ``torch_tiles`` tiles with a running max / sum, as in ``torch_sdft``.

Gradient w.r.t. z: p - onehot(target). With the LM head frozen the gradient w.r.t. h is
``sum_v p_v W_v / tau - W_target / tau``: accumulated online in the forward sweep (rescaled
with the running max), so one sweep suffices. When W or b needs a gradient the backward
recomputes the logit tiles from the stored lse.
"""

from __future__ import annotations

import math

import torch
from sdft_kernels.torch_tiles import (
    DEFAULT_MEMORY_BUDGET_MB,
    compute_dtype,
    logit_tile,
    online_softmax_update,
    recompute_grads,
    scale_rows,
    spans,
    tile_sizes,
)


def _target_logits(hidden, weight, bias, targets, inv_tau):
    # [R] z[target] = (W[target] . h + b[target]) / tau, without any [R, V] tensor
    dtype = hidden.dtype
    z = (weight[targets].to(dtype) * hidden).sum(1)
    if bias is not None:
        z = z + bias[targets].to(dtype)
    return z * inv_tau


def _lse_chunk(hidden, weight, bias, inv_tau, vocab_tile, want_acc):
    """Running logsumexp over the vocabulary for one row chunk (+ sum_v p_v W_v if wanted)."""
    m = torch.full((hidden.shape[0],), -math.inf, device=hidden.device, dtype=hidden.dtype)
    sum_exp = torch.zeros_like(m)
    acc = hidden.new_zeros(hidden.shape[0], weight.shape[1]) if want_acc else None  # [R, D]
    for v0, v1 in spans(weight.shape[0], vocab_tile):
        z, w_tile = logit_tile(hidden, weight, bias, v0, v1, inv_tau)  # [R, Vt]
        m, scale, e, sum_exp = online_softmax_update(m, sum_exp, z)
        if want_acc:
            acc.mul_(scale[:, None]).addmm_(e, w_tile)
    lse = m + torch.log(sum_exp)
    return lse, (None if acc is None else acc / sum_exp[:, None])


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy [N] of targets under softmax((W h + b) / tau)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, memory_budget_mb):
        # hidden: [N, D]; weight: [V, D]; bias: [V] | None; targets: [N] long
        dtype = compute_dtype(hidden.dtype)
        inv_tau = 1.0 / temperature
        rows, vocab_tile = tile_sizes(hidden.shape[0], weight.shape[0], memory_budget_mb)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        dh_in_forward = need_dh and not need_dw
        loss = hidden.new_empty(hidden.shape[0], dtype=dtype)
        lse = torch.empty_like(loss)
        dh = hidden.new_empty(hidden.shape, dtype=dtype) if dh_in_forward else None
        for r0, r1 in spans(hidden.shape[0], rows):
            h = hidden[r0:r1].to(dtype)
            lse[r0:r1], expected_w = _lse_chunk(h, weight, bias, inv_tau, vocab_tile, dh_in_forward)
            loss[r0:r1] = lse[r0:r1] - _target_logits(h, weight, bias, targets[r0:r1], inv_tau)
            if dh_in_forward:  # dh = (E_p[W] - W_target) / tau
                dh[r0:r1] = (expected_w - weight[targets[r0:r1]].to(dtype)) * inv_tau
        ctx.inv_tau, ctx.tiles, ctx.dh_in_forward = inv_tau, (rows, vocab_tile), dh_in_forward
        ctx.hidden_dtype = hidden.dtype
        if dh_in_forward:
            ctx.save_for_backward(dh)
        elif need_dh or need_dw:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.dh_in_forward:
            (dh,) = ctx.saved_tensors
            return scale_rows(dh, grad_loss, ctx.hidden_dtype), None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        rows, vocab_tile = ctx.tiles

        def tile_grads(r0, r1, h):  # g = p - onehot(target) of the rows [r0, r1), tile by tile
            for v0, v1 in spans(weight.shape[0], vocab_tile):
                z, w_tile = logit_tile(h, weight, bias, v0, v1, ctx.inv_tau)  # [R, Vt]
                g = torch.exp(z - lse[r0:r1, None])
                local = targets[r0:r1] - v0
                hit = (local >= 0) & (local < v1 - v0)
                g[hit.nonzero().squeeze(1), local[hit]] -= 1.0
                yield v0, v1, g, w_tile

        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        dh, dw, db = recompute_grads(hidden, weight, bias, grad_loss, ctx.inv_tau, rows, needs, tile_grads)
        return dh, dw, db, None, None, None


def torch_linear_cross_entropy(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N] long
    *,
    temperature: float = 1.0,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:  # [N] fp32 (fp64 for fp64 inputs)
    """Per-token cross-entropy without [N, V] logits; differentiable w.r.t. hidden, W, bias."""
    return ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, float(temperature), memory_budget_mb
    )
