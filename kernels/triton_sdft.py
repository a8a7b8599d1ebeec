"""Triton self-distillation loss: the public function, and the fused kernels' autograd.Function.

Same semantics as ``sdft_kernels.reference.reference_token_losses`` (read it for the formulas),
by one of two designs, picked per call from the memory budget:

* the 3-GEMM path (``gemm_sdft`` with the ``triton_rows`` row kernel): per chunk of c tokens, an
  fp32 [2c, V] logit buffer from one GEMM, a row pass for the loss and g, and g @ W for dh in
  the forward: 3 GEMM-equivalents for loss + dh. It runs whenever ``memory_budget_mb`` holds
  chunks of >= ``gemm_sdft.MIN_CHUNK_ROWS`` rows (or all N tokens); the default budget is a
  quarter of the inputs' bytes in bf16 (``gemm_sdft.default_memory_budget_mb``).
* the fused kernels, for smaller budgets: every kernel computes [BLOCK_N, BLOCK_V] logit tiles of
  the student and the teacher in fp32 ``tl.dot`` accumulators (looping over D) and folds them
  into per-token statistics or gradients straight away, never holding more than O(N) floats of
  statistics: the forward (``triton_forward``) gives the per-token loss and the three floats
  per token the backward needs (lse_s, lse_t, grad_center; see ``sdft_kernels``), the backward
  (``triton_backward``) recomputes both logit tiles from those floats and forms dh, and dW /
  dbias when the LM head requires grad. 5 GEMM-equivalents for loss + dh in the KL modes (the JSD
  7, or 8 with the bf16/fp16 split of g); extra memory O(S * N) floats of statistics, 3 floats
  per token saved for backward, the fp32 [N, D] dh (S partial ones with vocabulary splits) and
  one fp32 [V, D] buffer for dW.

Pointers are formed from int64 row/column indices (N*V and V*D pass 2^31). Cost model and
measurements: docs/kernels.md.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests): the interpreter's
``tl.dot`` cannot multiply bfloat16 (it stores them as uint16), so on CPU the dot operands are
upcast to fp32 first — exact, since bf16 x bf16 products are exact in fp32 as on tensor cores;
the 3-GEMM path's GEMMs likewise run in fp32 on CPU.
"""

from __future__ import annotations

import math
import os

import torch
from sdft_kernels.gemm_sdft import gemm_token_losses, select_chunk_rows
from sdft_kernels.triton_backward import launch_backward
from sdft_kernels.triton_configs import SPLIT_G_MODES
from sdft_kernels.triton_forward import launch_forward
from sdft_kernels.triton_rows import launch_rows
from sdft_kernels.triton_tiles import kernel_mode

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonSelfDistillFunction(torch.autograd.Function):
    """Per-token divergences [N] by the fused kernels, with a recompute backward (three floats
    saved per token)."""

    @staticmethod
    def forward(ctx, student, teacher, weight, bias, alpha: float, temperature: float, num_splits):
        # student, teacher: [N, D]; weight: [V, D]; bias: [V] or None
        loss, lse_s, lse_t, grad_center = launch_forward(
            student, teacher, weight, bias, alpha, temperature, num_splits
        )
        ctx.save_for_backward(student, teacher, weight, bias, lse_s, lse_t, grad_center)
        ctx.alpha = alpha
        ctx.temperature = temperature
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels build no graph: no double backward
    def backward(ctx, grad_loss):
        # grad_loss: [N] dLoss/d(per-token divergence)
        student, teacher, weight, bias, lse_s, lse_t, grad_center = ctx.saved_tensors
        need_hidden, _, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_hidden, grad_weight, grad_bias = launch_backward(
            student, teacher, weight, bias, lse_s, lse_t, grad_center, grad_loss, ctx.alpha,
            ctx.temperature, need_hidden, need_weight, need_bias and bias is not None,
        )  # fmt: skip
        # The teacher is a constant: no gradient, even when the tensor passed in requires one.
        return grad_hidden, None, grad_weight, grad_bias, None, None, None


def _check_inputs(
    student_hidden, teacher_hidden, weight, bias, alpha, temperature, grad_weights, chunk_rows
) -> None:
    def fail(message):
        raise ValueError(f"triton_token_losses: {message}")

    if student_hidden.dim() != 2:
        fail(f"student_hidden must be [N, D], got shape {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        fail(
            f"teacher_hidden shape {tuple(teacher_hidden.shape)} != student_hidden shape "
            f"{tuple(student_hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1]:
        fail(f"weight must be [V, D={student_hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        fail(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
    if student_hidden.dtype not in SUPPORTED_DTYPES:
        fail(f"student_hidden dtype {student_hidden.dtype} is not one of {SUPPORTED_DTYPES}")
    for name, tensor in (("teacher_hidden", teacher_hidden), ("weight", weight)):
        if tensor.dtype != student_hidden.dtype:
            fail(f"{name} dtype {tensor.dtype} != student_hidden dtype {student_hidden.dtype}")
    if bias is not None and not bias.dtype.is_floating_point:
        fail(f"bias dtype {bias.dtype} is not a floating point type")
    for name, tensor in (("teacher_hidden", teacher_hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != student_hidden.device:
            fail(f"{name} is on {tensor.device}, student_hidden on {student_hidden.device}")
    if not 0.0 <= alpha <= 1.0:
        fail(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0 or not math.isfinite(temperature):
        fail(f"temperature must be a finite number > 0, got {temperature}")
    if grad_weights is not None and tuple(grad_weights.shape) != (student_hidden.shape[0],):
        fail(f"grad_weights must be [N={student_hidden.shape[0]}], got shape {tuple(grad_weights.shape)}")
    if grad_weights is not None and (
        not grad_weights.dtype.is_floating_point or grad_weights.device != student_hidden.device
    ):
        fail(
            f"grad_weights must be a floating-point tensor on {student_hidden.device}, got dtype "
            f"{grad_weights.dtype} on {grad_weights.device}"
        )
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 0):
        fail(f"chunk_rows must be an int >= 0 (0: the fused kernels), got {chunk_rows!r}")
    device = student_hidden.device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        fail("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported); use CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        fail(f"unsupported device {device}")


def triton_token_losses(
    student_hidden: torch.Tensor,  # [N, D]
    teacher_hidden: torch.Tensor,  # [N, D] (a constant: never receives a gradient)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None = None,  # [V]
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    memory_budget_mb: float | None = None,
    grad_weights: torch.Tensor | None = None,  # [N]
    chunk_rows: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [N] float32
    """Per-token divergence between the student's and the teacher's next-token distributions.

    ``alpha`` 0: forward KL(T||S); 1: reverse KL(S||T); between: generalized JSD with mixture
    (1 - alpha) S + alpha T. Logits are (W h + b) / temperature, in fp32. Gradients flow to
    ``student_hidden`` and, when they require grad, to ``weight`` and ``bias``;
    ``teacher_hidden`` is treated as a constant even if it requires grad. With grad disabled (or
    nothing requiring grad) only the loss is computed and nothing is saved.

    ``memory_budget_mb`` (None: ``gemm_sdft.default_memory_budget_mb``) picks the design (see
    the module doc). ``grad_weights``: the incoming gradient the caller expects per token, up to
    one scalar (its reduction's coefficients); lets the 3-GEMM path form the whole gradient in
    the forward (dh in the input dtype, dW and dbias summed when the LM head trains); any other
    incoming gradient is still exact, at the cost of a second sweep. ``chunk_rows`` overrides the
    budget (0: the fused kernels; k: 3-GEMM chunks of k rows) and ``num_splits`` the fused
    forward's vocabulary splits (tests, benchmarks).
    """
    alpha, temperature = float(alpha), float(temperature)
    _check_inputs(student_hidden, teacher_hidden, weight, bias, alpha, temperature, grad_weights, chunk_rows)
    student = student_hidden.contiguous()
    teacher = teacher_hidden.detach().contiguous()
    num_tokens, hidden = student.shape
    if num_tokens == 0:
        return (student.sum(dim=1) * 0.0).float()  # [0], still attached to the graph
    if chunk_rows is None:
        chunk_rows = select_chunk_rows(
            num_tokens, hidden, weight.shape[0], memory_budget_mb, student.device, student.dtype,
            weighted=grad_weights is not None,
        )  # fmt: skip
    if chunk_rows > 0:
        return gemm_token_losses(
            student, teacher, weight.contiguous(), None if bias is None else bias.contiguous(),
            alpha=alpha, temperature=temperature, rows=min(chunk_rows, num_tokens), row_step=launch_rows,
            split_g=kernel_mode(alpha) in SPLIT_G_MODES,
            grad_weights=None if grad_weights is None else grad_weights.detach(),
        )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and (
        student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        with torch.no_grad():
            return launch_forward(student, teacher, weight, bias, alpha, temperature, num_splits)[0]
    return TritonSelfDistillFunction.apply(student, teacher, weight, bias, alpha, temperature, num_splits)
