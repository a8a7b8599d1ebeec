"""Chunked full-vocabulary divergence when the teacher has its own LM head (PyTorch).

``torch_sdft`` relies on one head: it gets both logit sets, and their difference, from one
stacked GEMM [h_s ; h_t - h_s] W^T. A teacher that is another model (GKD's teacher, possibly of
another hidden size) or a separate copy of the student (a full-model EMA or base teacher, whose
head drifts from the trained student's) has z_t = (W_t h_t + b_t) / tau from its own GEMM. This
twin takes both heads and computes the same per-token divergence as
``sdft_kernels.reference.reference_token_losses`` with ``teacher_weight``, never holding [N, V]:

    sweep 1  running max / sum-exp of both sides  ->  lse_s, lse_t
    sweep 2  with the lse known, per tile: log p_s, log p_t, the divergence terms, the
             ``grad_center`` (see ``sdft_kernels``) and, with the student head frozen, the
             gradient rows accumulated like flash attention's values (sum_v g_v W_v)

Per tile, with d the student-side log ratio and c = grad_center:
    forward KL  loss = sum p_t (log p_t - log p_s)            g = p_s - p_t
    reverse KL  d = log p_s - log p_t, loss = c = sum p_s d    g = p_s (d - c)
    JSD(alpha)  d = log p_s - log m, m = (1 - alpha) p_s + alpha p_t,
                loss = alpha KL(T||M) + (1 - alpha) c, c = KL(S||M)   g = (1 - alpha) p_s (d - c)
so dh = sum_v g_v W_v / tau = (acc_d - c acc_p) / tau (times 1 - alpha for the JSD), with
acc_d = sum p_s d W_v and acc_p = sum p_s W_v. With a trained student head the backward sweeps
again from (lse_s, lse_t, c), through ``torch_tiles.recompute_grads``.
"""

from __future__ import annotations

import math

import torch
from sdft_kernels.torch_tiles import (
    DEFAULT_MEMORY_BUDGET_MB,
    TILE_BUDGET_MB,
    compute_dtype,
    logit_tile,
    online_softmax_update,
    recompute_grads,
    scale_rows,
    spans,
    tile_sizes,
)


def _log_probs(h_s, h_t, heads, v0, v1, inv_tau, lse_s, lse_t):
    """log p_s, log p_t ([R, Vt]) of one tile and the student head's tile."""
    weight, bias, teacher_weight, teacher_bias = heads
    z_s, w_tile = logit_tile(h_s, weight, bias, v0, v1, inv_tau)
    z_t, _ = logit_tile(h_t, teacher_weight, teacher_bias, v0, v1, inv_tau)
    return z_s - lse_s[:, None], z_t - lse_t[:, None], w_tile


def _student_log_ratio(log_p_s, log_p_t, alpha):
    # d of the docstring: log p_s - log p_t (reverse KL) or log p_s - log m (JSD)
    if alpha == 1.0:
        return log_p_s - log_p_t
    log_m = torch.logaddexp(log_p_s + math.log1p(-alpha), log_p_t + math.log(alpha))
    return log_p_s - log_m


def _grad_tile(log_p_s, log_p_t, grad_center, alpha):
    """g = dLoss/dz_s for one [R, Vt] tile."""
    p_s = log_p_s.exp()
    if alpha == 0.0:
        return p_s - log_p_t.exp()
    g = p_s * (_student_log_ratio(log_p_s, log_p_t, alpha) - grad_center[:, None])
    return g if alpha == 1.0 else g * (1.0 - alpha)


def _forward_chunk(h_s, h_t, heads, alpha, inv_tau, vocab_tile, want_dh):
    """(loss, lse_s, lse_t, grad_center, dh | None) of one row chunk, in two sweeps."""
    vocab = heads[0].shape[0]
    dtype = compute_dtype(h_s.dtype)
    h_s, h_t = h_s.to(dtype), h_t.to(dtype)
    rows = h_s.shape[0]
    m_s = torch.full((rows,), -math.inf, device=h_s.device, dtype=dtype)
    m_t, l_s, l_t = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s)
    for v0, v1 in spans(vocab, vocab_tile):  # sweep 1: both log-sum-exps
        z_s, _ = logit_tile(h_s, heads[0], heads[1], v0, v1, inv_tau)
        z_t, _ = logit_tile(h_t, heads[2], heads[3], v0, v1, inv_tau)
        m_s, _, _, l_s = online_softmax_update(m_s, l_s, z_s)
        m_t, _, _, l_t = online_softmax_update(m_t, l_t, z_t)
    lse_s, lse_t = m_s + torch.log(l_s), m_t + torch.log(l_t)

    teacher_term = torch.zeros_like(m_s)  # sum p_t (log p_t - log p_s | log m): forward KL, JSD
    center = torch.zeros_like(m_s)  # sum p_s d: reverse KL, JSD
    acc = h_s.new_zeros(2 * rows, h_s.shape[1]) if want_dh else None  # [acc_d ; acc_p] or [acc_g ; -]
    for v0, v1 in spans(vocab, vocab_tile):  # sweep 2: divergence terms (+ gradient rows)
        log_p_s, log_p_t, w_tile = _log_probs(h_s, h_t, heads, v0, v1, inv_tau, lse_s, lse_t)
        p_s = log_p_s.exp()
        if alpha == 0.0:
            p_t = log_p_t.exp()
            teacher_term += (p_t * (log_p_t - log_p_s)).sum(1)
            if want_dh:
                acc[:rows].addmm_(p_s - p_t, w_tile)
            continue
        d = _student_log_ratio(log_p_s, log_p_t, alpha)
        weighted = p_s * d
        center += weighted.sum(1)
        if alpha != 1.0:
            log_m = log_p_s - d
            teacher_term += (log_p_t.exp() * (log_p_t - log_m)).sum(1)
        if want_dh:
            acc.addmm_(torch.cat([weighted, p_s]), w_tile)
    dh = None
    if alpha == 0.0:
        loss = teacher_term
        if want_dh:
            dh = acc[:rows] * inv_tau
    elif alpha == 1.0:
        loss = center
        if want_dh:
            dh = (acc[:rows] - center[:, None] * acc[rows:]) * inv_tau
    else:
        loss = alpha * teacher_term + (1.0 - alpha) * center
        if want_dh:
            dh = (acc[:rows] - center[:, None] * acc[rows:]) * ((1.0 - alpha) * inv_tau)
    return loss.clamp_min(0.0), lse_s, lse_t, center, dh


def _forward_sweep(h_s, h_t, heads, alpha, inv_tau, tiles, want_dh):
    rows, vocab_tile = tiles
    dtype = compute_dtype(h_s.dtype)
    num_tokens = h_s.shape[0]
    loss = h_s.new_empty(num_tokens, dtype=dtype)
    lse_s, lse_t, center = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
    dh = h_s.new_empty(h_s.shape, dtype=dtype) if want_dh else None
    for r0, r1 in spans(num_tokens, rows):
        out = _forward_chunk(h_s[r0:r1], h_t[r0:r1], heads, alpha, inv_tau, vocab_tile, want_dh)
        loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1], center[r0:r1] = out[:4]
        if want_dh:
            dh[r0:r1] = out[4]
    return loss, lse_s, lse_t, center, dh


class ChunkedTwoHeadDistill(torch.autograd.Function):
    """Per-token divergences [N] with a teacher head of its own; gradients to h_s, W_s, b_s."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        teacher_weight,
        teacher_bias,
        alpha,
        temperature,
        budget,
    ):
        inv_tau = 1.0 / temperature
        # Both sides' tiles are live at once: half the budget each.
        tiles = tile_sizes(student_hidden.shape[0], weight.shape[0], budget / 2)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[3])
        dh_in_forward = need_dh and not need_dw
        heads = (weight, bias, teacher_weight, teacher_bias)
        loss, lse_s, lse_t, center, dh = _forward_sweep(
            student_hidden, teacher_hidden, heads, alpha, inv_tau, tiles, dh_in_forward
        )
        ctx.alpha, ctx.inv_tau, ctx.tiles = alpha, inv_tau, tiles
        ctx.dh_in_forward, ctx.student_dtype = dh_in_forward, student_hidden.dtype
        if dh_in_forward:
            ctx.save_for_backward(dh)
        elif need_dh or need_dw:
            ctx.save_for_backward(
                student_hidden,
                teacher_hidden,
                weight,
                bias,
                teacher_weight,
                teacher_bias,
                lse_s,
                lse_t,
                center,
            )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 6
        if ctx.dh_in_forward:
            (dh,) = ctx.saved_tensors
            return scale_rows(dh, grad_loss, ctx.student_dtype), None, None, None, *nones
        h_s, h_t, weight, bias, teacher_weight, teacher_bias, lse_s, lse_t, center = ctx.saved_tensors
        heads = (weight, bias, teacher_weight, teacher_bias)
        rows, vocab_tile = ctx.tiles

        def tile_grads(r0, r1, hs_chunk):
            ht_chunk = h_t[r0:r1].to(hs_chunk.dtype)
            for v0, v1 in spans(weight.shape[0], vocab_tile):
                log_p_s, log_p_t, w_tile = _log_probs(
                    hs_chunk, ht_chunk, heads, v0, v1, ctx.inv_tau, lse_s[r0:r1], lse_t[r0:r1]
                )
                yield v0, v1, _grad_tile(log_p_s, log_p_t, center[r0:r1], ctx.alpha), w_tile

        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        )
        dh, dw, db = recompute_grads(h_s, weight, bias, grad_loss, ctx.inv_tau, rows, needs, tile_grads)
        return dh, None, dw, db, *nones


def torch_two_head_token_losses(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D_t], a constant
    weight: torch.Tensor,  # [V, D] the student's head
    bias: torch.Tensor | None,  # [V]
    teacher_weight: torch.Tensor,  # [V, D_t] the teacher's head, a constant
    teacher_bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,  # None: torch_tiles.TILE_BUDGET_MB
) -> torch.Tensor:  # [N] fp32 (fp64 for fp64 inputs)
    """Per-token divergences without [N, V] logits; differentiable w.r.t. h_s, W, bias."""
    if memory_budget_mb is None:
        memory_budget_mb = TILE_BUDGET_MB
    teacher_hidden = teacher_hidden.detach()
    teacher_weight = teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    grad_wanted = torch.is_grad_enabled() and (
        student_hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not grad_wanted:
        with torch.no_grad():
            tiles = tile_sizes(student_hidden.shape[0], weight.shape[0], memory_budget_mb / 2)
            heads = (weight, bias, teacher_weight, teacher_bias)
            return _forward_sweep(
                student_hidden, teacher_hidden, heads, float(alpha), 1.0 / temperature, tiles, False
            )[0]
    return ChunkedTwoHeadDistill.apply(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        teacher_weight,
        teacher_bias,
        float(alpha),
        float(temperature),
        memory_budget_mb,
    )
