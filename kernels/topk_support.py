"""The top-k divergence once the support is known: [N, k] math shared by every implementation.

TRL's ``topk_logits`` self-distillation compares the student and the teacher on k token ids per
row (the student's k largest logits, in TRL's local-teacher path). Finding those ids and the two
log-sum-exps is the [N, V] part (``reference.reference_topk_support``, ``torch_topk``,
``triton_topk``); what remains works on [N, k] tensors and is this module:

* without the tail bucket, both sides are renormalised over the k ids (log-softmax of the k
  logits; the full log-sum-exps cancel) and the divergence is taken there;
* with the tail bucket, each side gets its true log-probabilities at the k ids
  (``logit - lse``) plus one extra outcome holding the rest of the mass, ``log(1 - P_topk)``,
  with ``log P_topk`` clamped to at most -1e-7 exactly as TRL does (so a support that captures all
  the mass in fp32 gives a finite tail and no gradient through the clamp).

Ties: among equal support-side logits the lower token id ranks first (a stable sort); every
implementation here follows that rule, so they select the same ids. ``torch.topk`` (what TRL
calls) breaks ties in an implementation-defined order. The choice cannot change the loss when the
tied ids have identical head rows (and biases) on both sides — the way exact ties arise in a real
head (duplicated or untrained rows) with a shared-head teacher — because then both sides' values
at either id are identical and the divergence is a sum over the support
(tests/sdft_fast/test_loss_topk_teacher_head.py checks this against TRL's own function, on rows
where torch.topk keeps other tied ids than ours).
"""

from __future__ import annotations

import torch
from sdft_kernels.reference import divergence_from_log_probs

TOPK_SUPPORTS = ("student", "teacher")  # whose k largest logits choose the ids
TAIL_LOG_MASS_CAP = -1e-7  # TRL's clamp of log P_topk before log(1 - P_topk)


def add_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:  # [N, k] -> [N, k + 1]
    """Append log(1 - P_topk), the mass outside the k ids, to true log-probabilities at the ids."""
    log_mass = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_CAP)
    return torch.cat([log_probs, torch.log(-torch.expm1(log_mass))], dim=-1)


def topk_divergence(
    student_logits: torch.Tensor,  # [N, k] student logits / tau at the support ids
    student_lse: torch.Tensor | None,  # [N] student full log-sum-exp (needed with tail)
    teacher_logits: torch.Tensor,  # [N, k] teacher logits / tau at the same ids
    teacher_lse: torch.Tensor | None,  # [N]
    *,
    alpha: float,
    tail: bool,
) -> torch.Tensor:  # [N]
    """Per-token divergence over the top-k support (renormalised, or with the tail bucket)."""
    if tail:
        log_p_s = add_tail_bucket(student_logits - student_lse[:, None])
        log_p_t = add_tail_bucket(teacher_logits - teacher_lse[:, None])
    else:
        log_p_s = torch.log_softmax(student_logits, dim=-1)
        log_p_t = torch.log_softmax(teacher_logits, dim=-1)
    return divergence_from_log_probs(log_p_s, log_p_t, alpha)


def sortable_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # int64, like values
    """One int64 per fp32 value whose order is (value descending, then id ascending).

    High 32 bits: the fp32 bit pattern made monotone as a signed integer (negative floats have
    their magnitude bits flipped); low 32 bits: 2^32 - 1 - id, so the lower id is the larger key.
    Keys are unique, so ``torch.topk`` over them is deterministic and follows the tie rule above.
    -0.0 is folded into +0.0 first so that equal values compare equal.
    """
    bits = (values.float() + 0.0).view(torch.int32)
    monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (monotone.to(torch.int64) << 32) | (0xFFFFFFFF - ids.to(torch.int64))


def ids_from_keys(keys: torch.Tensor) -> torch.Tensor:  # int64 ids
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)
