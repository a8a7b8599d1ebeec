"""Vocabulary-tiled Triton kernels for the fused linear self-distillation loss.

Same semantics as ``sdft_kernels.reference.reference_token_losses`` (read it for the formulas),
without ever holding [N, V] or [chunk, V] logits: each program computes [BLOCK_N, BLOCK_V]
logit tiles of the student and the teacher in fp32 ``tl.dot`` accumulators (looping over D in
BLOCK_D chunks) and folds them into per-token statistics straight away.

Per token (z_s = (W h_s + b) / tau, z_t = (W h_t + b) / tau):

    m_s, l_s = running max of z_s, sum exp(z_s - m_s)        (likewise m_t, l_t)
    A = sum exp(z_s - m_s) (z_s - z_t)                      (reverse KL, alpha = 1)
    B = sum exp(z_t - m_t) (z_t - z_s)                      (forward KL, alpha = 0)
    lse = m + log l
    reverse KL(S||T) = A / l_s - (lse_s - lse_t)
    forward KL(T||S) = B / l_t - (lse_t - lse_s)

``lse_s - lse_t`` is formed as ``(m_s - m_t) + (log l_s - log l_t)`` so that two large
log-sum-exps (~30 for LLM logits) never cancel in fp32 when the divergence is ~1e-3.
The generalized JSD (0 < alpha < 1) needs both lse before it can weigh anything, so it takes a
statistics sweep and then a loss sweep.

Kernels and their grids:

* ``_sdft_stats_kernel``   grid (row blocks, vocabulary splits): partial m, l (and A or B) of
  each split, written to [S, N] buffers and merged in torch in a fixed order (deterministic, no
  atomics). Splits give enough programs when N is small.
* ``_sdft_jsd_loss_kernel`` same grid: partial KL(T||M) and KL(S||M) from the merged lse.
* ``_sdft_grad_hidden_kernel`` grid (row blocks,): recomputes both logit tiles from the three
  stored floats per token, forms g = dLoss/dz_s for the tile and accumulates
  sum_v g[n, v] W[v, :] into the program's own rows of an fp32 [N, D] buffer (read-modify-write
  over D chunks; no other program touches those rows). The per-token incoming gradient and
  1/tau scale the rows afterwards.
* ``_sdft_grad_hidden_staged_kernel`` (the default, see STAGED_GRAD_HIDDEN_CONFIGS): the same dh,
  with g for STAGE_V columns parked in a per-program slab and multiplied by W as one GEMM, so
  the fp32 dh rows are read and written STAGE_V / BLOCK_V times less often.
* ``_sdft_grad_weight_kernel`` grid (vocabulary tiles,): only when W or b requires grad; each
  program owns its BLOCK_V rows of dW (fp32 read-modify-write) and of dbias (registers), looping
  over all row blocks.

Cost, in units of one N x V x D GEMM: forward 2 (KL) or 4 (JSD: statistics, then loss), dh 3
(both logit tiles again, then g @ W; 4 for the JSD in bf16/fp16, see SPLIT_G_NOTE), dW 3 (4)
more. The dh read-modify-write moves about N * V * D * 8 / BLOCK_V bytes (N * V * D * 8 /
STAGE_V staged).

Measured on H200 (bench/gpu_check.sh, torch 2.11, Triton 3.6; forward + dh, weight frozen,
alpha 0, bf16): at N=8192, D=3584, V=152064 (Qwen2.5-7B) ours 142.7 ms / 168 MiB extra peak,
LigerFusedLinearJSD 80.5 ms / 1394 MiB, naive full logits 56.6 ms / 21416 MiB: 1/8 of Liger's
memory but 0.56x its speed (the goal was 1.5x at 1/4). Where the time goes (estimates; the
phases were not timed separately): 5 GEMM-equivalents (Liger and naive: 3) = 44.7 TFLOP,
i.e. 313 TFLOP/s on average. (1) L2 bandwidth: a [64, 128] tile pair loads h_s, h_t and W
for every tile (64 FLOP per byte), and each 64-row program sweeps all of W once in the
forward and twice in the staged dh (logits, then slab @ W), re-reading its slab per D chunk:
~280 GB forward + ~280 GB dh phase 1 + ~245 GB dh phase 2 (W, slab, fp32 dh rows) ~ 805 GB,
i.e. ~5.6 TB/s over 142.7 ms, near the ~5-7 TB/s reported for H100-class L2 (not measured
here): likely L2-bound, not MMA-bound.
(2) Occupancy of the backward: its grid is N / 64 programs (128 at N=8192, one per SM at
~147 KiB shared memory, no overlap of one program's exp/log epilogue with another's MMA; 64
at N=4096 and 16 at N=1024, i.e. half and 1/8 of the 132 SMs idle): hence 71.7 ms at N=1024
(Liger 37.8) and 102.3 ms at N=4096 (Liger 54.8), barely less than at N=8192. Faster than
Liger fused at Qwen2.5-0.5B / SmolLM2 shapes (e.g. 35.5 vs 94.1 ms at N=8192, D=896).
Better designs, by expected gain: (a) vocabulary splits in the backward too (grid (row
blocks, S), S fp32 [N, D] partial dh summed in a fixed order; S = 1 at N >= 8192), ~3x at
N=1024, ~1.6x at N=4096, nothing at N=8192; (b) 128-row tiles (or student and teacher rows
stacked as one M=128 operand) in the forward and dh phase 1: 85 instead of 64 FLOP/byte and
half the phase-2 W/slab traffic, ~805 -> ~600 GB, ~1.3x at N=8192 if L2-bound (register
pressure: two [128, 128] fp32 accumulators = 128 registers/thread at 8 warps); (c) dh in the
forward sweep for the KL modes (flash-attention style: U_s += exp(z_s - m_s) @ W and U_t
likewise with online rescaling, dh = U_s / l_s - U_t / l_t; 4 GEMM-equivalents, no backward
sweep), but the two terms cancel when S ~ T, so bf16 operands lose ~2^-9 |p| / |p_s - p_t|
relative accuracy and need the hi/lo split (6 GEMM-equivalents, two fp32 [N, D] accumulators
of read-modify-write): a gain only where L2 traffic, not MMA, is the bound; it cannot serve
the JSD (log m does not factor). 1.5x faster than Liger at N=8192 means <= 54 ms, i.e. 5
GEMM-equivalents at >= 830 TFLOP/s: out of reach for this recompute design on an H200; (a) +
(b) could plausibly reach parity with Liger (~70-80 ms) at 1/8 of its memory.

Extra memory: O(S * N) floats of statistics, 3 floats per token saved for backward, one fp32
[N, D] buffer for dh (it is the result itself for fp32 inputs; staged: plus N * STAGE_V
elements of slab, twice that for the JSD in bf16/fp16), one fp32 [V, D] buffer for dW. Pointers are formed from int64 row/column
indices (N*V and V*D pass 2^31).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests): the interpreter's
``tl.dot`` cannot multiply bfloat16 (it stores them as uint16), so on CPU the dot operands are
upcast to fp32 first — exact, since bf16 x bf16 products are exact in fp32 as on tensor cores.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl

# Divergence selected by alpha (constexpr MODE of the kernels).
MODE_FORWARD_KL = 0  # alpha == 0: KL(T || S)
MODE_REVERSE_KL = 1  # alpha == 1: KL(S || T)
MODE_JSD = 2  # 0 < alpha < 1: alpha KL(T || M) + (1 - alpha) KL(S || M), M = (1 - alpha) S + alpha T

# Logit of a vocabulary column past V: exp(MASKED_LOGIT - anything real) == 0, and the
# difference of two masked logits is exactly 0 (no inf - inf = nan on any path).
MASKED_LOGIT = tl.constexpr(-1.0e30)

# dh without staging (``_sdft_grad_hidden_kernel``): each [BLOCK_N, BLOCK_V] tile of g goes
# straight into the fp32 read-modify-write of dh, ~ N * V * D * 8 / BLOCK_V bytes of traffic
# (hence 256-wide tiles first). The fallbacks of the staged configs below.
DIRECT_GRAD_HIDDEN_CONFIGS = (
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
)
# Staged dh (``_sdft_grad_hidden_staged_kernel``, the default): g for STAGE_V columns goes
# through a per-program [BLOCK_N, STAGE_V] slab (N * STAGE_V elements in all: 16 MiB at
# N = 8192 in bf16, L2-resident), then one GEMM per stage adds slab @ W[stage] to dh: the dh
# traffic drops to ~ N * V * D * 8 / STAGE_V bytes (8x less than direct 128-wide tiles).
STAGED_GRAD_HIDDEN_CONFIGS = (
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, STAGE_V=1024, BLOCK_DH=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, STAGE_V=1024, BLOCK_DH=64, num_warps=8, num_stages=2),
    *DIRECT_GRAD_HIDDEN_CONFIGS,
)
# SPLIT_G_NOTE: the dh (and dW) GEMM takes g = dLoss/dz_s as an operand of the input dtype.
# Rounding g to bf16 costs ~2^-9 relative per element, ~1e-3 relative error in the fp32 sum
# whatever the mode (float64 emulation at N=256, D=896, V=151936: 1.7e-3 with g rounded,
# 1.5e-6 in fp32), and the bf16 result then often rounds to the wrong neighbour (~60% of
# elements in the tests; error ~2.4x that of the correctly rounded exact gradient). The KL
# modes still fit the error budget of the bf16 full-logit reference; the JSD did not: on an
# H200 (N=512, D=896, V=151936, alpha 0.5) ours was 2.79e-5 vs the reference's 1.29e-5 with
# max |dh| 5e-3 (bf16 half-ulp there: 1.5e-5). So for the JSD in bf16/fp16 (SPLIT_G) g goes in
# as g_hi + g_lo, two operands of the input dtype and two GEMMs: ~16 significant bits, and dh
# is the correctly rounded exact gradient except at rounding ties (4e-6 relative in the
# emulation). The JSD's g @ W then costs 2 GEMM-equivalents instead of 1 (dh 4 instead of 3,
# dW likewise); the KL modes are unchanged (add them here to trade that speed for accuracy).
SPLIT_G_MODES = (MODE_JSD,)
# Block configurations per phase (bf16/fp16), tried in order on CUDA until one compiles and
# launches (a config that runs out of shared memory or registers on some GPU falls through to
# the next; the first working one is cached). All were compiled offline for sm_90 with Triton
# 3.6 and 3.9 (16-divisible shapes): the first entries pipeline 2-3 stages (64-144 KiB shared
# memory) and use wgmma without register spills (154-255 registers/thread at 8 warps; the JSD
# dh variant spills <= 64 bytes). Benchmarks may swap tuples, e.g.
#     triton_sdft.CUDA_CONFIGS["grad_hidden"] = triton_sdft.DIRECT_GRAD_HIDDEN_CONFIGS
CUDA_CONFIGS = {
    "forward": (
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
        dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    ),
    "grad_hidden": STAGED_GRAD_HIDDEN_CONFIGS,
    "grad_weight": (
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
        dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    ),
}
# fp32 inputs multiply in exact fp32 ("ieee", CUDA cores, no tensor cores): the bf16 tiles
# above spill thousands of bytes and take ~40 s to compile there; these do not spill and
# compile in seconds. fp32 on GPU is for tests and references, not for speed (its dh is
# direct, so a GPU test run covers both dh kernels: staged in bf16/fp16, direct in fp32).
FP32_CUDA_CONFIGS = (
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=2, num_stages=1),
)
# Under the CPU interpreter every block op is a Python-level numpy call, so time grows with the
# number of tiles: moderate blocks keep the tests fast while the test shapes (N=37, D=33,
# V=301, ...) still span several ragged row, D and vocabulary tiles.
# dh is staged as on GPU (two 64-wide tiles per stage, so stages are also ragged).
INTERPRETER_CONFIG = dict(
    BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, STAGE_V=128, BLOCK_DH=32, num_warps=1, num_stages=1
)
# On CUDA, aim for this many programs per SM in the split (forward) sweeps.
PROGRAMS_PER_SM = 4
# On CPU (interpreter) use a few splits so that the merge path is always exercised.
INTERPRETER_SPLITS = 3

# Integer arguments Triton should not specialize on (divisible by 16, equal to 1): they only
# bound loops and masks, never align a vectorised load, so specializing them would only
# multiply compiled variants (one per ragged test shape). D and the strides stay specialized:
# their divisibility lets the loads of h and W use 16-byte async copies.
_DO_NOT_SPECIALIZE = ["N", "V"]
_DO_NOT_SPECIALIZE_SPLIT = ["N", "V", "columns_per_split"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _student_teacher_logits(
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
    # accumulated in fp32 over D (never rounded to the input dtype). Columns past V get
    # MASKED_LOGIT; rows past N read zeros (finite logits, never stored by the callers).
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
def _grad_student_logits(
    z_s,  # [BLOCK_N, BLOCK_V] student logits / tau
    z_t,  # [BLOCK_N, BLOCK_V] teacher logits / tau
    lse_s,  # [BLOCK_N] student log-sum-exp
    lse_t,  # [BLOCK_N] teacher log-sum-exp
    aux,  # [BLOCK_N] reverse KL: E_s[z_s - z_t]; JSD: KL(S || M); forward KL: unused
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
        g = p_s * ((z_s - z_t) - aux[:, None])
    else:
        # JSD: d/dp_s of alpha KL(T||M) + (1 - alpha) KL(S||M) is (1 - alpha)(log p_s - log m)
        # (the 1/m terms cancel); the softmax Jacobian subtracts its p_s-weighted mean,
        # (1 - alpha) KL(S||M):  g = (1 - alpha) p_s (log p_s - log m - KL(S||M)),
        # log m = logsumexp(log p_s + log(1 - alpha), log p_t + log(alpha)).
        x = log_p_s + log_one_minus_alpha
        y = z_t - lse_t[:, None] + log_alpha
        hi = tl.maximum(x, y)
        log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))
        g = (1.0 - alpha) * p_s * (log_p_s - log_m - aux[:, None])
    return g


@triton.jit
def _split_operand(
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


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE_SPLIT)
def _sdft_stats_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    max_s_ptr,  # [S, N] fp32 out: per-split max of z_s
    sum_s_ptr,  # [S, N] fp32 out: per-split sum exp(z_s - max_s)
    max_t_ptr,  # [S, N] fp32 out: per-split max of z_t
    sum_t_ptr,  # [S, N] fp32 out: per-split sum exp(z_t - max_t)
    cross_ptr,  # [S, N] fp32 out: A (MODE 1) or B (MODE 0) of the split, relative to its own max
    N,
    V,
    D,
    stride_h_n,
    stride_w_v,
    stride_w_d,
    inv_temperature,
    columns_per_split,  # a multiple of BLOCK_V
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    v_begin = pid_split.to(tl.int64) * columns_per_split
    v_end = tl.minimum(v_begin + columns_per_split, V)

    max_s = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    max_t = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)  # [BLOCK_V] int64
        col_mask = cols < V
        z_s, z_t = _student_teacher_logits(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
            stride_h_n, stride_w_v, stride_w_d, inv_temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        # Online softmax: when the max moves m -> m', old sums scale by exp(m - m'). Every
        # split holds >= 1 real column, so m' is finite and exp(-inf - m') = 0 on the first tile.
        new_max_s = tl.maximum(max_s, tl.max(z_s, axis=1))
        new_max_t = tl.maximum(max_t, tl.max(z_t, axis=1))
        rescale_s = tl.exp(max_s - new_max_s)
        rescale_t = tl.exp(max_t - new_max_t)
        exp_s = tl.exp(z_s - new_max_s[:, None])  # [BLOCK_N, BLOCK_V], 0 on masked columns
        exp_t = tl.exp(z_t - new_max_t[:, None])
        sum_s = sum_s * rescale_s + tl.sum(exp_s, axis=1)
        sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=1)
        # Masked columns: z_s - z_t == 0 exactly, so they add nothing to A or B.
        if MODE == 0:
            # B = sum exp(z_t - m_t) (z_t - z_s)
            cross = cross * rescale_t + tl.sum(exp_t * (z_t - z_s), axis=1)
        elif MODE == 1:
            # A = sum exp(z_s - m_s) (z_s - z_t)
            cross = cross * rescale_s + tl.sum(exp_s * (z_s - z_t), axis=1)
        max_s = new_max_s
        max_t = new_max_t

    out = pid_split.to(tl.int64) * N + rows  # [BLOCK_N] offsets into the [S, N] buffers
    tl.store(max_s_ptr + out, max_s, mask=row_mask)
    tl.store(sum_s_ptr + out, sum_s, mask=row_mask)
    tl.store(max_t_ptr + out, max_t, mask=row_mask)
    tl.store(sum_t_ptr + out, sum_t, mask=row_mask)
    if MODE != 2:
        tl.store(cross_ptr + out, cross, mask=row_mask)


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE_SPLIT)
def _sdft_jsd_loss_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 merged student log-sum-exp
    lse_t_ptr,  # [N] fp32 merged teacher log-sum-exp
    kl_t_m_ptr,  # [S, N] fp32 out: per-split sum p_t (log p_t - log m)
    kl_s_m_ptr,  # [S, N] fp32 out: per-split sum p_s (log p_s - log m)
    N,
    V,
    D,
    stride_h_n,
    stride_w_v,
    stride_w_d,
    inv_temperature,
    log_one_minus_alpha,
    log_alpha,
    columns_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_begin = pid_split.to(tl.int64) * columns_per_split
    v_end = tl.minimum(v_begin + columns_per_split, V)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_N]
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)

    kl_t_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl_s_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z_s, z_t = _student_teacher_logits(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
            stride_h_n, stride_w_v, stride_w_d, inv_temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        log_p_s = z_s - lse_s[:, None]
        log_p_t = z_t - lse_t[:, None]
        # log m = log((1 - alpha) p_s + alpha p_t), as a two-term logsumexp
        x = log_p_s + log_one_minus_alpha
        y = log_p_t + log_alpha
        hi = tl.maximum(x, y)
        log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(x, y) - hi))
        # KL(T||M) += sum p_t (log p_t - log m); KL(S||M) += sum p_s (log p_s - log m)
        term_t = tl.where(col_mask[None, :], tl.exp(log_p_t) * (log_p_t - log_m), 0.0)
        term_s = tl.where(col_mask[None, :], tl.exp(log_p_s) * (log_p_s - log_m), 0.0)
        kl_t_m += tl.sum(term_t, axis=1)
        kl_s_m += tl.sum(term_s, axis=1)

    out = pid_split.to(tl.int64) * N + rows
    tl.store(kl_t_m_ptr + out, kl_t_m, mask=row_mask)
    tl.store(kl_s_m_ptr + out, kl_s_m, mask=row_mask)


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def _sdft_grad_hidden_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp (from the forward)
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    aux_ptr,  # [N] fp32 reverse KL: E_s[z_s - z_t]; JSD: KL(S||M); forward KL: unused
    grad_hidden_ptr,  # [N, D] fp32 in/out, zero-initialised: sum_v g[n, v] W[v, :]
    N,
    V,
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
    SPLIT_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # dh[n, :] = sum_v g[n, v] W[v, :]  (the caller scales row n by grad_output[n] / tau).
    # This program owns rows [pid * BLOCK_N, +BLOCK_N) of grad_hidden: plain read-modify-write,
    # deterministic, no atomics.
    pid_n = tl.program_id(0)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)

    for v_start in range(0, V, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z_s, z_t = _student_teacher_logits(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
            stride_h_n, stride_w_v, stride_w_d, inv_temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        g = _grad_student_logits(z_s, z_t, lse_s, lse_t, aux, alpha, log_one_minus_alpha, log_alpha, MODE)
        # Rows past N read lse = 0 and may overflow; masked columns must add nothing.
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        # g enters the GEMM in the weight's dtype (tensor cores; |g| <= ~1 so no underflow
        # worries: the per-row incoming gradient is applied after the sum). SPLIT_G (the JSD in
        # bf16/fp16): g = g_hi + g_lo, both in the weight's dtype, two GEMMs (see SPLIT_G_NOTE).
        g_op, g_lo = _split_operand(g, weight_ptr.dtype.element_ty, SPLIT_G, DOT_IN_FP32)
        for d_start in range(0, D, BLOCK_D):
            ds = d_start + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            w = tl.load(
                weight_ptr + cols[:, None] * stride_w_v + ds[None, :] * stride_w_d,
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # [BLOCK_V, BLOCK_D]
            if DOT_IN_FP32:
                w = w.to(tl.float32)
            dh_ptrs = grad_hidden_ptr + rows[:, None] * D + ds[None, :]  # [BLOCK_N, BLOCK_D]
            dh_mask = row_mask[:, None] & d_mask[None, :]
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            dh = tl.dot(g_op, w, dh, input_precision=DOT_PRECISION)
            if SPLIT_G:
                dh = tl.dot(g_lo, w, dh, input_precision=DOT_PRECISION)
            tl.store(dh_ptrs, dh, mask=dh_mask)
        # The stored dh chunks are re-read by other threads for the next vocabulary tile (the
        # store and load layouts can differ): a CTA barrier orders those global-memory accesses.
        tl.debug_barrier()


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def _sdft_grad_hidden_staged_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp (from the forward)
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    aux_ptr,  # [N] fp32 reverse KL: E_s[z_s - z_t]; JSD: KL(S||M); forward KL: unused
    grad_hidden_ptr,  # [N, D] fp32 in/out, zero-initialised: sum_v g[n, v] W[v, :]
    stage_ptr,  # [row blocks, 1 + SPLIT_G, BLOCK_N, STAGE_V] scratch for g (GEMM operand dtype):
    #             one slab per program (two when SPLIT_G: g_hi, then g_lo)
    N,
    V,
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
    SPLIT_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGE_V: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Same result as _sdft_grad_hidden_kernel, with STAGE_V / BLOCK_V times less read-modify-
    # write traffic on the fp32 dh rows: g for STAGE_V vocabulary columns is parked in this
    # program's private [BLOCK_N, STAGE_V] slab (a few MiB in all, L2-resident), then
    #   dh[rows, :] += g[:, stage] @ W[stage, :]
    # runs as one plain GEMM whose accumulator visits each [BLOCK_N, BLOCK_DH] chunk of dh once
    # per stage. Still deterministic (each program owns its rows and its slab), no atomics.
    pid_n = tl.program_id(0)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
    slab_ptr = stage_ptr + pid_n.to(tl.int64) * ((1 + SPLIT_G) * BLOCK_N * STAGE_V)
    slab_lo_ptr = slab_ptr + BLOCK_N * STAGE_V  # g_lo slab (read and written only when SPLIT_G)
    slab_rows = tl.arange(0, BLOCK_N)[:, None] * STAGE_V  # [BLOCK_N, 1] offsets inside the slab

    for v_stage in range(0, V, STAGE_V):
        # Columns of this stage that exist (the last stage may be short): whole tiles up to it.
        stage_width = tl.minimum(V - v_stage, STAGE_V)
        # 1) g for the stage's columns, tile by tile, into the slab (zeros past V and N).
        for v_offset in range(0, stage_width, BLOCK_V):
            cols = v_stage + v_offset + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            z_s, z_t = _student_teacher_logits(
                student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
                stride_h_n, stride_w_v, stride_w_d, inv_temperature,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
            )  # fmt: skip
            g = _grad_student_logits(z_s, z_t, lse_s, lse_t, aux, alpha, log_one_minus_alpha, log_alpha, MODE)
            g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
            slab_cols = v_offset + tl.arange(0, BLOCK_V)
            g_hi = g.to(stage_ptr.dtype.element_ty)
            tl.store(slab_ptr + slab_rows + slab_cols[None, :], g_hi)
            if SPLIT_G:
                # g - g_hi is exact in fp32; rounded, g_hi + g_lo carries ~16 significant bits.
                g_lo = (g - g_hi.to(tl.float32)).to(stage_ptr.dtype.element_ty)
                tl.store(slab_lo_ptr + slab_rows + slab_cols[None, :], g_lo)
        # The slab was written by all threads of the program and is read below by others:
        # a CTA barrier orders those global-memory accesses.
        tl.debug_barrier()
        # 2) dh[rows, :] += slab @ W[stage, :], one [BLOCK_N, BLOCK_DH] accumulator at a time.
        for d_start in range(0, D, BLOCK_DH):
            ds = d_start + tl.arange(0, BLOCK_DH)
            d_mask = ds < D
            dh_ptrs = grad_hidden_ptr + rows[:, None] * D + ds[None, :]  # [BLOCK_N, BLOCK_DH]
            dh_mask = row_mask[:, None] & d_mask[None, :]
            dh = tl.load(dh_ptrs, mask=dh_mask, other=0.0)
            for k_offset in range(0, stage_width, BLOCK_V):
                slab_cols = k_offset + tl.arange(0, BLOCK_V)
                g_k = tl.load(slab_ptr + slab_rows + slab_cols[None, :])  # [BLOCK_N, BLOCK_V]
                k_cols = v_stage + slab_cols.to(tl.int64)
                w_k = tl.load(
                    weight_ptr + k_cols[:, None] * stride_w_v + ds[None, :] * stride_w_d,
                    mask=(k_cols < V)[:, None] & d_mask[None, :],
                    other=0.0,
                )  # [BLOCK_V, BLOCK_DH]
                if DOT_IN_FP32:
                    g_k = g_k.to(tl.float32)
                    w_k = w_k.to(tl.float32)
                dh = tl.dot(g_k, w_k, dh, input_precision=DOT_PRECISION)
                if SPLIT_G:
                    g_lo_k = tl.load(slab_lo_ptr + slab_rows + slab_cols[None, :])  # [BLOCK_N, BLOCK_V]
                    if DOT_IN_FP32:
                        g_lo_k = g_lo_k.to(tl.float32)
                    dh = tl.dot(g_lo_k, w_k, dh, input_precision=DOT_PRECISION)
            tl.store(dh_ptrs, dh, mask=dh_mask)
        # Every read of this stage's slab is done before the next stage overwrites it.
        tl.debug_barrier()


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def _sdft_grad_weight_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    aux_ptr,  # [N] fp32 (see _sdft_grad_hidden_kernel)
    row_scale_ptr,  # [N] fp32 grad_output / tau
    grad_weight_ptr,  # [V, D] fp32 in/out, zero-initialised (written when GRAD_WEIGHT)
    grad_bias_ptr,  # [V] fp32 out (written when GRAD_BIAS)
    N,
    V,
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
    GRAD_WEIGHT: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
    SPLIT_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # dW[v, :] = sum_n r[n] g[n, v] h_s[n, :],  dbias[v] = sum_n r[n] g[n, v],  r = grad_out / tau.
    # This program owns vocabulary rows [pid * BLOCK_V, +BLOCK_V) and loops over all tokens.
    pid_v = tl.program_id(0)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        rows = n_start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
        lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
        aux = tl.load(aux_ptr + rows, mask=row_mask, other=0.0)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        z_s, z_t = _student_teacher_logits(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
            stride_h_n, stride_w_v, stride_w_d, inv_temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        g = _grad_student_logits(z_s, z_t, lse_s, lse_t, aux, alpha, log_one_minus_alpha, log_alpha, MODE)
        # The row scale multiplies along the contraction dimension here, so it goes in before
        # the GEMM; tl.where keeps rows past N (and masked columns) at exactly 0.
        g = tl.where(row_mask[:, None] & col_mask[None, :], g * row_scale[:, None], 0.0)
        if GRAD_BIAS:
            grad_bias += tl.sum(g, axis=0)
        if GRAD_WEIGHT:
            # SPLIT_G: g_hi + g_lo, two GEMMs (see SPLIT_G_NOTE)
            g_hi, g_lo = _split_operand(g, weight_ptr.dtype.element_ty, SPLIT_G, DOT_IN_FP32)
            g_op = tl.trans(g_hi)  # [BLOCK_V, BLOCK_N]
            g_lo_op = tl.trans(g_lo)  # [BLOCK_V, BLOCK_N] (used only when SPLIT_G)
            for d_start in range(0, D, BLOCK_D):
                ds = d_start + tl.arange(0, BLOCK_D)
                d_mask = ds < D
                h_s = tl.load(
                    student_ptr + rows[:, None] * stride_h_n + ds[None, :],
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )  # [BLOCK_N, BLOCK_D]
                if DOT_IN_FP32:
                    h_s = h_s.to(tl.float32)
                dw_ptrs = grad_weight_ptr + cols[:, None] * D + ds[None, :]  # [BLOCK_V, BLOCK_D]
                dw_mask = col_mask[:, None] & d_mask[None, :]
                dw = tl.load(dw_ptrs, mask=dw_mask, other=0.0)
                dw = tl.dot(g_op, h_s, dw, input_precision=DOT_PRECISION)
                if SPLIT_G:
                    dw = tl.dot(g_lo_op, h_s, dw, input_precision=DOT_PRECISION)
                tl.store(dw_ptrs, dw, mask=dw_mask)
        # The stored dW chunks are re-read by other threads for the next row block (the store and
        # load layouts can differ): a CTA barrier orders those global-memory accesses.
        tl.debug_barrier()
    if GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, grad_bias, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# The first config that compiled and launched, per (phase, dtype, mode, flags, device), with the
# config list it was picked from: later calls with the SAME list start from it instead of
# retrying configs known to fail. A different list (a benchmark or test swapping CUDA_CONFIGS
# entries) starts from its own first entry: otherwise a direct-dh config cached from a direct-only
# list, which also ends the staged list, would silently skip the staged kernel forever.
_WORKING_CONFIG: dict[tuple, tuple[list, dict]] = {}


def _with_config(phase_key: tuple, device: torch.device, run):
    """``run(config)`` with the first block config of the phase that compiles and launches.

    ``phase_key`` starts with the phase (a key of CUDA_CONFIGS) and the input dtype. ``run``
    allocates its own buffers and launches the phase's kernels, so a retry starts from scratch;
    compile and out-of-resources errors happen before a kernel writes anything. CPU tensors
    (the interpreter) always use INTERPRETER_CONFIG.
    """
    if device.type != "cuda":
        return run(INTERPRETER_CONFIG)
    phase, dtype = phase_key[0], phase_key[1]
    configs = list(FP32_CUDA_CONFIGS if dtype == torch.float32 else CUDA_CONFIGS[phase])
    key = (*phase_key, device.index)
    all_configs = list(configs)
    cached = _WORKING_CONFIG.get(key)
    if cached is not None and cached[0] == all_configs and cached[1] in configs:
        configs = configs[configs.index(cached[1]) :]
    for index, config in enumerate(configs):
        try:
            # Triton launches on the current CUDA device: make it the tensors' device.
            with torch.cuda.device(device):
                result = run(config)
        except Exception as error:
            if index == len(configs) - 1:
                raise
            warnings.warn(
                f"triton_sdft: {phase} kernels failed with block config {config} "
                f"({type(error).__name__}: {error}); retrying with the next config",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        _WORKING_CONFIG[key] = (all_configs, config)
        return result
    raise AssertionError("unreachable: the last config re-raises")


def _mode(alpha: float) -> int:
    if alpha == 0.0:
        return MODE_FORWARD_KL
    if alpha == 1.0:
        return MODE_REVERSE_KL
    return MODE_JSD


def _jsd_logs(alpha: float) -> tuple[float, float]:
    """log(1 - alpha), log(alpha) of the mixture weights; 0.0 placeholders for the KL modes."""
    if 0.0 < alpha < 1.0:
        return math.log1p(-alpha), math.log(alpha)
    return 0.0, 0.0


def _dot_options(dtype: torch.dtype, device: torch.device) -> dict:
    # fp32 inputs: exact fp32 products ("ieee"), like torch's default fp32 matmul (TF32 would
    # cost ~1e-3 relative logit error). bf16/fp16 use tensor cores whatever the flag says.
    # On CPU (the interpreter) tl.dot cannot multiply bfloat16: upcast the operands first.
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_IN_FP32=device.type == "cpu",
    )


def _launch_meta(config: dict, device: torch.device) -> dict:
    meta = dict(BLOCK_N=config["BLOCK_N"], BLOCK_V=config["BLOCK_V"], BLOCK_D=config["BLOCK_D"])
    if device.type == "cuda":
        meta.update(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return meta


def _vocab_splits(num_row_blocks: int, num_vocab_tiles: int, device: torch.device, requested) -> int:
    """How many vocabulary splits the forward grid uses, so that small N still fills the GPU."""
    if requested is not None:
        wanted = int(requested)
    elif device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, num_row_blocks)
    else:
        wanted = INTERPRETER_SPLITS
    return max(1, min(wanted, num_vocab_tiles))


def _forward(
    student: torch.Tensor,  # [N, D] contiguous
    teacher: torch.Tensor,  # [N, D] contiguous, same dtype
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    alpha: float,
    temperature: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses and the three floats per token that the backward recomputes from.

    Returns (loss, lse_s, lse_t, aux), each [N] fp32; aux = E_s[z_s - z_t] for reverse KL,
    KL(S||M) for the JSD, zeros for forward KL.
    """
    num_tokens, hidden = student.shape
    vocab = weight.shape[0]
    device = student.device
    mode = _mode(alpha)
    log_one_minus_alpha, log_alpha = _jsd_logs(alpha)
    inv_temperature = 1.0 / temperature
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight  # never read when HAS_BIAS is False
    dot = _dot_options(student.dtype, device)
    shapes = (num_tokens, vocab, hidden, student.stride(0), weight.stride(0), weight.stride(1))

    def run(config):
        row_blocks = triton.cdiv(num_tokens, config["BLOCK_N"])
        vocab_tiles = triton.cdiv(vocab, config["BLOCK_V"])
        wanted = _vocab_splits(row_blocks, vocab_tiles, device, num_splits)
        tiles_per_split = triton.cdiv(vocab_tiles, wanted)
        splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split holds >= 1 real column
        columns_per_split = tiles_per_split * config["BLOCK_V"]
        meta = _launch_meta(config, device)

        partial = torch.empty((5, splits, num_tokens), dtype=torch.float32, device=device)  # [5, S, N]
        _sdft_stats_kernel[(row_blocks, splits)](
            student, teacher, weight, bias_arg, partial[0], partial[1], partial[2], partial[3], partial[4],
            *shapes, inv_temperature, columns_per_split,
            MODE=mode, HAS_BIAS=has_bias, **dot, **meta,
        )  # fmt: skip

        # Merge the splits (fixed order, deterministic): with M = max_k m_k,
        #   l = sum_k l_k exp(m_k - M), and A, B rescale with their own side's max.
        max_s_k, sum_s_k, max_t_k, sum_t_k, cross_k = partial.unbind(0)  # each [S, N]
        max_s = max_s_k.amax(dim=0)  # [N]
        max_t = max_t_k.amax(dim=0)
        rescale_s = torch.exp(max_s_k - max_s)  # [S, N]
        rescale_t = torch.exp(max_t_k - max_t)
        sum_s = (sum_s_k * rescale_s).sum(dim=0)  # [N]
        sum_t = (sum_t_k * rescale_t).sum(dim=0)
        log_sum_s, log_sum_t = torch.log(sum_s), torch.log(sum_t)
        lse_s, lse_t = max_s + log_sum_s, max_t + log_sum_t
        # lse_s - lse_t without cancelling two large numbers: (m_s - m_t) + (log l_s - log l_t)
        lse_gap = (max_s - max_t) + (log_sum_s - log_sum_t)

        if mode == MODE_FORWARD_KL:
            # KL(T||S) = B / l_t - (lse_t - lse_s)
            cross = (cross_k * rescale_t).sum(dim=0)
            loss = cross / sum_t + lse_gap
            aux = torch.zeros_like(loss)
        elif mode == MODE_REVERSE_KL:
            # KL(S||T) = A / l_s - (lse_s - lse_t); the backward needs E_s[z_s - z_t] = A / l_s
            aux = (cross_k * rescale_s).sum(dim=0) / sum_s
            loss = aux - lse_gap
        else:
            kl = torch.empty((2, splits, num_tokens), dtype=torch.float32, device=device)  # [2, S, N]
            _sdft_jsd_loss_kernel[(row_blocks, splits)](
                student, teacher, weight, bias_arg, lse_s, lse_t, kl[0], kl[1],
                *shapes, inv_temperature, log_one_minus_alpha, log_alpha, columns_per_split,
                HAS_BIAS=has_bias, **dot, **meta,
            )  # fmt: skip
            kl_t_m, kl_s_m = kl.sum(dim=1).unbind(0)  # [N] each
            loss = alpha * kl_t_m + (1.0 - alpha) * kl_s_m
            aux = kl_s_m
        return loss, lse_s, lse_t, aux

    return _with_config(("forward", student.dtype, mode, has_bias), device, run)


def _backward(
    student: torch.Tensor,  # [N, D]
    teacher: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    lse_s: torch.Tensor,  # [N] fp32
    lse_t: torch.Tensor,  # [N] fp32
    aux: torch.Tensor,  # [N] fp32
    grad_loss: torch.Tensor,  # [N] dLoss / d per-token divergence
    alpha: float,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
):
    """(d student_hidden, d weight, d bias), each None unless asked for."""
    num_tokens, hidden = student.shape
    vocab = weight.shape[0]
    device = student.device
    mode = _mode(alpha)
    log_one_minus_alpha, log_alpha = _jsd_logs(alpha)
    inv_temperature = 1.0 / temperature
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight
    dot = _dot_options(student.dtype, device)
    shapes = (num_tokens, vocab, hidden, student.stride(0), weight.stride(0), weight.stride(1))
    # dz_s = grad_loss[n] * g / tau; grad_loss may arrive expanded (stride 0) or in any dtype.
    row_scale = (grad_loss.to(torch.float32) * inv_temperature).contiguous()  # [N]
    grad_hidden = grad_weight = grad_bias = None
    # See SPLIT_G_NOTE: two-part g operand for the JSD's dh and dW in bf16/fp16 (fp32 inputs
    # never round g).
    split_g = mode in SPLIT_G_MODES and student.dtype != torch.float32

    if need_hidden:

        def run_hidden(config):
            summed = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=device)  # [N, D]
            row_blocks = triton.cdiv(num_tokens, config["BLOCK_N"])
            meta = _launch_meta(config, device)
            common = (student, teacher, weight, bias_arg, lse_s, lse_t, aux, summed)
            scalars = (*shapes, inv_temperature, alpha, log_one_minus_alpha, log_alpha)
            if config.get("STAGE_V"):
                assert config["STAGE_V"] % config["BLOCK_V"] == 0, (
                    f"STAGE_V must be a multiple of BLOCK_V: {config}"
                )
                # [row blocks, 1 + SPLIT_G, BLOCK_N, STAGE_V] slab(s) per program for g, in the
                # GEMM operand dtype
                stage = torch.empty(
                    (row_blocks, 1 + split_g, config["BLOCK_N"], config["STAGE_V"]),
                    dtype=student.dtype,
                    device=device,
                )
                _sdft_grad_hidden_staged_kernel[(row_blocks,)](
                    *common, stage, *scalars,
                    MODE=mode, HAS_BIAS=has_bias, SPLIT_G=split_g, STAGE_V=config["STAGE_V"],
                    BLOCK_DH=config["BLOCK_DH"], **dot, **meta,
                )  # fmt: skip
            else:
                _sdft_grad_hidden_kernel[(row_blocks,)](
                    *common, *scalars, MODE=mode, HAS_BIAS=has_bias, SPLIT_G=split_g, **dot, **meta
                )
            return summed

        summed = _with_config(("grad_hidden", student.dtype, mode, has_bias), device, run_hidden)
        # dh = (grad_loss / tau) * sum_v g W_v, applied per row after the sum (no underflow of
        # tiny row scales inside the low-precision GEMM operands).
        grad_hidden = summed.mul_(row_scale[:, None]).to(student.dtype)

    if need_weight or need_bias:

        def run_weight(config):
            dw = (
                torch.zeros((vocab, hidden), dtype=torch.float32, device=device)  # [V, D]
                if need_weight
                else row_scale
            )
            db = torch.empty((vocab,), dtype=torch.float32, device=device) if need_bias else row_scale
            _sdft_grad_weight_kernel[(triton.cdiv(vocab, config["BLOCK_V"]),)](
                student, teacher, weight, bias_arg, lse_s, lse_t, aux, row_scale, dw, db,
                *shapes, inv_temperature, alpha, log_one_minus_alpha, log_alpha,
                MODE=mode, HAS_BIAS=has_bias, GRAD_WEIGHT=need_weight, GRAD_BIAS=need_bias,
                SPLIT_G=split_g, **dot, **_launch_meta(config, device),
            )  # fmt: skip
            return dw, db

        dw, db = _with_config(
            ("grad_weight", student.dtype, mode, has_bias, need_weight, need_bias), device, run_weight
        )
        if need_weight:
            grad_weight = dw.to(weight.dtype)
        if need_bias:
            grad_bias = db.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class TritonSelfDistillFunction(torch.autograd.Function):
    """Per-token divergences [N] with a recompute backward (three floats saved per token)."""

    @staticmethod
    def forward(ctx, student, teacher, weight, bias, alpha: float, temperature: float, num_splits):
        loss, lse_s, lse_t, aux = _forward(student, teacher, weight, bias, alpha, temperature, num_splits)
        ctx.save_for_backward(student, teacher, weight, bias, lse_s, lse_t, aux)
        ctx.alpha = alpha
        ctx.temperature = temperature
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels build no graph: no double backward
    def backward(ctx, grad_loss):
        student, teacher, weight, bias, lse_s, lse_t, aux = ctx.saved_tensors
        need_hidden, _, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_hidden, grad_weight, grad_bias = _backward(
            student, teacher, weight, bias, lse_s, lse_t, aux, grad_loss, ctx.alpha, ctx.temperature,
            need_hidden, need_weight, need_bias and bias is not None,
        )  # fmt: skip
        # The teacher is a constant: no gradient, even when the tensor passed in requires one.
        return grad_hidden, None, grad_weight, grad_bias, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(student_hidden, teacher_hidden, weight, bias, alpha, temperature) -> None:
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
    num_splits: int | None = None,
) -> torch.Tensor:  # [N] float32
    """Per-token divergence between the student's and the teacher's next-token distributions.

    ``alpha`` 0: forward KL(T||S); 1: reverse KL(S||T); between: generalized JSD with mixture
    (1 - alpha) S + alpha T. Logits are (W h + b) / temperature, computed tile by tile in fp32
    and never stored. Gradients flow to ``student_hidden`` and, when they require grad, to
    ``weight`` and ``bias``; ``teacher_hidden`` is treated as a constant even if it requires grad.
    With grad disabled (or nothing requiring grad) only the forward sweep runs and nothing is
    saved. ``num_splits`` overrides the number of vocabulary splits of the forward (tests).
    """
    alpha, temperature = float(alpha), float(temperature)
    _check_inputs(student_hidden, teacher_hidden, weight, bias, alpha, temperature)
    student = student_hidden.contiguous()
    teacher = teacher_hidden.detach().contiguous()
    if student.shape[0] == 0:
        return (student.sum(dim=1) * 0.0).float()  # [0], still attached to the graph
    needs_grad = torch.is_grad_enabled() and (
        student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        with torch.no_grad():
            return _forward(student, teacher, weight, bias, alpha, temperature, num_splits)[0]
    return TritonSelfDistillFunction.apply(student, teacher, weight, bias, alpha, temperature, num_splits)
