"""Reference self-distillation loss: full logits, written for clarity.

This is the oracle every fast path is tested against (run it in float64) and
the "naive formula" of the benchmarks. It materialises two [N, V] logit
tensors plus their log-softmaxes: memory traffic ~ 4 * N * V * sizeof(dtype)
for the forward alone, which is exactly what the fused paths avoid.

Divergence, with TRL's meaning of ``alpha`` (called beta in TRL's GKD/JSD code):
    alpha = 0      forward KL(T || S) = sum_v p_t (log p_t - log p_s)
    alpha = 1      reverse KL(S || T) = sum_v p_s (log p_s - log p_t)
    0 < alpha < 1  generalized JSD with mixture M = (1 - alpha) S + alpha T:
                   alpha * KL(T || M) + (1 - alpha) * KL(S || M)
"""

from __future__ import annotations

import math

import torch


def divergence_from_logits(
    student_logits: torch.Tensor,  # [N, V], already divided by the temperature
    teacher_logits: torch.Tensor,  # [N, V], already divided by the temperature
    alpha: float,
) -> torch.Tensor:  # [N]
    """Per-token divergence from full logits (the formula of TRL's full-logit path)."""
    log_p_s = torch.log_softmax(student_logits, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits, dim=-1)
    if alpha == 0.0:
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if alpha == 1.0:
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    # log M = logsumexp(log p_s + log(1 - alpha), log p_t + log(alpha))
    log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1.0 - alpha), log_p_t + math.log(alpha)]), dim=0)
    kl_t_m = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s_m = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    return alpha * kl_t_m + (1.0 - alpha) * kl_s_m


def reference_token_losses(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D] (treated as a constant)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [N]
    """Per-token divergence computed from full logits.

    ``compute_dtype=None`` computes in the inputs' dtype (the "same-dtype
    reference" of the error-budget tests); pass ``torch.float64`` for the oracle.
    The teacher side is detached: no gradient ever flows into it.
    """
    dtype = compute_dtype or student_hidden.dtype
    h_s = student_hidden.to(dtype)
    h_t = teacher_hidden.detach().to(dtype)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    with torch.no_grad():
        z_t = torch.nn.functional.linear(h_t, w.detach(), None if b is None else b.detach())
    z_s = torch.nn.functional.linear(h_s, w, b)
    return divergence_from_logits(z_s / temperature, z_t / temperature, alpha)
