"""Chunked top-k support (PyTorch): the ids, logits and log-sum-exps of TRL's ``topk_logits`` mode.

Same semantics as ``sdft_kernels.reference.reference_topk_support`` without [N, V] logits: row
chunks and vocabulary tiles as in ``torch_tiles``. Per row chunk, one sweep over the vocabulary
keeps a running top-k of the support side's logits (each tile's candidates merged with the k kept
so far: the k largest of ``k + Vt`` values) and, when the tail bucket needs them, the running
max / sum-exp of both sides. The logits at the chosen ids are then recomputed by a gather-dot
(W[ids] . h, [R, k, D] at a time), which is also what the gradient flows through.

Tie rule (``sdft_kernels.topk_support``): equal values rank by lower id. fp32 logits are packed
into unique int64 keys (``sortable_keys``) and merged with ``torch.topk``; float64 logits (tests)
use a stable sort, where kept candidates (lower ids) stand before the tile's.

Gradients w.r.t. the student logits z_s (dLoss/dz_s[ids] = g_k, dLoss/dlse_s = c):
    dz_s = scatter(g_k at ids) + c p_s
    dh = (g_k @ W[ids] + c E_{p_s}[W]) / tau,   dW[ids] += g_k^T h / tau (+ c p_s^T h / tau)
The sparse part is a gather/scatter of k rows per token. The dense part exists only with the tail
bucket (without it the log-sum-exps cancel): with the head frozen E_{p_s}[W] is accumulated in the
forward sweep like flash attention's value accumulator; with a trained head the backward sweeps
the vocabulary again (``torch_tiles.recompute_grads``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from sdft_kernels.topk_support import ids_from_keys, sortable_keys
from sdft_kernels.torch_tiles import (
    DEFAULT_MEMORY_BUDGET_MB,
    TILE_BUDGET_MB,
    compute_dtype,
    logit_tile,
    online_softmax_update,
    recompute_grads,
    spans,
    tile_sizes,
)


def _merge_topk(kept, kept_ids, tile, tile_ids, k):
    """The k largest of the kept candidates and one tile's, ties to the lower id.

    fp32: ``kept`` holds int64 keys (``kept_ids`` unused); float64: values and their ids.
    """
    if tile.dtype == torch.float64:
        values = torch.cat([kept, tile + 0.0], dim=1)  # + 0.0: -0.0 ranks as +0.0
        ids = torch.cat([kept_ids, tile_ids.expand(tile.shape[0], -1)], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
        return values.gather(1, order), ids.gather(1, order)
    keys = torch.cat([kept, sortable_keys(tile, tile_ids.expand(tile.shape[0], -1))], dim=1)
    return torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=False).values, None


def topk_statistics(
    student_hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    teacher_hidden: torch.Tensor,  # [N, D_t]
    teacher_weight: torch.Tensor,  # [V, D_t]
    teacher_bias: torch.Tensor | None,  # [V]
    *,
    k: int,
    inv_tau: float,
    support_teacher: bool,
    need_lse: bool,
    want_expected: bool,
    student_grad: bool,
    memory_budget_mb: float,
):  # (ids [N, k] long, lse_s [N] | None, lse_t [N] | None, E_{p_s}[W] [N, D] | None)
    """The support ids (sorted by descending logit) and, if asked, both log-sum-exps and the
    student's expected head row, in one sweep per row chunk; no autograd."""
    num_tokens, vocab = student_hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(student_hidden.dtype)
    # Both sides' tiles are live at once when the log-sum-exps are needed.
    rows, vocab_tile = tile_sizes(num_tokens, vocab, memory_budget_mb / (2 if need_lse else 1))
    device = student_hidden.device
    ids = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    lse_s = torch.empty(num_tokens, dtype=dtype, device=device) if need_lse else None
    lse_t = torch.empty_like(lse_s) if need_lse else None
    expected = student_hidden.new_empty(student_hidden.shape, dtype=dtype) if want_expected else None
    for r0, r1 in spans(num_tokens, rows):
        h_s = student_hidden[r0:r1].to(dtype)
        h_t = teacher_hidden[r0:r1].to(dtype)
        count = r1 - r0
        if dtype == torch.float64:
            kept = h_s.new_empty(count, 0)
        else:
            kept = torch.empty(count, 0, dtype=torch.int64, device=device)
        kept_ids = torch.empty(count, 0, dtype=torch.long, device=device)
        m_s = torch.full((count,), -math.inf, dtype=dtype, device=device)
        m_t, l_s, l_t = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s)
        acc = h_s.new_zeros(count, weight.shape[1]) if want_expected else None  # [R, D]
        for v0, v1 in spans(vocab, vocab_tile):
            z_s = z_t = None
            if need_lse or not support_teacher:
                z_s, w_tile = logit_tile(h_s, weight, bias, v0, v1, inv_tau)  # [R, Vt]
            if need_lse or support_teacher:
                z_t, _ = logit_tile(h_t, teacher_weight, teacher_bias, v0, v1, inv_tau)  # [R, Vt]
            if need_lse:
                m_s, scale_s, e_s, l_s = online_softmax_update(m_s, l_s, z_s)
                m_t, _, _, l_t = online_softmax_update(m_t, l_t, z_t)
                if acc is not None:
                    acc.mul_(scale_s[:, None]).addmm_(e_s, w_tile)  # sum exp(z_s - m_s) W_v
            tile_ids = torch.arange(v0, v1, device=device)[None, :]
            kept, kept_ids = _merge_topk(kept, kept_ids, z_t if support_teacher else z_s, tile_ids, k)
        if dtype == torch.float64:
            ids[r0:r1] = kept_ids  # already sorted by the stable sort
        else:
            ids[r0:r1] = ids_from_keys(torch.sort(kept, dim=1, descending=True).values)
        if need_lse:
            lse_s[r0:r1] = m_s + torch.log(l_s)
            lse_t[r0:r1] = m_t + torch.log(l_t)
        if acc is not None:
            expected[r0:r1] = acc / l_s[:, None]
    return ids, lse_s, lse_t, expected


def student_lse_sweep(hidden, weight, bias, inv_tau, want_expected, memory_budget_mb):
    """(lse [N], E_p[W] [N, D] | None) of z = (W h + b) / tau in one online sweep, where
    E_p[W] = sum_v softmax(z)_v W_v is d lse / dh times tau. For a ``select`` that finds the ids
    elsewhere (the Triton kernel): the backward recomputes p_s = exp(z - lse) with these tiles, so
    lse must come from the same arithmetic."""
    dtype = compute_dtype(hidden.dtype)
    rows, vocab_tile = tile_sizes(hidden.shape[0], weight.shape[0], memory_budget_mb)
    lse = hidden.new_empty(hidden.shape[0], dtype=dtype)
    out = hidden.new_empty(hidden.shape, dtype=dtype) if want_expected else None
    for r0, r1 in spans(hidden.shape[0], rows):
        h = hidden[r0:r1].to(dtype)
        m = torch.full((r1 - r0,), -math.inf, dtype=dtype, device=hidden.device)
        total = torch.zeros_like(m)
        acc = h.new_zeros(h.shape) if want_expected else None
        for v0, v1 in spans(weight.shape[0], vocab_tile):
            z, w_tile = logit_tile(h, weight, bias, v0, v1, inv_tau)
            m, scale, e, total = online_softmax_update(m, total, z)
            if acc is not None:
                acc.mul_(scale[:, None]).addmm_(e, w_tile)
        lse[r0:r1] = m + torch.log(total)
        if acc is not None:
            out[r0:r1] = acc / total[:, None]
    return lse, out


def _gather_rows(num_tokens: int, k: int, width: int, memory_budget_mb: float) -> int:
    # Row chunk for [R, k, D] gathered head rows within the budget.
    return max(1, min(num_tokens, int(memory_budget_mb * 2**20) // (4 * 2 * k * max(width, 1))))


def gather_logits(hidden, weight, bias, ids, inv_tau, memory_budget_mb):  # [N, k] compute dtype
    """z[n, j] = (W[ids[n, j]] . h[n] + b[ids[n, j]]) / tau, without autograd."""
    dtype = compute_dtype(hidden.dtype)
    out = hidden.new_empty(ids.shape, dtype=dtype)
    rows = _gather_rows(ids.shape[0], ids.shape[1], hidden.shape[1], memory_budget_mb)
    for r0, r1 in spans(ids.shape[0], rows):
        w_rows = weight[ids[r0:r1]].to(dtype)  # [R, k, D]
        z = torch.bmm(w_rows, hidden[r0:r1].to(dtype)[:, :, None]).squeeze(2)  # [R, k]
        if bias is not None:
            z = z + bias[ids[r0:r1]].to(dtype)
        out[r0:r1] = z * inv_tau
    return out


def _sparse_grads(hidden, weight, bias, ids, grad_k, inv_tau, needs, memory_budget_mb):
    """dh, dW, dbias of sum_{n,j} grad_k[n, j] z[n, ids[n, j]] (each None unless asked for)."""
    need_dh, need_dw, need_db = needs
    dtype = compute_dtype(hidden.dtype)
    dh = hidden.new_zeros(hidden.shape, dtype=dtype) if need_dh else None
    dw = weight.new_zeros(weight.shape, dtype=dtype) if need_dw else None
    db = weight.new_zeros(weight.shape[0], dtype=dtype) if need_db else None
    rows = _gather_rows(ids.shape[0], ids.shape[1], hidden.shape[1], memory_budget_mb)
    for r0, r1 in spans(ids.shape[0], rows):
        g = grad_k[r0:r1].to(dtype) * inv_tau  # [R, k]
        flat_ids = ids[r0:r1].reshape(-1)
        if dh is not None:  # [R, D] = [R, 1, k] @ [R, k, D]
            dh[r0:r1] = torch.bmm(g[:, None, :], weight[ids[r0:r1]].to(dtype)).squeeze(1)
        if dw is not None:  # dW[ids] += g h
            h = hidden[r0:r1].to(dtype)
            dw.index_add_(0, flat_ids, (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
        if db is not None:
            db.index_add_(0, flat_ids, g.reshape(-1))
    return dh, dw, db


class TopkSupport(torch.autograd.Function):
    """(ids, z_s at ids, lse_s, z_t at ids, lse_t); gradients flow from z_s at ids and lse_s."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        weight,
        bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        k,
        temperature,
        support_teacher,
        tail,
        memory_budget_mb,
        select,
    ):
        inv_tau = 1.0 / temperature
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        want_expected = tail and need_dh and not need_dw
        ids, lse_s, lse_t, expected = select(
            student_hidden,
            weight,
            bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            k=k,
            inv_tau=inv_tau,
            support_teacher=support_teacher,
            need_lse=tail,
            want_expected=want_expected,
            student_grad=need_dh or need_dw,
            memory_budget_mb=memory_budget_mb,
        )
        student_k = gather_logits(student_hidden, weight, bias, ids, inv_tau, memory_budget_mb)
        teacher_k = gather_logits(
            teacher_hidden, teacher_weight, teacher_bias, ids, inv_tau, memory_budget_mb
        )
        ctx.inv_tau, ctx.budget, ctx.student_dtype = inv_tau, memory_budget_mb, student_hidden.dtype
        ctx.save_for_backward(student_hidden, weight, bias, ids, lse_s, expected)
        if lse_s is None:  # without the tail the log-sum-exps are not computed (they cancel)
            lse_s = lse_t = student_k.new_zeros(0)
        ctx.mark_non_differentiable(ids, teacher_k, lse_t)
        return ids, student_k, lse_s, teacher_k, lse_t

    @staticmethod
    def backward(ctx, _grad_ids, grad_student_k, grad_lse_s, _grad_teacher_k, _grad_lse_t):
        hidden, weight, bias, ids, lse_s, expected = ctx.saved_tensors
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        dh, dw, db = _sparse_grads(hidden, weight, bias, ids, grad_student_k, ctx.inv_tau, needs, ctx.budget)
        if grad_lse_s is not None and grad_lse_s.numel() and lse_s is not None:
            if expected is not None:  # frozen head: d lse_s / dh = E_{p_s}[W] / tau
                dh += (grad_lse_s.to(dh.dtype) * ctx.inv_tau)[:, None] * expected
            else:  # trained head: sweep again for c p_s (dense over the vocabulary)
                rows, vocab_tile = tile_sizes(hidden.shape[0], weight.shape[0], ctx.budget)

                def tile_grads(r0, r1, h):  # g = p_s of the rows [r0, r1), tile by tile
                    for v0, v1 in spans(weight.shape[0], vocab_tile):
                        z, w_tile = logit_tile(h, weight, bias, v0, v1, ctx.inv_tau)
                        yield v0, v1, torch.exp(z - lse_s[r0:r1, None]), w_tile

                dense = recompute_grads(
                    hidden, weight, bias, grad_lse_s, ctx.inv_tau, rows, needs, tile_grads
                )
                dh, dw, db = (
                    None if sparse is None else sparse + extra.to(sparse.dtype)
                    for sparse, extra in zip((dh, dw, db), dense)
                )
        return (
            None if dh is None else dh.to(ctx.student_dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            *([None] * 9),
        )


def torch_topk_support(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D_t], a constant
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    k: int,
    support: str = "student",
    tail: bool = False,
    temperature: float = 1.0,
    teacher_weight: torch.Tensor | None = None,  # [V, D_t]; None: the teacher shares the head
    teacher_bias: torch.Tensor | None = None,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,  # None: torch_tiles.TILE_BUDGET_MB
    select: Callable = topk_statistics,
):  # (ids [N, k], z_s at ids [N, k], lse_s [N], z_t at ids [N, k], lse_t [N]); lse empty without tail
    """The top-k support without [N, V] logits; differentiable w.r.t. h_s, W, bias.

    ``select`` finds the ids (and log-sum-exps): this module's sweep, or the Triton kernel's.
    """
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    if memory_budget_mb is None:
        memory_budget_mb = TILE_BUDGET_MB
    return TopkSupport.apply(
        student_hidden,
        weight,
        bias,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        int(k),
        float(temperature),
        support == "teacher",
        bool(tail),
        memory_budget_mb,
        select,
    )
