"""The @triton.jit helpers every self-distillation kernel shares, and the constants they read.

A kernel program works on one [BLOCK_N, BLOCK_V] tile of tokens x vocabulary columns at a
time. These helpers compute that tile's student and teacher logits in fp32 (never stored),
g = dLoss/dz_s from them and the per-token statistics of the forward, the generalized JSD's
log-mixture, and the two-part GEMM operand that keeps g's precision in bf16/fp16 GEMMs.
Triton inlines them into the calling kernels: they cost no call and no memory traffic.

Names follow ``sdft_kernels`` (z_s, z_t, lse_s, lse_t, g, grad_center).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

# Divergence selected by alpha (constexpr MODE of the kernels).
MODE_FORWARD_KL = 0  # alpha == 0: KL(T || S)
MODE_REVERSE_KL = 1  # alpha == 1: KL(S || T)
MODE_JSD = 2  # 0 < alpha < 1: alpha KL(T || M) + (1 - alpha) KL(S || M), M = (1 - alpha) S + alpha T

# Logit of a vocabulary column past V: exp(MASKED_LOGIT - anything real) == 0, and the
# difference of two masked logits is exactly 0 (no inf - inf = nan on any path).
MASKED_LOGIT = tl.constexpr(-1.0e30)
# log-sum-exp loaded for a row past N (its hidden state reads as zeros, so its logits are finite):
# exp(z - PAD_LSE) == 0, so g is exactly 0 there before any mask, in every mode, where lse = 0
# could overflow exp(z - lse). Not +inf: the JSD's log-mixture of two -inf log-probabilities would
# be inf - inf = nan; with 1e30 it is finite and g is 0.
PAD_LSE = tl.constexpr(1.0e30)


def kernel_mode(alpha: float) -> int:
    """The MODE constant of ``alpha``."""
    if alpha == 0.0:
        return MODE_FORWARD_KL
    if alpha == 1.0:
        return MODE_REVERSE_KL
    return MODE_JSD


def jsd_logs(alpha: float) -> tuple[float, float]:
    """log(1 - alpha), log(alpha) of the mixture weights; 0.0 placeholders for the KL modes."""
    if 0.0 < alpha < 1.0:
        return math.log1p(-alpha), math.log(alpha)
    return 0.0, 0.0


@triton.jit
def student_teacher_logits(
    student_ptr,  # [N, D] student hidden states, row stride stride_h_n, unit column stride
    teacher_ptr,  # [N, D] teacher hidden states, same strides
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] LM head bias (read only when HAS_BIAS)
    rows,  # [BLOCK_N] int64 token indices
    row_mask,  # [BLOCK_N] rows < N
    cols,  # [BLOCK_V] int64 vocabulary indices
    col_mask,  # [BLOCK_V] cols < V
    D,
    stride_h_n,
    stride_w_v,
    stride_w_d,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # z_s = (h_s W^T + b) / tau, z_t = (h_t W^T + b) / tau for one [BLOCK_N, BLOCK_V] tile,
    # accumulated in fp32 over D (never rounded to the input dtype: rounding logits to bf16
    # costs 2-10% gradient error). Columns past V get MASKED_LOGIT; rows past N read zeros
    # (finite logits, never stored by the callers).
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h_offsets = rows[:, None] * stride_h_n + ds[None, :]  # [BLOCK_N, BLOCK_D]
        h_mask = row_mask[:, None] & d_mask[None, :]
        h_s = tl.load(student_ptr + h_offsets, mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        h_t = tl.load(teacher_ptr + h_offsets, mask=h_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        w_offsets = cols[None, :] * stride_w_v + ds[:, None] * stride_w_d  # [BLOCK_D, BLOCK_V]
        w_t = tl.load(weight_ptr + w_offsets, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            h_s = h_s.to(tl.float32)
            h_t = h_t.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc_s = tl.dot(h_s, w_t, acc_s, input_precision=DOT_PRECISION)
        acc_t = tl.dot(h_t, w_t, acc_t, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_V]
        acc_s += bias[None, :]
        acc_t += bias[None, :]
    z_s = tl.where(col_mask[None, :], acc_s * inv_temperature, MASKED_LOGIT)
    z_t = tl.where(col_mask[None, :], acc_t * inv_temperature, MASKED_LOGIT)
    return z_s, z_t


@triton.jit
def jsd_log_mixture(
    log_p_s,  # [BLOCK_N, BLOCK_V] log p_s
    log_p_t,  # [BLOCK_N, BLOCK_V] log p_t
    log_one_minus_alpha,
    log_alpha,
):
    # log m = log((1 - alpha) p_s + alpha p_t) as a two-term logsumexp
    # logsumexp(log p_s + log(1 - alpha), log p_t + log(alpha)).
    x = log_p_s + log_one_minus_alpha
    y = log_p_t + log_alpha
    hi = tl.maximum(x, y)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))


@triton.jit
def grad_student_logits(
    z_s,  # [BLOCK_N, BLOCK_V] student logits / tau
    z_t,  # [BLOCK_N, BLOCK_V] teacher logits / tau
    lse_s,  # [BLOCK_N] student log-sum-exp
    lse_t,  # [BLOCK_N] teacher log-sum-exp
    grad_center,  # [BLOCK_N] reverse KL: E_s[z_s - z_t]; JSD: KL(S || M); forward KL: unused
    alpha,
    log_one_minus_alpha,
    log_alpha,
    MODE: tl.constexpr,
):
    # g = dLoss/dz_s for one tile (before the incoming gradient and 1/tau).
    log_p_s = z_s - lse_s[:, None]
    p_s = tl.exp(log_p_s)
    if MODE == 0:
        # forward KL = sum p_t (log p_t - log p_s): d/dz_s = p_s - p_t
        g = p_s - tl.exp(z_t - lse_t[:, None])
    elif MODE == 1:
        # reverse KL = sum p_s (log p_s - log p_t); d/dz_s = p_s ((log p_s - log p_t) - KL).
        # With log p_s - log p_t = (z_s - z_t) - (lse_s - lse_t) and
        # KL = E_s[z_s - z_t] - (lse_s - lse_t), the lse terms cancel exactly:
        #   g = p_s ((z_s - z_t) - E_s[z_s - z_t])
        g = p_s * ((z_s - z_t) - grad_center[:, None])
    else:
        # JSD: d/dp_s of alpha KL(T||M) + (1 - alpha) KL(S||M) is (1 - alpha)(log p_s - log m)
        # (the 1/m terms cancel); the softmax Jacobian subtracts its p_s-weighted mean,
        # (1 - alpha) KL(S||M):  g = (1 - alpha) p_s (log p_s - log m - KL(S||M)).
        log_m = jsd_log_mixture(log_p_s, z_t - lse_t[:, None], log_one_minus_alpha, log_alpha)
        g = (1.0 - alpha) * p_s * (log_p_s - log_m - grad_center[:, None])
    return g


@triton.jit
def recompute_grad_tile(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s,  # [BLOCK_N] fp32 student log-sum-exp of the tile's rows (from the forward)
    lse_t,  # [BLOCK_N] fp32 teacher log-sum-exp
    grad_center,  # [BLOCK_N] fp32 (see grad_student_logits)
    rows,  # [BLOCK_N] int64 token indices
    row_mask,  # [BLOCK_N] rows < N
    cols,  # [BLOCK_V] int64 vocabulary indices
    col_mask,  # [BLOCK_V] cols < V
    D,
    stride_h_n,
    stride_w_v,
    stride_w_d,
    inv_temperature,
    alpha,
    log_one_minus_alpha,
    log_alpha,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # The backward's recompute of one tile: both logit tiles again from the hidden states,
    # then g = dLoss/dz_s [BLOCK_N, BLOCK_V] from the three stored floats per token. Rows
    # past N (lse = PAD_LSE) and masked columns give g = 0; callers still mask g.
    z_s, z_t = student_teacher_logits(
        student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
        stride_h_n, stride_w_v, stride_w_d, inv_temperature,
        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
    )  # fmt: skip
    return grad_student_logits(
        z_s, z_t, lse_s, lse_t, grad_center, alpha, log_one_minus_alpha, log_alpha, MODE
    )


@triton.jit
def load_row_stats(
    lse_s_ptr,  # [N] fp32 student log-sum-exp
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    grad_center_ptr,  # [N] fp32
    rows,  # [BLOCK_N] int64 token indices
    row_mask,  # [BLOCK_N] rows < N
):
    # The three floats per token the backward recomputes g from (past N: lse = PAD_LSE, so that
    # those rows' g is 0 without overflow; grad_center 0).
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=PAD_LSE)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=PAD_LSE)
    grad_center = tl.load(grad_center_ptr + rows, mask=row_mask, other=0.0)
    return lse_s, lse_t, grad_center


@triton.jit
def split_program(
    pid,  # this program's index in the 1-D grid of row_blocks * splits programs
    row_blocks,
    splits,
    group_rows,  # row blocks per group (>= 1)
):
    # (row block, vocabulary split) of a program. Programs run in launch order, in groups of
    # group_rows row blocks; inside a group they are split-major: consecutive programs take
    # consecutive row blocks of the same split, so the programs resident at one time read the
    # same W tiles (one load from HBM serves the whole group through L2), while the group's few
    # row blocks of h stay in L2 across its splits. group_rows = row_blocks: plain split-major.
    per_group = group_rows * splits
    group = pid // per_group
    first_row_block = group * group_rows
    rows_in_group = tl.minimum(row_blocks - first_row_block, group_rows)
    local = pid - group * per_group
    return first_row_block + local % rows_in_group, local // rows_in_group


@triton.jit
def split_operand(
    g,  # [BLOCK_N, BLOCK_V] fp32
    OPERAND_DTYPE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # (g_hi, g_lo) GEMM operands: g_hi = g rounded to OPERAND_DTYPE; with SPLIT also
    # g_lo = (g - g_hi) rounded (exact subtraction), so that g_hi @ W + g_lo @ W keeps ~16
    # significant bits of g instead of 8 (bf16); without SPLIT g_lo is g_hi (unused).
    # Under the interpreter both go back to fp32 (its tl.dot cannot take bf16; exact).
    g_hi = g.to(OPERAND_DTYPE)
    g_lo = g_hi
    if SPLIT:
        g_lo = (g - g_hi.to(tl.float32)).to(OPERAND_DTYPE)
    if DOT_IN_FP32:
        g_hi = g_hi.to(tl.float32)
        g_lo = g_lo.to(tl.float32)
    return g_hi, g_lo
