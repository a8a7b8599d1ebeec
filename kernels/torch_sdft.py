"""Chunked pure-PyTorch fused linear self-distillation loss (the CPU path and the fallback).

Same semantics as ``sdft_kernels.reference.reference_token_losses``, without ever holding
[N, V] logits: row chunks and vocabulary tiles as in ``torch_tiles``, sized so that the live
fp32 tiles fit ``memory_budget_mb`` whatever N and V are. Per token we keep flash-attention
style running statistics:

    m_s, l_s = running max and sum exp(z_s - m_s)       (student, z_s = (W h_s + b) / tau)
    m_t, l_t = the same for the teacher                  (z_t = (W h_t + b) / tau)
    A = sum exp(z_s - m_s) (z_s - z_t)                   (reverse KL)
    B = sum exp(z_t - m_t) (z_t - z_s)                   (forward KL)
    lse = m + log l
    forward KL(T||S) = B / l_t - lse_t + lse_s
    reverse KL(S||T) = A / l_s - lse_s + lse_t

Gradient w.r.t. z_s (then dh_s = g W / tau, dW = g^T h_s / tau, dbias = sum_rows g / tau),
with ``grad_center`` the p_s-weighted mean that the softmax Jacobian subtracts (see
``sdft_kernels``):
    forward KL:  g = p_s - p_t
    reverse KL:  g = p_s ((z_s - z_t) - E_s[z_s - z_t])            grad_center = A / l_s
      (d/dz_s of sum p_s (log p_s - log p_t) is p_s ((log p_s - log p_t) - KL); with
       log p_s - log p_t = (z_s - z_t) - (lse_s - lse_t) and KL = E_s[z_s - z_t] - (lse_s - lse_t)
       the lse terms cancel exactly.)
    JSD(alpha):  g = (1 - alpha) p_s (log p_s - log m - KL(S||M))   grad_center = KL(S||M),
      m = (1 - alpha) p_s + alpha p_t (d/dp_s of alpha KL(T||M) + (1 - alpha) KL(S||M) is
      (1 - alpha)(log p_s - log m): the terms in 1/m cancel.)

Two strategies, picked per call:

* **one sweep, gradient in the forward** (KL modes, LM head frozen — the LoRA case): the
  gradient w.r.t. h_s is a p-weighted sum of W rows, so it can be accumulated online like the
  value accumulator of flash attention and rescaled with the running max:
      forward KL: dh = (acc_s / l_s - acc_t / l_t) / tau,  acc_x = sum exp(z_x - m_x) W_v
      reverse KL: dh = (acc_A - (A / l_s) acc_s) / (l_s tau), acc_A = sum exp(z_s - m_s)(z_s - z_t) W_v
  The JSD needs lse first, so it takes a statistics sweep, then a loss + accumulator sweep.
  The backward only scales row n by the incoming gradient of token n.
* **statistics in the forward, recompute in the backward** (the LM head or its bias requires
  grad: dW sums over tokens, so the incoming per-token gradient must enter inside the sum): the
  backward sweeps the vocabulary again, rebuilding both logit tiles from lse_s, lse_t and
  grad_center, and forms dh, dW, dbias.

The sweeps and the steps that finish them (``kl_sweep`` / ``kl_finish``, ``jsd_sweep`` /
``jsd_finish``) are public: ``torch_vocab_parallel`` runs them over one rank's block of W rows and
merges the statistics in between.

Logits and statistics are fp32 (float64 for float64 inputs) whatever the input dtype;
gradients return in the input dtype. Cost of each strategy: docs/kernels.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from sdft_kernels.torch_tiles import (
    DEFAULT_MEMORY_BUDGET_MB,
    TileGrads,
    compute_dtype,
    logit_tile,
    online_softmax_update,
    recompute_grads,
    scale_rows,
    spans,
    tile_sizes,
)


def pair_logits(h_pair, weight, bias, v0, v1, inv_tau):
    """Student and teacher logit tiles from h_pair = [h_s ; h_t - h_s] ([2R, D]).

    One GEMM gives z_s and the logit *difference* z_d = W (h_t - h_s) / tau directly, instead of
    subtracting two independently rounded logits: near KL = 0 (student ~ teacher, where the
    divergence is ~1e-3) this keeps fp32 error well below the full-logit formula's.
    Returns z_s, z_t, z_d ([R, Vt] each) and the weight tile in the compute dtype.
    """
    rows = h_pair.shape[0] // 2
    z_pair, w_tile = logit_tile(h_pair, weight, None, v0, v1, inv_tau)  # [2R, Vt]
    z_s, z_d = z_pair[:rows], z_pair[rows:]
    if bias is not None:  # the bias cancels in z_d
        z_s = z_s + bias[v0:v1].to(z_s.dtype) * inv_tau
    return z_s, z_s + z_d, z_d, w_tile


def stack_pair(h_s, h_t):
    """[h_s ; h_t - h_s] ([2R, D]) in the compute dtype: one GEMM per tile for both logit sets."""
    dtype = compute_dtype(h_s.dtype)
    h_s = h_s.to(dtype)
    return torch.cat([h_s, h_t.to(dtype) - h_s])


def _jsd_log_mixture(log_p_s, log_p_t, alpha):
    # log m = log((1 - alpha) p_s + alpha p_t), computed stably in log space
    return torch.logaddexp(log_p_s + math.log1p(-alpha), log_p_t + math.log(alpha))


class SweepStats(NamedTuple):
    """Per-token running statistics of one row chunk over the vocabulary rows swept (all of W, or
    one rank's shard of it, see ``torch_vocab_parallel``). Sums are relative to their max."""

    m_s: torch.Tensor  # [R] max of z_s
    l_s: torch.Tensor  # [R] sum exp(z_s - m_s)
    m_t: torch.Tensor  # [R] max of z_t
    l_t: torch.Tensor  # [R] sum exp(z_t - m_t)
    cross: torch.Tensor  # [R] A = sum exp(z_s - m_s)(z_s - z_t) (alpha 1) or B (alpha 0); else 0
    shift: torch.Tensor  # [R] C = sum exp(z_s - m_s) expm1(z_t - z_s) (KL modes); else 0
    acc: torch.Tensor | None  # [2R, D] the dh accumulators of the one-sweep KL gradient, or None


def kl_sweep(h_pair, weight, bias, alpha, inv_tau, vocab_tile, want_acc) -> SweepStats:
    """Sweep 1 over the rows of ``weight``: running max / sum of both distributions (+ A or B and
    C in the KL modes, + the dh accumulators when ``want_acc`` and alpha is 0 or 1)."""
    rows = h_pair.shape[0] // 2
    m_s = torch.full((rows,), -math.inf, device=h_pair.device, dtype=h_pair.dtype)
    m_t = m_s.clone()
    l_s, l_t = torch.zeros_like(m_s), torch.zeros_like(m_s)
    cross = torch.zeros_like(m_s)  # A (reverse KL) or B (forward KL)
    shift = torch.zeros_like(m_s)  # C, for an accurate lse_t - lse_s near KL = 0
    kl_mode = alpha in (0.0, 1.0)
    acc = h_pair.new_zeros(2 * rows, weight.shape[1]) if want_acc and kl_mode else None  # [2R, D]
    for v0, v1 in spans(weight.shape[0], vocab_tile):
        z_s, z_t, z_d, w_tile = pair_logits(h_pair, weight, bias, v0, v1, inv_tau)  # [R, Vt] each
        new_m_s, scale_s, e_s, l_s = online_softmax_update(m_s, l_s, z_s)
        new_m_t, scale_t, e_t, l_t = online_softmax_update(m_t, l_t, z_t)
        if kl_mode:  # C = sum exp(z_s - m_s) expm1(z_d): lse_t - lse_s = log1p(C / l_s) exactly
            shift = shift * scale_s + (e_s * torch.expm1(z_d)).sum(1)
        if alpha == 1.0:  # A = sum exp(z_s - m_s)(z_s - z_t)
            weighted = -e_s * z_d
            cross = cross * scale_s + weighted.sum(1)
        elif alpha == 0.0:  # B = sum exp(z_t - m_t)(z_t - z_s)
            cross = cross * scale_t + (e_t * z_d).sum(1)
        if acc is not None:
            if alpha == 0.0:  # acc = [sum e_s W ; sum e_t W]
                acc[:rows].mul_(scale_s[:, None])
                acc[rows:].mul_(scale_t[:, None])
                acc.addmm_(torch.cat([e_s, e_t]), w_tile)
            else:  # acc = [sum e_s (z_s - z_t) W ; sum e_s W], both scaled with the student max
                acc.mul_(torch.cat([scale_s, scale_s])[:, None])
                acc.addmm_(torch.cat([weighted, e_s]), w_tile)
        m_s, m_t = new_m_s, new_m_t
    return SweepStats(m_s, l_s, m_t, l_t, cross, shift, acc)


def log_sum_exps(stats: SweepStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_s, lse_t) [R] of statistics that cover the whole vocabulary."""
    return stats.m_s + torch.log(stats.l_s), stats.m_t + torch.log(stats.l_t)


def kl_finish(stats: SweepStats, alpha, inv_tau):
    """Forward / reverse KL from whole-vocabulary statistics: (loss, lse_s, lse_t, grad_center, dh);
    dh [R, D] from ``stats.acc`` (None without), linear in it (a rank's share of acc gives its
    share of dh)."""
    lse_s, lse_t = log_sum_exps(stats)
    l_s, l_t, acc = stats.l_s, stats.l_t, stats.acc
    # lse_t - lse_s = log sum p_s exp(z_d) = log1p(C / l_s): no cancellation between two ~log V
    # sized numbers when the student is close to the teacher. Where the gap is not small
    # (|C / l_s| >= 1/2, also when C overflowed: z_d > ~88), C / l_s may be -1 + tiny after
    # cancelling, and the plain difference (error ~ 2^-24 lse beside a gap >= log 1.5) is better.
    ratio = stats.shift / l_s
    lse_gap = torch.where(ratio.abs() < 0.5, torch.log1p(ratio), lse_t - lse_s)
    rows = l_s.shape[0]
    dh = None
    if alpha == 0.0:
        loss = stats.cross / l_t - lse_gap
        grad_center = torch.zeros_like(loss)  # g = p_s - p_t subtracts nothing
        if acc is not None:
            dh = (acc[:rows] / l_s[:, None] - acc[rows:] / l_t[:, None]) * inv_tau
    else:
        grad_center = stats.cross / l_s  # E_s[z_s - z_t]
        loss = grad_center + lse_gap
        if acc is not None:
            dh = (acc[:rows] - grad_center[:, None] * acc[rows:]) * (inv_tau / l_s)[:, None]
    # Clamp tiny negative rounding (KL >= 0 mathematically).
    return loss.clamp_min(0.0), lse_s, lse_t, grad_center, dh


def jsd_sweep(h_pair, weight, bias, alpha, inv_tau, vocab_tile, lse_s, lse_t, want_acc):
    """Sweep 2 of the generalized JSD over the rows of ``weight`` (needs the whole-vocabulary lse):
    the sums KL(T||M), KL(S||M) over those rows and, when ``want_acc``, the dh accumulators
    [sum p_s (log p_s - log m) W ; sum p_s W] ([2R, D])."""
    rows = lse_s.shape[0]
    kl_t_m = torch.zeros_like(lse_s)
    kl_s_m = torch.zeros_like(lse_s)
    acc = h_pair.new_zeros(2 * rows, weight.shape[1]) if want_acc else None  # [2R, D]
    for v0, v1 in spans(weight.shape[0], vocab_tile):
        z_s, z_t, _, w_tile = pair_logits(h_pair, weight, bias, v0, v1, inv_tau)
        log_p_s = z_s - lse_s[:, None]
        log_p_t = z_t - lse_t[:, None]
        log_m = _jsd_log_mixture(log_p_s, log_p_t, alpha)
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        s_term = p_s * (log_p_s - log_m)
        kl_t_m += (p_t * (log_p_t - log_m)).sum(1)
        kl_s_m += s_term.sum(1)
        if acc is not None:
            acc.addmm_(torch.cat([s_term, p_s]), w_tile)
    return kl_t_m, kl_s_m, acc


def jsd_finish(kl_t_m, kl_s_m, acc, alpha, inv_tau):
    """The JSD's (loss, grad_center = KL(S||M), dh) from whole-vocabulary sums; dh linear in acc."""
    loss = alpha * kl_t_m + (1.0 - alpha) * kl_s_m
    dh = None
    if acc is not None:
        rows = kl_s_m.shape[0]
        dh = (1.0 - alpha) * inv_tau * (acc[:rows] - kl_s_m[:, None] * acc[rows:])
    return loss.clamp_min(0.0), kl_s_m, dh


def _forward_chunk(h_s, h_t, weight, bias, alpha, inv_tau, vocab_tile, want_dh):
    """Statistics (and optionally dh) for one row chunk: (loss, lse_s, lse_t, grad_center, dh)."""
    h_pair = stack_pair(h_s, h_t)  # [2R, D]
    stats = kl_sweep(h_pair, weight, bias, alpha, inv_tau, vocab_tile, want_dh)
    if alpha in (0.0, 1.0):
        return kl_finish(stats, alpha, inv_tau)
    # The JSD needs lse first: a second sweep for its value and accumulators.
    lse_s, lse_t = log_sum_exps(stats)
    kl_t_m, kl_s_m, acc = jsd_sweep(h_pair, weight, bias, alpha, inv_tau, vocab_tile, lse_s, lse_t, want_dh)
    loss, grad_center, dh = jsd_finish(kl_t_m, kl_s_m, acc, alpha, inv_tau)
    return loss, lse_s, lse_t, grad_center, dh


def grad_tile(z_s, z_t, z_d, lse_s, lse_t, grad_center, alpha):
    """g = dLoss/dz_s for one [R, Vt] tile, given the per-token statistics of the forward."""
    log_p_s = z_s - lse_s[:, None]
    p_s = log_p_s.exp()
    if alpha == 0.0:
        return p_s - (z_t - lse_t[:, None]).exp()
    if alpha == 1.0:  # z_s - z_t = -z_d, the difference taken before rounding
        return p_s * (-z_d - grad_center[:, None])
    log_m = _jsd_log_mixture(log_p_s, z_t - lse_t[:, None], alpha)
    return (1.0 - alpha) * p_s * ((log_p_s - log_m) - grad_center[:, None])


def grad_tiles(h_t, weight, bias, stats, alpha, inv_tau, vocab_tile) -> TileGrads:
    """The recompute backward's tiles of g (for ``recompute_grads``): both logit tiles rebuilt over
    the rows of ``weight`` from h_s, h_t and the forward's per-token ``stats`` (lse_s, lse_t,
    grad_center), each [N]."""
    lse_s, lse_t, grad_center = stats

    def tile_grads(r0, r1, hs_chunk):  # g of the rows [r0, r1), one vocabulary tile at a time
        h_pair = stack_pair(hs_chunk, h_t[r0:r1])  # [2R, D]
        rows_stats = (lse_s[r0:r1], lse_t[r0:r1], grad_center[r0:r1])
        for v0, v1 in spans(weight.shape[0], vocab_tile):
            z_s, z_t, z_d, w_tile = pair_logits(h_pair, weight, bias, v0, v1, inv_tau)
            yield v0, v1, grad_tile(z_s, z_t, z_d, *rows_stats, alpha), w_tile

    return tile_grads


def _forward_sweep(student_hidden, teacher_hidden, weight, bias, alpha, inv_tau, tiles, want_dh):
    """Per-token (loss, lse_s, lse_t, grad_center) [N] and, if wanted, dh [N, D], chunk by chunk."""
    num_tokens = student_hidden.shape[0]
    rows, vocab_tile = tiles
    dtype = compute_dtype(student_hidden.dtype)
    loss = student_hidden.new_empty(num_tokens, dtype=dtype)
    lse_s, lse_t, grad_center = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
    dh = student_hidden.new_empty(student_hidden.shape, dtype=dtype) if want_dh else None
    for r0, r1 in spans(num_tokens, rows):
        out = _forward_chunk(
            student_hidden[r0:r1], teacher_hidden[r0:r1], weight, bias, alpha, inv_tau, vocab_tile, want_dh
        )
        loss[r0:r1], lse_s[r0:r1], lse_t[r0:r1], grad_center[r0:r1] = out[:4]
        if want_dh:
            dh[r0:r1] = out[4]
    return loss, lse_s, lse_t, grad_center, dh


class ChunkedSelfDistill(torch.autograd.Function):
    """Per-token divergences [N] (fp32) with the memory of one [R, Vt] tile set."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, alpha, temperature, memory_budget_mb):
        # student_hidden, teacher_hidden: [N, D]; weight: [V, D]; bias: [V] or None
        num_tokens = student_hidden.shape[0]
        inv_tau = 1.0 / temperature
        rows, vocab_tile = tile_sizes(num_tokens, weight.shape[0], memory_budget_mb)
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[3])
        # The gradient is formed in the forward only when it is per-row (dh alone): then the
        # backward merely scales rows by grad_output. dW needs grad_output inside the sum.
        dh_in_forward = need_dh and not need_dw
        loss, lse_s, lse_t, grad_center, dh = _forward_sweep(
            student_hidden, teacher_hidden, weight, bias, alpha, inv_tau, (rows, vocab_tile), dh_in_forward
        )
        ctx.alpha, ctx.inv_tau, ctx.tiles = alpha, inv_tau, (rows, vocab_tile)
        ctx.dh_in_forward, ctx.student_dtype = dh_in_forward, student_hidden.dtype
        if dh_in_forward:
            ctx.save_for_backward(dh)
        elif need_dh or need_dw:
            ctx.save_for_backward(student_hidden, teacher_hidden, weight, bias, lse_s, lse_t, grad_center)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # grad_loss: [N] dLoss/d(per-token divergence)
        if ctx.dh_in_forward:
            (dh,) = ctx.saved_tensors
            return scale_rows(dh, grad_loss, ctx.student_dtype), None, None, None, None, None, None
        h_s, h_t, weight, bias, lse_s, lse_t, grad_center = ctx.saved_tensors
        rows, vocab_tile = ctx.tiles
        tile_grads = grad_tiles(
            h_t, weight, bias, (lse_s, lse_t, grad_center), ctx.alpha, ctx.inv_tau, vocab_tile
        )
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[2],
            bias is not None and ctx.needs_input_grad[3],
        )
        dh, dw, db = recompute_grads(h_s, weight, bias, grad_loss, ctx.inv_tau, rows, needs, tile_grads)
        return dh, None, dw, db, None, None, None


def torch_token_losses(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D], a constant (never receives a gradient)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:  # [N] fp32 (fp64 for fp64 inputs)
    """Per-token divergences without [N, V] logits; differentiable w.r.t. h_s, W, bias."""
    teacher_hidden = teacher_hidden.detach()
    grad_wanted = torch.is_grad_enabled() and (
        student_hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not grad_wanted:
        with torch.no_grad():
            tiles = tile_sizes(student_hidden.shape[0], weight.shape[0], memory_budget_mb)
            return _forward_sweep(
                student_hidden, teacher_hidden, weight, bias, alpha, 1.0 / temperature, tiles, False
            )[0]
    return ChunkedSelfDistill.apply(
        student_hidden, teacher_hidden, weight, bias, float(alpha), float(temperature), memory_budget_mb
    )
