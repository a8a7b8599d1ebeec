"""The 3-GEMM chunked self-distillation loss: logits by GEMM, a row pass, the gradient in the forward.

Per chunk of n <= c tokens (c = ``rows``, from the memory budget: ``chunk_rows_for_budget``):

1. one GEMM [h_s ; h_t'] @ W^T into an fp32 buffer [2n, V] (tensor cores with an fp32 result
   on CUDA; operands in fp32 on CPU): the raw logits of the student and the teacher. For fp32
   inputs h_t' = h_t - h_s: by linearity the GEMM gives W (h_t - h_s), the logit difference,
   directly, and the difference of two fp32 vectors close to each other is exact (Sterbenz), so
   nothing cancels when the student is close to the teacher. For bf16/fp16 inputs h_t - h_s
   would be rounded to the input dtype: exact only where the two are within a factor 2 of each
   other, elsewhere (independent student and teacher) a 2^-9 relative error of the teacher's
   logits — as bad as rounding the logits to bf16. They stack [h_s ; h_t] instead, and the row
   pass subtracts in fp32, where the GEMM's fp32 accumulation (~1e-6 absolute at logits ~20)
   costs far less than bf16 rounding would.
2. one row pass (``row_step``: ``triton_rows.launch_rows``) gives the per-token loss and
   writes g = w_n dLoss_n/dz_s over the buffer in fp32, or in the input dtype as g_hi and, for
   the modes of ``triton_configs.SPLIT_G_MODES``, g_lo (fp16: times 2^k_n per row);
3. dh[chunk] = g @ W / tau with an fp32 result (bf16/fp16 with the split: one GEMM of the
   stacked [g_hi ; g_lo], the two halves summed in fp32), and when the LM head trains
   dW += g^T @ h_s / tau and dbias += sum over rows of g / tau.

Loss + dh costs 3 GEMM-equivalents (1 GEMM-eq = 2 N D V FLOP; the fused recompute kernels
need 5), 4 with dW. The gradient is computed in the forward (the loss is terminal in every
trainer), so the backward only applies the incoming gradient:

* Without ``grad_weights``: row n of dh is d(loss_n)/dh_n, kept in fp32, and the backward
  scales it by grad_loss[n] — exact for any incoming gradient (per-token losses reduced later
  with weights: the trainer's reduction="none"). dW and dbias sum over tokens, so the incoming
  gradient must enter inside the sum: the backward sweeps the chunks again with it (2 more
  GEMM-eq for the logits, 1 for dW).
* With ``grad_weights`` w (the grad_loss the caller expects up to one scalar: the coefficients
  of its reduction, see ``sdft_fast.loss``), the forward weights g by w_n and forms the whole
  gradient: dh rounded once to the input dtype, dW and dbias summed. The backward checks
  grad_loss = s w and scales by s (nothing to do for s = 1, exact for any power of two); any
  other incoming gradient gets the second sweep, so every result stays exact.

Memory: the [2c, V] fp32 buffer (8 c V bytes) and dh (4 N D bytes in fp32, or N D in the input
dtype with grad_weights; it is the result itself then), sized together by
``chunk_rows_for_budget``; full fine-tuning adds the fp32 [V, D] dW and an fp32 staging block of
at most a quarter of the buffer. No [N, V] tensor. Cost model and measurements: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from sdft_kernels.torch_tiles import TILE_BUDGET_MB, compute_dtype, scale_rows, spans

# On CUDA the 3-GEMM path runs when the budget allows chunks of at least this many rows (or all
# N tokens in one chunk): thinner chunks make skinny GEMMs and a row pass with fewer programs
# than SMs, and the fused kernels (``triton_forward`` / ``triton_backward``) take over.
MIN_CHUNK_ROWS = 128
# Chunk heights of MIN_CHUNK_ROWS and more are rounded down to a multiple of this (whole MMA tiles).
CHUNK_ROW_MULTIPLE = 16
LOW_PRECISION = (torch.bfloat16, torch.float16)
# bf16 x bf16 -> fp32 GEMMs in aten (torch >= 2.8, CUDA): without them the path is unavailable
# for bf16/fp16 on CUDA (its logits must not be rounded to bf16).
HAS_FP32_OUT_GEMM = hasattr(torch.ops.aten.mm, "dtype_out")

# (logits [2n, V] fp32, bias, alpha, temperature, *, teacher_is_diff, grad_dtype, split_g,
#  row_weight, uniform_prescale) -> (loss [n] fp32, exponents k [n] int32 or None)
RowStep = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def default_memory_budget_mb(num_tokens: int, hidden: int, vocab: int) -> float:
    """The budget of ``memory_budget_mb=None``: a quarter of the inputs' bytes in bf16 (h_s, h_t
    and W), at least TILE_BUDGET_MB: the working memory stays O(N D + V D), a fixed fraction of
    what the inputs take already."""
    return max(TILE_BUDGET_MB, (2 * num_tokens + vocab) * hidden * 2 / 4 / 2**20)


def chunk_rows_for_budget(
    num_tokens: int, hidden: int, vocab: int, memory_budget_mb: float, dh_bytes: int = 4
) -> int:
    """Rows per chunk whose fp32 [2c, V] logits and the [N, D] dh (``dh_bytes`` per element: 4
    in fp32, the input's size when it is stored in the input dtype) fit ``memory_budget_mb``.

    Not capped at ``num_tokens``: the caller compares it with MIN_CHUNK_ROWS first. 0 when not
    even one row fits.
    """
    free = memory_budget_mb * 2**20 - dh_bytes * num_tokens * hidden
    rows = max(int(free // (8 * vocab)), 0)
    return rows - rows % CHUNK_ROW_MULTIPLE if rows >= MIN_CHUNK_ROWS else rows


def select_chunk_rows(
    num_tokens: int,
    hidden: int,
    vocab: int,
    memory_budget_mb: float | None,
    device: torch.device,
    dtype: torch.dtype,
    weighted: bool = False,
) -> int:
    """Rows per chunk of the 3-GEMM path for this call, or 0 where the fused kernels should run:
    chunks thinner than MIN_CHUNK_ROWS (unless they hold all N tokens), or bf16/fp16 on CUDA
    without fp32-result GEMMs. ``weighted``: grad_weights given (dh stored in ``dtype``)."""
    if device.type == "cuda" and dtype in LOW_PRECISION and not HAS_FP32_OUT_GEMM:
        return 0
    if memory_budget_mb is None:
        memory_budget_mb = default_memory_budget_mb(num_tokens, hidden, vocab)
    dh_bytes = torch.empty((), dtype=dtype).element_size() if weighted else 4
    rows = chunk_rows_for_budget(num_tokens, hidden, vocab, memory_budget_mb, dh_bytes)
    if rows < min(MIN_CHUNK_ROWS, num_tokens):
        return 0
    return min(rows, num_tokens)


def gemm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result for bf16/fp16 operands (fp32/fp64 operands: their own dtype).

    CUDA: tensor cores accumulating in fp32, result never rounded to bf16. CPU: the operands
    upcast to fp32 (exact), the same products and an fp32 sum (tests; memory of the upcast).
    """
    if a.dtype not in LOW_PRECISION:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _accumulate_gemm(acc, a, b, scale, staging_rows):
    """acc += scale * (a @ b) in acc's dtype; bf16/fp16 products through an fp32 staging block."""
    if a.dtype not in LOW_PRECISION:
        acc.addmm_(a, b, alpha=scale)
        return
    staging = acc.new_empty(min(staging_rows, acc.shape[0]), acc.shape[1])
    for r0, r1 in spans(acc.shape[0], staging.shape[0]):
        block = gemm_fp32(a[r0:r1], b, out=staging[: r1 - r0])
        acc[r0:r1].add_(block, alpha=scale)


def _power_of_two(exponents: torch.Tensor) -> torch.Tensor:  # int32 [n] -> fp32 [n], exact
    return ((exponents + 127) << 23).view(torch.float32)


def chunked_sweep(
    student: torch.Tensor,  # [N, D]
    teacher: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    alpha: float,
    temperature: float,
    rows: int,
    row_step: RowStep,
    split_g: bool,
    *,
    want_dh: bool,
    grad_weights: torch.Tensor | None = None,  # [N] w_n multiplying g (and so dh, dW, dbias)
    want_dw: bool = False,
    want_db: bool = False,
    dh_dtype: torch.dtype | None = None,
):
    """(loss [N] fp32, dh [N, D] | None, dW [V, D] | None, dbias [V] | None), all chunk by chunk.

    dh, dW and dbias are those of sum_n w_n loss_n (w = 1 without ``grad_weights``); dW and dbias
    in the compute dtype (fp32; fp64 for fp64 inputs), dh in ``dh_dtype`` (default the compute
    dtype; each row is formed in fp32 and rounded once). ``split_g``: bf16/fp16 g as g_hi + g_lo.
    """
    num_tokens, hidden = student.shape
    vocab = weight.shape[0]
    dtype = compute_dtype(student.dtype)
    low_precision = student.dtype in LOW_PRECISION
    want_g = want_dh or want_dw or want_db
    grad_dtype = (student.dtype if low_precision else dtype) if want_g else None
    split_g = split_g and low_precision
    inv_tau = 1.0 / temperature
    device = student.device

    buffer = torch.empty((2 * rows, vocab), dtype=dtype, device=device)  # [2c, V] logits, then g
    loss = torch.empty(num_tokens, dtype=torch.float32 if dtype == torch.float32 else dtype, device=device)
    dh = torch.empty((num_tokens, hidden), dtype=dh_dtype or dtype, device=device) if want_dh else None
    dw = torch.zeros((vocab, hidden), dtype=dtype, device=device) if want_dw else None
    db = torch.zeros(vocab, dtype=dtype, device=device) if want_db else None
    staging_rows = max(1, buffer.numel() // (4 * hidden))  # a quarter of the buffer's elements
    weight_t = weight.t()  # [D, V]
    for r0, r1 in spans(num_tokens, rows):
        n = r1 - r0
        h_s, h_t = student[r0:r1], teacher[r0:r1]
        if low_precision:
            pair = torch.cat([h_s, h_t])  # [2n, D]: the row pass subtracts in fp32
        else:
            h_s = h_s.to(dtype)
            pair = torch.cat([h_s, h_t.to(dtype) - h_s])  # [2n, D]: the difference, exact
        logits = buffer[: 2 * n]  # [2n, V]
        gemm_fp32(pair, weight_t, out=logits)
        row_weight = None if grad_weights is None else grad_weights[r0:r1].to(torch.float32).contiguous()
        chunk_loss, exponents = row_step(
            logits, bias, alpha, temperature, teacher_is_diff=not low_precision, grad_dtype=grad_dtype,
            split_g=split_g, row_weight=row_weight, uniform_prescale=want_dw or want_db,
        )  # fmt: skip
        loss[r0:r1] = chunk_loss
        if not want_g:
            continue
        # g as the GEMM operand: fp32 [n, V] over the student rows, or in the input dtype the
        # first V columns of the buffer seen as [2n, 2V] ([g_hi ; g_lo] with the split).
        if low_precision:
            g = logits.view(grad_dtype)[: 2 * n if split_g else n, :vocab]
        else:
            g = logits[:n]
        row_scale = torch.full((n,), inv_tau, dtype=dtype, device=device)
        if exponents is not None:  # fp16: g was stored times 2^k
            row_scale = row_scale * _power_of_two(-exponents).to(dtype)
        if want_dh:
            part = gemm_fp32(g, weight)  # [n or 2n, D]
            if split_g:
                part = part[:n] + part[n:]
            dh[r0:r1] = part * row_scale[:, None]
        if want_dw or want_db:
            # uniform_prescale gave every row of the chunk the same k: one scale for the sum
            scale = inv_tau if exponents is None else row_scale[0].item()
            if want_dw:
                h_side = torch.cat([h_s, h_s]) if split_g else h_s.to(g.dtype)  # [n or 2n, D]
                _accumulate_gemm(dw, g.t(), h_side, scale, staging_rows)
            if want_db:
                ones = torch.ones((g.shape[0], 1), dtype=g.dtype, device=device)
                db.add_(gemm_fp32(g.t(), ones)[:, 0].to(dtype), alpha=scale)
    return loss, dh, dw, db


def proportional_factor(grad_loss: torch.Tensor, grad_weights: torch.Tensor) -> float | None:
    """s with grad_loss = s * grad_weights (to fp32 rounding), or None if there is none."""
    grad = grad_loss.double()
    weights = grad_weights.double()
    norm = (weights * weights).sum()
    if norm.item() == 0.0:
        return 0.0 if bool((grad == 0).all()) else None
    factor = (grad * weights).sum() / norm
    residual = (grad - factor * weights).abs().max()
    return factor.item() if residual.item() <= 1e-6 * grad.abs().max().item() else None


class GemmSelfDistillFunction(torch.autograd.Function):
    """Per-token divergences [N] (fp32); the gradient formed in the forward (see module doc)."""

    @staticmethod
    def forward(
        ctx, student, teacher, weight, bias, alpha, temperature, rows, split_g, grad_weights, row_step
    ):
        # student, teacher: [N, D]; weight: [V, D]; bias: [V] or None; grad_weights: [N] or None
        need_dh, _, need_dw, need_db = ctx.needs_input_grad[:4]
        need_db = need_db and bias is not None
        # With grad_weights the forward forms the gradient of sum_n w_n loss_n: dW and dbias, and
        # dh already in the input dtype (rounded once; the backward only scales it by s, exactly
        # when s is a power of two such as 1). Without, dh of each token alone, kept in fp32 for
        # the backward's per-row scale, and the head's gradients left to the backward.
        weighted = grad_weights is not None
        sweep = (student, teacher, weight, bias, alpha, temperature, rows, row_step, split_g)
        loss, dh, dw, db = chunked_sweep(
            *sweep,
            want_dh=need_dh,
            grad_weights=grad_weights,
            want_dw=need_dw and weighted,
            want_db=need_db and weighted,
            dh_dtype=student.dtype if weighted else None,
        )
        ctx.sweep = sweep[4:]
        ctx.needs = (need_dh, need_dw, need_db)
        ctx.save_for_backward(student, teacher, weight, bias, dh, dw, db, grad_weights)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradient was formed without a graph
    def backward(ctx, grad_loss):
        # grad_loss: [N] dLoss/d(per-token divergence)
        student, teacher, weight, bias, dh, dw, db, grad_weights = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs
        factor = None if grad_weights is None else proportional_factor(grad_loss, grad_weights)
        if factor is not None:  # the forward summed the gradient of (grad_loss / s): scale by s
            if factor != 1.0:
                dh, dw, db = (None if t is None else t * factor for t in (dh, dw, db))
        elif grad_weights is not None or need_dw or need_db:
            # Not the gradient the forward expected, or the head's gradients were left to now: a
            # second sweep with w = grad_loss (dh from it too when the forward's was weighted).
            redo_dh = need_dh and grad_weights is not None
            _, dh_again, dw, db = chunked_sweep(
                student, teacher, weight, bias, *ctx.sweep, want_dh=redo_dh,
                grad_weights=grad_loss, want_dw=need_dw, want_db=need_db,
            )  # fmt: skip
            dh = dh_again if redo_dh else (scale_rows(dh, grad_loss, dh.dtype) if need_dh else None)
        elif need_dh:
            dh = scale_rows(dh, grad_loss, dh.dtype)
        return (
            None if dh is None else dh.to(student.dtype),
            None,
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype),
            *([None] * 6),
        )


def gemm_token_losses(
    student: torch.Tensor,  # [N, D] contiguous
    teacher: torch.Tensor,  # [N, D] contiguous, detached
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    *,
    alpha: float,
    temperature: float,
    rows: int,
    row_step: RowStep,
    split_g: bool,
    grad_weights: torch.Tensor | None = None,
) -> torch.Tensor:  # [N] fp32
    """Per-token divergences by the 3-GEMM path, chunks of ``rows`` tokens; see the module doc.

    Inputs are checked by the caller (``triton_sdft.triton_token_losses``). With grad disabled
    (or nothing requiring grad) only the losses are computed and nothing is saved.
    """
    needs_grad = torch.is_grad_enabled() and (
        student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        with torch.no_grad():
            sweep = (student, teacher, weight, bias, alpha, temperature, rows, row_step, split_g)
            return chunked_sweep(*sweep, want_dh=False)[0]
    return GemmSelfDistillFunction.apply(
        student, teacher, weight, bias, alpha, temperature, rows, split_g, grad_weights, row_step
    )
