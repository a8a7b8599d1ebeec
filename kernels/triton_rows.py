"""Row kernel of the 3-GEMM path: per-token statistics, loss and g from precomputed logits.

The 3-GEMM path (``gemm_sdft``) computes the raw logits of a chunk of n tokens with one GEMM,
[h_s ; h_t'] @ W^T, into an fp32 buffer [2n, V]: row r < n holds W h_s[r] and row n + r holds
W h_t'[r], where h_t' = h_t - h_s (TEACHER_IS_DIFF, fp32 inputs: the GEMM gives the logit
difference z_t - z_s directly) or h_t (bf16/fp16 inputs; ``gemm_sdft`` says why). This kernel,
one program per token, reads its two rows and

1. sweeps them once for the online statistics, as the fused forward does per tile:
       m_s, l_s = max of z_s, sum exp(z_s - m_s)            (likewise m_t, l_t)
       A = sum exp(z_s - m_s) (z_s - z_t)                  (reverse KL)
       B = sum exp(z_t - m_t) (z_t - z_s)                  (forward KL)
       C = sum exp(z_s - m_s) (exp(z_t - z_s) - 1)         (KL modes)
   with z = (logit + b) / tau, and lse_t - lse_s = log(1 + C / l_s) where that is small: near
   KL = 0 the gap is formed from the differences z_t - z_s, not from two ~log V sized lse;
       forward KL(T||S) = B / l_t - (lse_t - lse_s),  reverse KL(S||T) = A / l_s + (lse_t - lse_s);
2. (JSD only) sweeps again for KL(T||M) and KL(S||M), which need both lse;
3. sweeps a last time for g = w_n dLoss_n/dz_s (the formulas of ``triton_tiles.grad_student_logits``,
   with z_s - z_t taken from the difference) and writes it over the logits it came from:
   fp32 inputs: g over the student row (element for element); bf16/fp16 inputs: g_hi over the
   first half of the student row's bytes and, with SPLIT_G, g_lo = g - g_hi over the first half
   of the teacher row's bytes. The buffer viewed in the input dtype as [2n, 2V] then holds the
   [g_hi ; g_lo] GEMM operand in its first V columns (row stride 2V): no second buffer.

Overwriting the rows being read is safe: a program owns its two rows, sweeps them in ascending
column blocks, and block [v0, v0 + BLOCK_V) writes the bytes of fp32 columns
[v0 / 2, (v0 + BLOCK_V) / 2), all read already (in this block or earlier ones); a CTA barrier
between the block's loads and its stores orders the threads of the program.

fp16 (PRESCALE): g runs down to ~1e-10 where the student is close to the teacher, below fp16's
normal range (6e-5). The launcher first runs the kernel with PHASE_GRAD_MAX for max |g| per
row, picks k_n with max |g| 2^k_n <= 2^14, and the write pass stores g 2^k_n (a power of two:
exact); the dh rows are scaled back by 2^-k_n after the GEMM.

Cost: 2 reads of the [2n, V] fp32 rows (3 for the JSD, + 1 for fp16) and one write of g;
memory-bound. Cost model: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sdft_kernels import triton_configs
from sdft_kernels.triton_configs import row_launch_meta, with_config
from sdft_kernels.triton_tiles import MASKED_LOGIT, jsd_log_mixture, jsd_logs, kernel_mode

# What a launch computes (constexpr PHASE): the loss only (no gradient wanted), the loss and
# max |g| per row (fp16's first pass), or the loss and g written into the buffer.
PHASE_LOSS = 0
PHASE_GRAD_MAX = 1
PHASE_WRITE_G = 2
# fp16 g is stored times 2^k with max |g| 2^k <= 2^PRESCALE_TARGET_EXP (fp16 max 65504 ~ 2^16).
PRESCALE_TARGET_EXP = 14
PRESCALE_MAX_EXP = 120  # 2^k stays finite in fp32 whatever max |g| is (0 gives k = 0)


@triton.jit
def _row_logits(
    student_row,  # pointer to the fp32 row W h_s of this token
    teacher_row,  # pointer to the fp32 row W h_t' of this token
    bias_ptr,  # [V] bias (HAS_BIAS)
    cols,  # [BLOCK_V] int64 vocabulary indices
    col_mask,  # [BLOCK_V] cols < V
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    TEACHER_IS_DIFF: tl.constexpr,
):
    # z_s, z_t = (logit + b) / tau and diff = z_t - z_s for one block of columns. Columns past V:
    # z = MASKED_LOGIT (exp(z - anything real) == 0) and diff = 0 (they add nothing anywhere).
    raw_s = tl.load(student_row + cols, mask=col_mask, other=0.0)
    raw_t = tl.load(teacher_row + cols, mask=col_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        raw_s += bias
    z_s = raw_s * inv_temperature
    if TEACHER_IS_DIFF:
        diff = raw_t * inv_temperature  # W (h_t - h_s) / tau: the bias cancels
        z_t = z_s + diff
    else:
        if HAS_BIAS:
            raw_t += bias
        z_t = raw_t * inv_temperature
        diff = z_t - z_s
    z_s = tl.where(col_mask, z_s, MASKED_LOGIT)
    z_t = tl.where(col_mask, z_t, MASKED_LOGIT)
    diff = tl.where(col_mask, diff, 0.0)
    return z_s, z_t, diff


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when |x| << 1 (Goldberg): log(u) x / (u - 1) with u = 1 + x.
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * x / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _sdft_rows_kernel(
    logits_ptr,  # [2n, V] fp32: row r < n raw student logits W h_s, row n + r W h_t' (see above)
    grad_ptr,  # the same buffer: as fp32 [2n, V] (not G_LOWP), or in the input dtype [2n, 2V]
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    row_weight_ptr,  # [n] fp32 w_n multiplying g (HAS_ROW_WEIGHT) or any pointer
    grad_exp_ptr,  # [n] int32 k_n: the stored g is g 2^k_n (PRESCALE and PHASE_WRITE_G)
    loss_ptr,  # [n] fp32 out: per-token divergence
    grad_max_ptr,  # [n] fp32 out: max_v |w_n g| (PHASE_GRAD_MAX)
    n_rows,
    V,
    inv_temperature,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    MODE: tl.constexpr,
    PHASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TEACHER_IS_DIFF: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr,
    G_LOWP: tl.constexpr,
    SPLIT_G: tl.constexpr,
    PRESCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = logits_ptr + row * V
    teacher_row = logits_ptr + (n_rows + row) * V

    # 1) Online statistics. Every block holds >= 1 real column, so the new max is finite and the
    #    first rescale exp(-inf - m') is 0.
    max_s = tl.full((), float("-inf"), tl.float32)
    max_t = tl.full((), float("-inf"), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)  # B (forward KL) or A (reverse KL)
    shift = tl.zeros((), tl.float32)  # C (KL modes)
    for v_start in range(0, V, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z_s, z_t, diff = _row_logits(
            student_row, teacher_row, bias_ptr, cols, col_mask, inv_temperature, HAS_BIAS, TEACHER_IS_DIFF
        )
        new_max_s = tl.maximum(max_s, tl.max(z_s, axis=0))
        new_max_t = tl.maximum(max_t, tl.max(z_t, axis=0))
        rescale_s = tl.exp(max_s - new_max_s)
        rescale_t = tl.exp(max_t - new_max_t)
        exp_s = tl.exp(z_s - new_max_s)  # [BLOCK_V], 0 on masked columns
        exp_t = tl.exp(z_t - new_max_t)
        sum_s = sum_s * rescale_s + tl.sum(exp_s, axis=0)
        sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=0)
        if MODE == 0:  # B = sum exp(z_t - m_t)(z_t - z_s)
            cross = cross * rescale_t + tl.sum(exp_t * diff, axis=0)
        elif MODE == 1:  # A = sum exp(z_s - m_s)(z_s - z_t)
            cross = cross * rescale_s - tl.sum(exp_s * diff, axis=0)
        if MODE != 2:  # C = sum exp(z_s - m_s)(exp(z_t - z_s) - 1); may overflow: see the gap below
            shift = shift * rescale_s + tl.sum(exp_s * (tl.exp(diff) - 1.0), axis=0)
        max_s = new_max_s
        max_t = new_max_t
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)
    lse_s = max_s + log_sum_s
    lse_t = max_t + log_sum_t

    if MODE == 2:
        # 2) JSD: KL(T||M) = sum p_t (log p_t - log m), KL(S||M) = sum p_s (log p_s - log m).
        #    Masked columns: log p = MASKED_LOGIT - lse, finite, so log m is finite and p = 0.
        kl_t_m = tl.zeros((), tl.float32)
        kl_s_m = tl.zeros((), tl.float32)
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z_s, z_t, diff = _row_logits(
                student_row, teacher_row, bias_ptr, cols, col_mask, inv_temperature, HAS_BIAS, TEACHER_IS_DIFF
            )
            log_p_s = z_s - lse_s
            log_p_t = z_t - lse_t
            log_m = jsd_log_mixture(log_p_s, log_p_t, log_one_minus_alpha, log_alpha)
            kl_t_m += tl.sum(tl.exp(log_p_t) * (log_p_t - log_m), axis=0)
            kl_s_m += tl.sum(tl.exp(log_p_s) * (log_p_s - log_m), axis=0)
        grad_center = kl_s_m  # g subtracts KL(S||M)
        loss = alpha * kl_t_m + (1.0 - alpha) * kl_s_m
    else:
        # lse_t - lse_s = log sum p_s exp(z_t - z_s) = log1p(C / l_s): exact where the gap is
        # small. Where it is not (|C / l_s| >= 1/2, also when C overflowed or is NaN), C / l_s
        # may be -1 + tiny after cancelling, and the plain (m_t - m_s) + (log l_t - log l_s),
        # whose error ~ 2^-24 lse is small beside a gap >= log(3/2), is the better one.
        ratio = shift / sum_s
        usable = tl.abs(ratio) < 0.5  # False for NaN
        lse_gap = tl.where(
            usable, _log1p(tl.where(usable, ratio, 0.0)), (max_t - max_s) + (log_sum_t - log_sum_s)
        )
        if MODE == 0:
            grad_center = 0.0  # g = p_s - p_t subtracts nothing
            loss = cross / sum_t - lse_gap
        else:
            grad_center = cross / sum_s  # E_s[z_s - z_t]
            loss = grad_center + lse_gap
    tl.store(loss_ptr + row, tl.maximum(loss, 0.0))  # KL >= 0: clamp tiny negative rounding

    if PHASE != 0:
        # 3) g = w_n dLoss_n/dz_s, block by block (see triton_tiles.grad_student_logits):
        #    forward KL p_s - p_t; reverse KL p_s ((z_s - z_t) - E_s[z_s - z_t]);
        #    JSD (1 - alpha) p_s (log p_s - log m - KL(S||M)).
        row_weight = 1.0
        if HAS_ROW_WEIGHT:
            row_weight = tl.load(row_weight_ptr + row)
        scale = row_weight
        if PRESCALE and PHASE == 2:
            # 2^k built from its exponent bits: exact, unlike exp2 of an integer.
            k = tl.load(grad_exp_ptr + row)
            scale = row_weight * ((k + 127) << 23).to(tl.float32, bitcast=True)
        grad_max = tl.zeros((), tl.float32)
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z_s, z_t, diff = _row_logits(
                student_row, teacher_row, bias_ptr, cols, col_mask, inv_temperature, HAS_BIAS, TEACHER_IS_DIFF
            )
            log_p_s = z_s - lse_s
            p_s = tl.exp(log_p_s)
            if MODE == 0:
                g = p_s - tl.exp(z_t - lse_t)
            elif MODE == 1:
                g = p_s * (-diff - grad_center)
            else:
                log_m = jsd_log_mixture(log_p_s, z_t - lse_t, log_one_minus_alpha, log_alpha)
                g = (1.0 - alpha) * p_s * (log_p_s - log_m - grad_center)
            g = g * scale
            if PHASE == 1:
                grad_max = tl.maximum(grad_max, tl.max(tl.where(col_mask, tl.abs(g), 0.0), axis=0))
            else:
                # Every thread has loaded this block before any thread overwrites bytes of it.
                tl.debug_barrier()
                if G_LOWP:
                    g_hi = g.to(grad_ptr.dtype.element_ty)
                    tl.store(grad_ptr + row * (2 * V) + cols, g_hi, mask=col_mask)
                    if SPLIT_G:
                        # g - g_hi is exact in fp32; rounded, g_hi + g_lo keeps ~16 significant bits
                        g_lo = (g - g_hi.to(tl.float32)).to(grad_ptr.dtype.element_ty)
                        tl.store(grad_ptr + (n_rows + row) * (2 * V) + cols, g_lo, mask=col_mask)
                else:
                    tl.store(grad_ptr + row * V + cols, g, mask=col_mask)
        if PHASE == 1:
            tl.store(grad_max_ptr + row, grad_max)


def prescale_exponents(grad_max: torch.Tensor) -> torch.Tensor:  # [n] fp32 -> [n] int32
    """k_n with grad_max 2^k_n <= 2^PRESCALE_TARGET_EXP (k_n = 0 where grad_max is 0)."""
    exponent = torch.ceil(torch.log2(grad_max.clamp_min(2.0**-PRESCALE_MAX_EXP)))
    k = (PRESCALE_TARGET_EXP - exponent).clamp(-PRESCALE_MAX_EXP, PRESCALE_MAX_EXP)
    return torch.where(grad_max > 0, k, torch.zeros_like(k)).to(torch.int32)


def launch_rows(
    logits: torch.Tensor,  # [2n, V] fp32 contiguous: raw student rows, then raw teacher rows
    bias: torch.Tensor | None,  # [V]
    alpha: float,
    temperature: float,
    *,
    teacher_is_diff: bool,
    grad_dtype: torch.dtype | None,  # None: loss only; fp32: g in place; bf16/fp16: g_hi [/ g_lo]
    split_g: bool = False,
    row_weight: torch.Tensor | None = None,  # [n] fp32 multiplying g
    uniform_prescale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses [n] (fp32) and, for fp16 g, the exponents k [n] (g stored times 2^k).

    With ``grad_dtype`` set, g overwrites the buffer as described in the module docstring.
    ``uniform_prescale``: one k for all rows (the smallest), for a GEMM that sums over rows (dW).
    """
    assert logits.dtype == torch.float32 and logits.is_contiguous() and logits.shape[0] % 2 == 0
    n_rows, vocab = logits.shape[0] // 2, logits.shape[1]
    device = logits.device
    mode = kernel_mode(alpha)
    log_one_minus_alpha, log_alpha = jsd_logs(alpha)
    lowp = grad_dtype in (torch.bfloat16, torch.float16)
    prescale = grad_dtype == torch.float16
    grad_view = logits.view(grad_dtype) if lowp else logits
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad_exp = torch.zeros(n_rows, dtype=torch.int32, device=device) if prescale else None
    scalars = (n_rows, vocab, 1.0 / temperature, alpha, log_one_minus_alpha, log_alpha)
    flags = dict(
        MODE=mode,
        HAS_BIAS=bias is not None,
        TEACHER_IS_DIFF=teacher_is_diff,
        HAS_ROW_WEIGHT=row_weight is not None,
        G_LOWP=lowp,
        SPLIT_G=split_g and lowp,
        PRESCALE=prescale,
    )
    bias_arg = bias if bias is not None else logits
    weight_arg = row_weight if row_weight is not None else logits

    def run(config):
        meta = row_launch_meta(config, device)
        common = (logits, grad_view, bias_arg, weight_arg)
        if prescale:
            grad_max = torch.empty(n_rows, dtype=torch.float32, device=device)
            _sdft_rows_kernel[(n_rows,)](
                *common, grad_exp, loss, grad_max, *scalars, PHASE=PHASE_GRAD_MAX, **flags, **meta
            )
            if uniform_prescale:
                grad_max = grad_max.amax().expand(n_rows)
            grad_exp.copy_(prescale_exponents(grad_max))
        phase = PHASE_LOSS if grad_dtype is None else PHASE_WRITE_G
        _sdft_rows_kernel[(n_rows,)](*common, grad_exp, loss, loss, *scalars, PHASE=phase, **flags, **meta)
        return loss, grad_exp

    return with_config(
        ("rows", grad_dtype, mode, bias is not None),
        device,
        run,
        configs=triton_configs.ROW_CONFIGS,
        interpreter_config=triton_configs.INTERPRETER_ROW_CONFIG,
    )
