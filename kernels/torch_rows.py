"""PyTorch twin of the 3-GEMM path's row kernel (``triton_rows``), for the CPU.

Same contract as ``triton_rows.launch_rows`` for fp32/fp64 buffers: reads the chunk's raw
student and teacher logit rows, returns the per-token losses and writes g = w_n dLoss_n/dz_s
over the student rows. Vocabulary tiles of TILE columns bound the temporaries; the statistics
are the kernel's (online max / sum, A or B, and C for the log1p gap).
"""

from __future__ import annotations

import math

import torch
from sdft_kernels.torch_tiles import online_softmax_update, spans

TILE = 4096  # columns per step: [n, TILE] temporaries (a few MiB at n = 128)


def _tile(logits, n_rows, bias, v0, v1, inv_tau, teacher_is_diff):
    raw_s, raw_t = logits[:n_rows, v0:v1], logits[n_rows:, v0:v1]
    z_s = raw_s if bias is None else raw_s + bias[v0:v1].to(raw_s.dtype)
    z_s = z_s * inv_tau
    if teacher_is_diff:
        diff = raw_t * inv_tau
        return z_s, z_s + diff, diff
    z_t = (raw_t if bias is None else raw_t + bias[v0:v1].to(raw_t.dtype)) * inv_tau
    return z_s, z_t, z_t - z_s


def torch_rows_step(
    logits: torch.Tensor,  # [2n, V] fp32/fp64: raw student rows, then raw teacher rows
    bias: torch.Tensor | None,
    alpha: float,
    temperature: float,
    *,
    teacher_is_diff: bool,
    grad_dtype: torch.dtype | None,
    split_g: bool = False,
    row_weight: torch.Tensor | None = None,
    uniform_prescale: bool = False,
) -> tuple[torch.Tensor, None]:
    """(loss [n], None); with ``grad_dtype`` (the buffer's own dtype) g over the student rows."""
    if grad_dtype not in (None, logits.dtype):
        raise NotImplementedError("torch_rows_step writes g in the buffer's own dtype only")
    n_rows, vocab = logits.shape[0] // 2, logits.shape[1]
    inv_tau = 1.0 / temperature
    m_s = torch.full((n_rows,), -math.inf, dtype=logits.dtype, device=logits.device)
    m_t, l_s, l_t = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s)
    cross, shift = torch.zeros_like(m_s), torch.zeros_like(m_s)
    for v0, v1 in spans(vocab, TILE):
        z_s, z_t, diff = _tile(logits, n_rows, bias, v0, v1, inv_tau, teacher_is_diff)
        new_m_s, scale_s, e_s, l_s = online_softmax_update(m_s, l_s, z_s)
        new_m_t, scale_t, e_t, l_t = online_softmax_update(m_t, l_t, z_t)
        if alpha == 0.0:
            cross = cross * scale_t + (e_t * diff).sum(1)
        elif alpha == 1.0:
            cross = cross * scale_s - (e_s * diff).sum(1)
        if alpha in (0.0, 1.0):
            shift = shift * scale_s + (e_s * torch.expm1(diff)).sum(1)
        m_s, m_t = new_m_s, new_m_t
    lse_s, lse_t = m_s + l_s.log(), m_t + l_t.log()
    if alpha in (0.0, 1.0):
        ratio = shift / l_s
        lse_gap = torch.where(ratio.abs() < 0.5, torch.log1p(ratio), lse_t - lse_s)
        center = cross / l_s if alpha == 1.0 else torch.zeros_like(cross)
        loss = cross / l_t - lse_gap if alpha == 0.0 else center + lse_gap
    else:
        log_a, log_b = math.log1p(-alpha), math.log(alpha)
        kl_t_m, kl_s_m = torch.zeros_like(m_s), torch.zeros_like(m_s)
        for v0, v1 in spans(vocab, TILE):
            z_s, z_t, _ = _tile(logits, n_rows, bias, v0, v1, inv_tau, teacher_is_diff)
            log_p_s, log_p_t = z_s - lse_s[:, None], z_t - lse_t[:, None]
            log_m = torch.logaddexp(log_p_s + log_a, log_p_t + log_b)
            kl_t_m += (log_p_t.exp() * (log_p_t - log_m)).sum(1)
            kl_s_m += (log_p_s.exp() * (log_p_s - log_m)).sum(1)
        center, loss = kl_s_m, alpha * kl_t_m + (1.0 - alpha) * kl_s_m
    if grad_dtype is not None:
        weight = 1.0 if row_weight is None else row_weight.to(logits.dtype)[:, None]
        for v0, v1 in spans(vocab, TILE):
            z_s, z_t, diff = _tile(logits, n_rows, bias, v0, v1, inv_tau, teacher_is_diff)
            log_p_s = z_s - lse_s[:, None]
            if alpha == 0.0:
                g = log_p_s.exp() - (z_t - lse_t[:, None]).exp()
            elif alpha == 1.0:
                g = log_p_s.exp() * (-diff - center[:, None])
            else:
                log_m = torch.logaddexp(log_p_s + log_a, z_t - lse_t[:, None] + log_b)
                g = (1.0 - alpha) * log_p_s.exp() * (log_p_s - log_m - center[:, None])
            logits[:n_rows, v0:v1] = g * weight
    return loss.clamp_min(0.0).to(torch.float32 if logits.dtype == torch.float32 else logits.dtype), None
