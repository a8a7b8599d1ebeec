"""Reference self-distillation loss: full logits, written for clarity.

This is the oracle every fast path is tested against (run it in float64) and
the "naive formula" of the benchmarks: the full-vocabulary divergence and the
top-k support (TRL's ``topk_logits`` mode), with the teacher sharing the
student's LM head or bringing its own. It materialises two [N, V] logit
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


def divergence_from_log_probs(
    log_p_s: torch.Tensor,  # [N, S] student log-probabilities over a support of S outcomes
    log_p_t: torch.Tensor,  # [N, S] teacher log-probabilities over the same support
    alpha: float,
) -> torch.Tensor:  # [N]
    """Per-token divergence between two distributions given as log-probabilities on one support
    (the whole vocabulary, or the top-k ids plus an optional tail bucket)."""
    if alpha == 0.0:
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if alpha == 1.0:
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    # log M = logsumexp(log p_s + log(1 - alpha), log p_t + log(alpha))
    log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1.0 - alpha), log_p_t + math.log(alpha)]), dim=0)
    kl_t_m = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s_m = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    return alpha * kl_t_m + (1.0 - alpha) * kl_s_m


def divergence_from_logits(
    student_logits: torch.Tensor,  # [N, V], already divided by the temperature
    teacher_logits: torch.Tensor,  # [N, V], already divided by the temperature
    alpha: float,
) -> torch.Tensor:  # [N]
    """Per-token divergence from full logits (the formula of TRL's full-logit path)."""
    log_p_s = torch.log_softmax(student_logits, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits, dim=-1)
    return divergence_from_log_probs(log_p_s, log_p_t, alpha)


def reference_logits(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D_t] (treated as a constant)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    teacher_weight: torch.Tensor | None,  # [V, D_t]; None: the teacher shares (weight, bias)
    teacher_bias: torch.Tensor | None,  # [V]
    temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # z_s [N, V] (differentiable), z_t [N, V] (constant)
    """Full student and teacher logits divided by the temperature, in ``dtype``."""
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    with torch.no_grad():
        w_t = teacher_weight.detach().to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.detach().to(dtype)
        z_t = torch.nn.functional.linear(teacher_hidden.detach().to(dtype), w_t, b_t)
    z_s = torch.nn.functional.linear(student_hidden.to(dtype), w, b)
    return z_s / temperature, z_t / temperature


def reference_token_losses(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D_t] (treated as a constant)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    teacher_weight: torch.Tensor | None = None,  # [V, D_t]: the teacher's own head
    teacher_bias: torch.Tensor | None = None,  # [V]
) -> torch.Tensor:  # [N]
    """Per-token divergence computed from full logits.

    ``compute_dtype=None`` computes in the inputs' dtype (the "same-dtype
    reference" of the error-budget tests); pass ``torch.float64`` for the oracle.
    The teacher side is detached: no gradient ever flows into it.
    """
    dtype = compute_dtype or student_hidden.dtype
    z_s, z_t = reference_logits(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, temperature, dtype
    )
    return divergence_from_logits(z_s, z_t, alpha)


def reference_topk_support(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D_t] (treated as a constant)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    k: int,
    support: str = "student",
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
):  # (ids [N, k], z_s at ids [N, k], lse_s [N], z_t at ids [N, k], lse_t [N])
    """The top-k support from full logits: the k ids of largest ``support``-side logit, ties to the
    lower id (a stable sort; see ``sdft_kernels.topk_support``), both sides' logits there and their
    log-sum-exps. Differentiable on the student side."""
    dtype = compute_dtype or student_hidden.dtype
    z_s, z_t = reference_logits(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, temperature, dtype
    )
    ranked = (z_s if support == "student" else z_t).detach() + 0.0  # + 0.0: -0.0 ranks as +0.0
    ids = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :k]
    return (
        ids,
        z_s.gather(1, ids),
        torch.logsumexp(z_s, dim=-1),
        z_t.gather(1, ids),
        torch.logsumexp(z_t, dim=-1),
    )
