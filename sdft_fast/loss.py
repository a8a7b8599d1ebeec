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
simply never receives a gradient (it is detached).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from sdft_kernels.reference import reference_token_losses
from sdft_kernels.torch_linear_ce import torch_linear_cross_entropy
from sdft_kernels.torch_sdft import torch_token_losses
from sdft_kernels.torch_tiles import DEFAULT_MEMORY_BUDGET_MB
from sdft_kernels.torch_vocab_parallel import vocab_parallel_token_losses

try:  # Triton ships for Linux only: without it, impl="auto" takes the torch twin
    from sdft_kernels.triton_sdft import triton_token_losses
except ImportError:
    triton_token_losses = None

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")
IMPLS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------- validation


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_hidden_and_head(student_hidden, teacher_hidden, weight, bias, *, check_finite=True):
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() not in (2, 3):
        raise ValueError(
            "student_hidden must be a [B, T, D] or [N, D] tensor, got "
            + (
                _describe(student_hidden)
                if isinstance(student_hidden, torch.Tensor)
                else repr(type(student_hidden))
            )
        )
    if teacher_hidden is not None and (
        not isinstance(teacher_hidden, torch.Tensor) or teacher_hidden.shape != student_hidden.shape
    ):
        raise ValueError(
            f"teacher_hidden must have the shape of student_hidden {tuple(student_hidden.shape)}, got "
            + (
                _describe(teacher_hidden)
                if isinstance(teacher_hidden, torch.Tensor)
                else repr(type(teacher_hidden))
            )
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            "lm_head_weight must be a [V, D] tensor, got "
            + (_describe(weight) if isinstance(weight, torch.Tensor) else repr(type(weight)))
        )
    hidden_dim = student_hidden.shape[-1]
    if weight.shape[1] != hidden_dim:
        raise ValueError(
            f"lm_head_weight {tuple(weight.shape)} is [V, D] with D={weight.shape[1]}, but the hidden "
            f"states {tuple(student_hidden.shape)} have D={hidden_dim}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(
            f"lm_head_bias must be a [V]=[{weight.shape[0]}] tensor, got "
            + (_describe(bias) if isinstance(bias, torch.Tensor) else repr(type(bias)))
        )
    named = [("student_hidden", student_hidden), ("lm_head_weight", weight)]
    if teacher_hidden is not None:
        named.insert(1, ("teacher_hidden", teacher_hidden))
    if bias is not None:
        named.append(("lm_head_bias", bias))
    for name, t in named:
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {_describe(t)}")
    for name, t in named[1:]:
        if t.dtype != student_hidden.dtype:
            raise ValueError(
                f"{name} dtype {t.dtype} differs from student_hidden dtype {student_hidden.dtype}; "
                "cast them to one dtype"
            )
        if t.device != student_hidden.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {student_hidden.device}")
    if check_finite:
        # The LM head too: a NaN in W turns every logit of its row into NaN, and the loss with it.
        for name, t in named:
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{name} ({_describe(t)}) contains {bad} NaN/inf values")


def _check_token_tensor(name, t, lead_shape, device, *, kind):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {tuple(lead_shape)}, got {type(t)!r}")
    if tuple(t.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, expected {tuple(lead_shape)} (one entry per token)"
        )
    if kind == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got dtype {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if kind == "int" and (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex()):
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}")
    if kind == "float" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN/inf values")
    return t


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
    loss_mask = _check_token_tensor("loss_mask", loss_mask, shape, device, kind="bool")
    token_weights = _check_token_tensor("token_weights", token_weights, shape, device, kind="float")
    sequence_ids = _check_token_tensor("sequence_ids", sequence_ids, shape, device, kind="int")
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
            + (_describe(per_token) if isinstance(per_token, torch.Tensor) else repr(type(per_token)))
        )
    if not per_token.dtype.is_floating_point:
        raise ValueError(f"per_token must be a floating-point tensor, got {_describe(per_token)}")
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
    _check_hidden_and_head(student_hidden, teacher_hidden, lm_head_weight, lm_head_bias)
    impl = _resolve_impl(impl, student_hidden.device, student_hidden.dtype)
    if process_group is not None and impl not in ("auto", "torch"):
        raise ValueError(
            f"process_group (vocabulary-parallel loss) runs with impl='torch', got impl={impl!r}"
        )
    lead_shape = student_hidden.shape[:-1]
    tokens = _token_layout(
        lead_shape, student_hidden.device, loss_mask, token_weights, sequence_ids, reduction
    )
    hidden_dim = student_hidden.shape[-1]
    h_s, h_t = student_hidden.reshape(-1, hidden_dim), teacher_hidden.reshape(-1, hidden_dim)  # [N, D]
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

    grad_weights = None
    head_trains = lm_head_weight.requires_grad or (lm_head_bias is not None and lm_head_bias.requires_grad)
    if impl == "triton" and reduction != "none" and head_trains and torch.is_grad_enabled():
        grad_weights = _reduction_weights(tokens, reduction, out_dtype)
    per_token = _token_losses(
        h_s, h_t, lm_head_weight, lm_head_bias, float(alpha), float(temperature), impl, memory_budget_mb,
        grad_weights,
    )  # fmt: skip
    return _reduce(per_token.to(out_dtype), tokens, reduction)


def _reduction_weights(tokens: _Tokens, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss)/d(per-token loss) of the counted tokens ([M]): the incoming gradient the
    kernels can expect up to the reduced loss's own scalar gradient, so that the 3-GEMM path sums
    dW in its forward. ``_reduce`` is linear: its gradient anywhere is these coefficients."""
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
    _check_hidden_and_head(hidden, None, weight, bias)
    targets = _check_token_tensor("targets", targets, hidden.shape[:-1], hidden.device, kind="int")
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
