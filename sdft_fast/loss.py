"""Public loss API: the fused linear self-distillation loss and its chunked companions.

``self_distill_loss`` takes the student's and the teacher's final hidden states (aligned to the
same completion tokens) and the LM head, and returns the SDFT objective without ever building
[tokens, vocab] logits. Any trainer can drop it in::

    hidden_s = student_model.model(...).last_hidden_state       # [B, T, D], requires grad
    with torch.no_grad():
        hidden_t = teacher_model.model(...).last_hidden_state   # [B, T, D], same tokens
    loss = self_distill_loss(hidden_s, hidden_t, lm_head.weight, loss_mask=mask)

Implementations (``impl``), all from ``sdft_kernels``: ``"triton"`` (CUDA: the 3-GEMM path
with a Triton row kernel where ``memory_budget_mb`` holds chunks of >= 128 tokens, the fused
Triton kernels below that), ``"torch"`` (chunked PyTorch, bounded memory, the CPU path),
``"reference"`` (full logits, for tests), ``"auto"`` (triton on CUDA when Triton imports, else
torch). ``memory_budget_mb=None`` is each implementation's default working memory (see
``sdft_kernels.torch_tiles``). This module validates the
inputs, keeps only the tokens that count, picks the implementation and reduces the per-token
losses; ``reduce_token_losses`` applies the same reductions to losses computed once with
``reduction="none"`` (e.g. a weighted loss and an unweighted metric from one sweep).

The teacher hidden states are a constant: a teacher tensor that requires grad is accepted and
simply never receives a gradient (it is detached). A teacher that is another model (or a separate
copy of the student) passes its own head as ``teacher_weight`` / ``teacher_bias`` (its hidden size
may differ). ``topk=k`` gives TRL's ``topk_logits`` objective (the divergence over the k ids of
largest student logit, renormalised or with ``topk_tail``), computed while streaming the
vocabulary like the full one.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from sdft_kernels.reference import reference_token_losses, reference_topk_support
from sdft_kernels.topk_support import topk_divergence
from sdft_kernels.torch_linear_ce import torch_linear_cross_entropy
from sdft_kernels.torch_sdft import torch_token_losses
from sdft_kernels.torch_tiles import DEFAULT_MEMORY_BUDGET_MB
from sdft_kernels.torch_topk import torch_topk_support
from sdft_kernels.torch_two_heads import torch_two_head_token_losses
from sdft_kernels.torch_vocab_parallel import vocab_parallel_token_losses

from sdft_fast.loss_checks import (
    check_hidden_and_head,
    check_teacher_head,
    check_token_tensor,
    check_topk,
    describe,
)

try:  # Triton ships for Linux only: without it, impl="auto" takes the torch twin
    from sdft_kernels.triton_sdft import triton_token_losses
    from sdft_kernels.triton_topk import triton_topk_support
except ImportError:
    triton_token_losses = triton_topk_support = None

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")
IMPLS = ("auto", "triton", "torch", "reference")


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # The kernels take fp32/bf16/fp16; float64 (tests, gradcheck) goes to the torch twin.
        if device.type == "cuda" and dtype != torch.float64 and triton_token_losses is not None:
            return "triton"
        return "torch"
    if impl == "triton" and triton_token_losses is None:
        raise ValueError("impl='triton' needs the triton package (Linux); use impl='torch'")
    if impl == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on the CPU interpreter, or use impl='torch'"
            )
    return impl


def _resolve_impl_for(impl, student_hidden, teacher_head, topk):
    """``_resolve_impl``, where a teacher head of its own has no Triton kernel in the full mode
    (nor in another dtype than the student's): "auto" takes the torch twin, "triton" is an error."""
    missing = None
    if teacher_head is not None and topk is None:
        missing = "teacher_weight (a teacher head of its own) over the full vocabulary"
    elif teacher_head is not None and teacher_head[0].dtype != student_hidden.dtype:
        missing = "a teacher_weight dtype other than student_hidden's"
    if missing and impl == "triton":
        raise ValueError(f"impl='triton' has no kernel for {missing}; use impl='auto' or 'torch'")
    resolved = _resolve_impl(impl, student_hidden.device, student_hidden.dtype)
    return "torch" if missing and resolved == "triton" else resolved


# --------------------------------------------------------------------------- reductions


class _Tokens(NamedTuple):
    """Which tokens count and which sequence each belongs to, for tokens laid out [B, T] or [N]."""

    shape: torch.Size  # [B, T] or [N]: the layout of the tokens (and of reduction="none")
    counted_idx: torch.Tensor  # [M] flat indices of the tokens that count (the mask's True)
    weights: torch.Tensor | None  # [B * T] or [N] per-token multipliers
    sequence_ids: torch.Tensor  # [B * T] or [N] dense sequence index 0..S-1 of every token
    num_sequences: int  # S


def _token_layout(shape, device, loss_mask, token_weights, sequence_ids, reduction) -> _Tokens:
    """Validate the per-token arguments of a reduction against the tokens' ``shape``."""
    loss_mask = check_token_tensor("loss_mask", loss_mask, shape, device, kind="bool")
    token_weights = check_token_tensor("token_weights", token_weights, shape, device, kind="float")
    sequence_ids = check_token_tensor("sequence_ids", sequence_ids, shape, device, kind="int")
    if len(shape) == 2:  # [B, T]: each row is a sequence unless sequence_ids says otherwise
        batch, steps = shape
        if sequence_ids is None:
            sequence_ids = torch.arange(batch, device=device).repeat_interleave(steps)
            num_sequences = batch
        else:
            sequence_ids, num_sequences = _dense_ids(sequence_ids.reshape(-1))
    elif sequence_ids is None:
        if reduction == "sequence_mean":
            raise ValueError(
                "reduction='sequence_mean' with flat [N] tokens ([N, D] hidden states) needs "
                "sequence_ids [N] (the sequence of each token); pass them or use reduction='token_mean'"
            )
        sequence_ids = torch.zeros(shape[0], dtype=torch.long, device=device)
        num_sequences = 1
    else:
        sequence_ids, num_sequences = _dense_ids(sequence_ids)
    if loss_mask is None:
        counted_idx = torch.arange(shape.numel(), device=device)
    else:
        counted_idx = loss_mask.reshape(-1).nonzero().squeeze(1)
    weights = None if token_weights is None else token_weights.reshape(-1)
    return _Tokens(shape, counted_idx, weights, sequence_ids, num_sequences)


def _dense_ids(ids: torch.Tensor):
    # Map arbitrary sequence labels to 0..S-1 (S = number of distinct sequences, counted over all
    # tokens, so a sequence whose tokens are all masked still counts, contributing 0).
    unique, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(unique.numel())


def _reduce(per_token: torch.Tensor, tokens: _Tokens, reduction: str) -> torch.Tensor:
    """Combine the losses of the counted tokens (per_token: [M], in counted_idx order)."""
    counted_idx = tokens.counted_idx
    if tokens.weights is not None:
        per_token = per_token * tokens.weights[counted_idx].to(per_token.dtype)
    if reduction == "none":
        full = per_token.new_zeros(tokens.shape.numel()).index_put((counted_idx,), per_token)
        return full.reshape(tokens.shape)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "token_mean":
        return per_token.sum() / max(int(counted_idx.numel()), 1)
    # sequence_mean: per sequence, sum of weighted token losses over its number of counted tokens;
    # then the mean over all sequences (a sequence with no counted token contributes 0).
    seq = tokens.sequence_ids[counted_idx]
    sums = per_token.new_zeros(tokens.num_sequences).index_add(0, seq, per_token)
    counts = torch.bincount(seq, minlength=tokens.num_sequences).clamp_min(1).to(per_token.dtype)
    return (sums / counts).sum() / tokens.num_sequences


def reduce_token_losses(
    per_token: torch.Tensor,  # float [B, T] or [N]
    *,
    loss_mask: torch.Tensor | None = None,  # bool, shaped like per_token: which tokens count
    token_weights: torch.Tensor | None = None,  # float, shaped like per_token: multipliers
    sequence_ids: torch.Tensor | None = None,  # int, shaped like per_token: sequence of each token
    reduction: str = "sequence_mean",
) -> torch.Tensor:
    """Reduce per-token losses exactly as :func:`self_distill_loss` reduces its own.

    For one divergence sweep serving several reductions: compute
    ``self_distill_loss(..., reduction="none")`` once (unweighted), then reduce it with and
    without ``token_weights`` here. Same arguments, validation and semantics as the reduction
    of ``self_distill_loss``: ``[B, T]`` losses make each row a sequence, ``[N]`` losses need
    ``sequence_ids`` for ``"sequence_mean"``; masked tokens count for nothing whatever their
    value. Differentiable w.r.t. ``per_token``.
    """
    if not isinstance(per_token, torch.Tensor) or per_token.dim() not in (1, 2):
        raise ValueError(
            "per_token must be a [B, T] or [N] tensor, got "
            + (describe(per_token) if isinstance(per_token, torch.Tensor) else repr(type(per_token)))
        )
    if not per_token.dtype.is_floating_point:
        raise ValueError(f"per_token must be a floating-point tensor, got {describe(per_token)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    tokens = _token_layout(
        per_token.shape, per_token.device, loss_mask, token_weights, sequence_ids, reduction
    )
    return _reduce(per_token.reshape(-1).index_select(0, tokens.counted_idx), tokens, reduction)


def _zero_loss(reduction, lead_shape, dtype, *tensors):
    """Loss 0 with zero (not NaN) gradients for every input that requires grad."""
    zero = sum((t.sum() * 0.0).to(dtype) for t in tensors if t is not None and t.requires_grad)
    if not isinstance(zero, torch.Tensor):
        zero = torch.zeros((), dtype=dtype, device=tensors[0].device)
    if reduction == "none":
        return zero + torch.zeros(lead_shape, dtype=dtype, device=tensors[0].device)
    return zero


# --------------------------------------------------------------------------- public API


def self_distill_loss(
    student_hidden: torch.Tensor,  # [B, T, D] or [N, D]
    teacher_hidden: torch.Tensor,  # same shape, aligned to the same completion tokens
    lm_head_weight: torch.Tensor,  # [V, D]
    lm_head_bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    loss_mask: torch.Tensor | None = None,  # bool [B, T] / [N]: which tokens count
    token_weights: torch.Tensor | None = None,  # float [B, T] / [N]: per-token multipliers
    sequence_ids: torch.Tensor | None = None,  # int [N]: sequence of each token ([N, D] inputs)
    reduction: str = "sequence_mean",
    impl: str = "auto",
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
    process_group=None,  # torch.distributed group splitting the vocabulary (tensor parallel)
    teacher_weight: torch.Tensor | None = None,  # [V, D_t]: the teacher's own head (constant)
    teacher_bias: torch.Tensor | None = None,  # [V]
    topk: int | None = None,  # k: TRL's topk_logits objective on k ids per token
    topk_tail: bool = False,  # add the tail bucket (TRL's distillation_add_tail)
    topk_support: str = "student",  # whose k largest logits pick the ids (TRL local: "student")
) -> torch.Tensor:
    """Self-distillation loss between the student's and the teacher's next-token distributions.

    Per token, with z_s = (W h_s + b) / temperature and z_t = (W h_t + b) / temperature:

    * ``alpha=0``: forward KL(teacher || student) (what the SDFT paper's numbers used);
    * ``alpha=1``: reverse KL(student || teacher);
    * ``0 < alpha < 1``: generalized JSD, ``alpha KL(T||M) + (1-alpha) KL(S||M)`` with
      M = (1-alpha) S + alpha T — TRL's full-logit self-distillation value, token for token.

    ``loss_mask`` says which tokens count; ``token_weights`` multiplies each counted token's loss
    (importance ratios) without changing how many tokens count. ``reduction``:
    ``"sequence_mean"`` (per sequence: weighted sum over its counted tokens divided by their
    number, then the mean over sequences; an all-masked sequence contributes 0 — TRL's),
    ``"token_mean"`` (weighted sum over the number of counted tokens), ``"sum"``, ``"none"``
    (per-token losses, shaped like the mask, 0 where masked).

    ``teacher_weight`` / ``teacher_bias``: the teacher's own head, z_t = (W_t h_t + b_t) / tau
    (``teacher_hidden`` then has the teacher's hidden size); default: the student's head.
    ``topk=k``: TRL's ``topk_logits`` divergence, on the k ids of largest ``topk_support`` logit
    (ties to the lower id): both sides renormalised over the k ids, or with ``topk_tail`` their
    true log-probabilities there plus one bucket for the rest of the mass.

    Gradients flow to ``student_hidden``, and to the weight and bias only when they require grad;
    never to ``teacher_hidden``. The weight's gradient comes through the student's logits alone:
    the teacher's logits W h_t count as a constant target even though W appears in them (the
    teacher is the same network as the student, evaluated as a fixed target, as in TRL), so
    dW = sum over tokens of g_s h_s^T / temperature. Returns fp32 (fp64 for fp64 inputs);
    gradients come back in the inputs' dtype. An all-False mask gives 0 and zero gradients.

    ``process_group``: the LM head is split by vocabulary rows across the group's ranks (tensor
    parallel, ``sdft_kernels.torch_vocab_parallel``): ``lm_head_weight`` and ``lm_head_bias`` are
    this rank's block of rows (``vocab_shard``), every rank passes the same hidden states, mask,
    weights and settings, and gets the unsharded loss; dh is summed across the ranks in the
    backward, dW / dbias are this rank's block's. A collective: every rank must call it.
    ``impl`` "auto" or "torch"; ``torch.distributed.group.WORLD`` splits over every rank.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1] (0 forward KL, 1 reverse KL), got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if memory_budget_mb is not None and not (
        isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0
    ):
        raise ValueError(f"memory_budget_mb must be None (the default) or > 0, got {memory_budget_mb!r}")
    if teacher_hidden is None:
        raise ValueError("teacher_hidden is required (a tensor shaped like student_hidden)")
    teacher_head = check_teacher_head(lm_head_weight, lm_head_bias, teacher_weight, teacher_bias)
    check_hidden_and_head(
        student_hidden,
        teacher_hidden,
        lm_head_weight,
        lm_head_bias,
        teacher_dim=None if teacher_head is None else teacher_head[0].shape[1],
        teacher_dtype=None if teacher_head is None else teacher_head[0].dtype,
    )
    check_topk(topk, topk_tail, topk_support, lm_head_weight.shape[0])
    impl = _resolve_impl_for(impl, student_hidden, teacher_head, topk)
    if process_group is not None and impl not in ("auto", "torch"):
        raise ValueError(
            f"process_group (vocabulary-parallel loss) runs with impl='torch', got impl={impl!r}"
        )
    if process_group is not None and (teacher_head is not None or topk is not None):
        raise ValueError(
            "process_group (vocabulary-parallel loss) takes the shared-head full-vocabulary loss: "
            "teacher_weight and topk are not supported with it"
        )
    lead_shape = student_hidden.shape[:-1]
    tokens = _token_layout(
        lead_shape, student_hidden.device, loss_mask, token_weights, sequence_ids, reduction
    )
    hidden_dim = student_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, hidden_dim)  # [N, D]
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # [N, D_t]
    out_dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32

    # Only counted tokens reach the kernel: masked tokens cost no FLOPs.
    counted_idx = tokens.counted_idx
    if counted_idx.numel() == 0 and process_group is None:  # the ranks of a group meet in the kernel
        return _zero_loss(reduction, lead_shape, out_dtype, student_hidden, lm_head_weight, lm_head_bias)
    if counted_idx.numel() < h_s.shape[0]:
        h_s, h_t = h_s.index_select(0, counted_idx), h_t.index_select(0, counted_idx)
    h_s, h_t = h_s.contiguous(), h_t.detach().contiguous()

    if process_group is not None:
        per_token = vocab_parallel_token_losses(
            h_s,
            h_t,
            lm_head_weight,
            lm_head_bias,
            alpha=float(alpha),
            temperature=float(temperature),
            process_group=process_group,
            memory_budget_mb=memory_budget_mb,
        )
        return _reduce(per_token.to(out_dtype), tokens, reduction)

    if topk is not None:
        per_token = _topk_token_losses(
            h_s,
            h_t,
            (lm_head_weight, lm_head_bias),
            teacher_head,
            float(alpha),
            float(temperature),
            (topk, topk_tail, topk_support),
            impl,
            memory_budget_mb,
        )
    elif teacher_head is not None:
        per_token = _two_head_token_losses(
            h_s,
            h_t,
            (lm_head_weight, lm_head_bias),
            teacher_head,
            float(alpha),
            float(temperature),
            impl,
            memory_budget_mb,
        )
    else:
        grad_weights = None
        wants_grad = (
            student_hidden.requires_grad
            or lm_head_weight.requires_grad
            or (lm_head_bias is not None and lm_head_bias.requires_grad)
        )
        if impl == "triton" and reduction != "none" and wants_grad and torch.is_grad_enabled():
            grad_weights = _reduction_weights(tokens, reduction, out_dtype)
        per_token = _token_losses(
            h_s, h_t, lm_head_weight, lm_head_bias, float(alpha), float(temperature), impl, memory_budget_mb,
            grad_weights,
        )  # fmt: skip
    return _reduce(per_token.to(out_dtype), tokens, reduction)


def _reduction_weights(tokens: _Tokens, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss)/d(per-token loss) of the counted tokens ([M]): the incoming gradient the
    kernels can expect up to the reduced loss's own scalar gradient, so that the 3-GEMM path forms
    the whole gradient in its forward (dh, and dW when the head trains). ``_reduce`` is linear:
    its gradient anywhere is these coefficients."""
    probe = torch.zeros(tokens.counted_idx.numel(), dtype=dtype, device=tokens.counted_idx.device)
    probe.requires_grad_(True)
    (weights,) = torch.autograd.grad(_reduce(probe, tokens, reduction), probe)
    return weights


def _token_losses(h_s, h_t, weight, bias, alpha, temperature, impl, memory_budget_mb, grad_weights):
    """Per-token divergences [M] of the counted tokens by the chosen implementation."""
    if impl == "triton":
        return triton_token_losses(
            h_s,
            h_t,
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            alpha=alpha,
            temperature=temperature,
            memory_budget_mb=memory_budget_mb,
            grad_weights=grad_weights,
        )
    if impl == "torch":
        return torch_token_losses(
            h_s, h_t, weight, bias, alpha=alpha, temperature=temperature, memory_budget_mb=memory_budget_mb
        )
    compute = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    return reference_token_losses(
        h_s, h_t, weight, bias, alpha=alpha, temperature=temperature, compute_dtype=compute
    )


def _two_head_token_losses(h_s, h_t, head, teacher_head, alpha, temperature, impl, memory_budget_mb):
    """Per-token full-vocabulary divergences [M] when the teacher has its own head."""
    if impl == "reference":
        compute = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        return reference_token_losses(
            h_s,
            h_t,
            *head,
            alpha=alpha,
            temperature=temperature,
            compute_dtype=compute,
            teacher_weight=teacher_head[0],
            teacher_bias=teacher_head[1],
        )
    return torch_two_head_token_losses(
        h_s,
        h_t,
        *head,
        *teacher_head,
        alpha=alpha,
        temperature=temperature,
        memory_budget_mb=memory_budget_mb,
    )


def _topk_token_losses(h_s, h_t, head, teacher_head, alpha, temperature, topk, impl, memory_budget_mb):
    """Per-token top-k divergences [M]: the support (ids, logits there, log-sum-exps) by the
    chosen implementation, then the [M, k] divergence shared by all of them."""
    k, tail, support = topk
    teacher_weight, teacher_bias = teacher_head or (None, None)
    common = dict(
        k=k,
        support=support,
        temperature=temperature,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
    )
    if impl == "reference":
        compute = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        out = reference_topk_support(h_s, h_t, *head, compute_dtype=compute, **common)
    elif impl == "triton":
        out = triton_topk_support(h_s, h_t, *head, tail=tail, memory_budget_mb=memory_budget_mb, **common)
    else:
        out = torch_topk_support(h_s, h_t, *head, tail=tail, memory_budget_mb=memory_budget_mb, **common)
    _, student_k, lse_s, teacher_k, lse_t = out
    return topk_divergence(student_k, lse_s, teacher_k, lse_t, alpha=alpha, tail=tail)


class SelfDistillLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`self_distill_loss` holding its hyper-parameters."""

    def __init__(
        self,
        alpha: float = 0.0,
        temperature: float = 1.0,
        reduction: str = "sequence_mean",
        impl: str = "auto",
        memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
    ):
        super().__init__()
        self.alpha, self.temperature, self.reduction = alpha, temperature, reduction
        self.impl, self.memory_budget_mb = impl, memory_budget_mb

    def forward(
        self,
        student_hidden,
        teacher_hidden,
        lm_head_weight,
        lm_head_bias=None,
        *,
        loss_mask=None,
        token_weights=None,
        sequence_ids=None,
    ):
        return self_distill_loss(
            student_hidden,
            teacher_hidden,
            lm_head_weight,
            lm_head_bias,
            alpha=self.alpha,
            temperature=self.temperature,
            loss_mask=loss_mask,
            token_weights=token_weights,
            sequence_ids=sequence_ids,
            reduction=self.reduction,
            impl=self.impl,
            memory_budget_mb=self.memory_budget_mb,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}, impl={self.impl!r}"


def linear_cross_entropy(
    hidden: torch.Tensor,  # [B, T, D] or [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # long [B, T] / [N]
    *,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    reduction: str = "sequence_mean",
    temperature: float = 1.0,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under the LM head, chunked (the SFT baseline's loss).

    Same masking and reduction semantics as :func:`self_distill_loss`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_hidden_and_head(hidden, None, weight, bias)
    targets = check_token_tensor("targets", targets, hidden.shape[:-1], hidden.device, kind="int")
    if targets is None:
        raise ValueError("targets is required")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets must be token ids in [0, {weight.shape[0]}), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    lead_shape = hidden.shape[:-1]
    tokens = _token_layout(lead_shape, hidden.device, loss_mask, token_weights, sequence_ids, reduction)
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    counted_idx = tokens.counted_idx
    if counted_idx.numel() == 0:
        return _zero_loss(reduction, lead_shape, out_dtype, hidden, weight, bias)
    per_token = torch_linear_cross_entropy(
        h.index_select(0, counted_idx),
        weight,
        bias,
        targets.reshape(-1).index_select(0, counted_idx),
        temperature=float(temperature),
        memory_budget_mb=memory_budget_mb,
    )
    return _reduce(per_token.to(out_dtype), tokens, reduction)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,  # [N, D] (or [B, T, D])
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # long [N] (or [B, T])
    *,
    temperature: float = 1.0,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:  # fp32 [N] (or [B, T]); no gradient
    """log p(target) under softmax((W h + b) / temperature), chunked; for importance ratios."""
    losses = linear_cross_entropy(
        hidden.detach(),
        weight.detach(),
        None if bias is None else bias.detach(),
        targets,
        reduction="none",
        temperature=temperature,
        memory_budget_mb=memory_budget_mb,
        sequence_ids=None,
    )
    return -losses
