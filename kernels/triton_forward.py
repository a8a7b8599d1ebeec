"""Forward kernels of the Triton self-distillation loss: per-token statistics and losses.

Each program computes [BLOCK_N, BLOCK_V] logit tiles of the student and the teacher
(``triton_tiles.student_teacher_logits``, fp32, never stored) and folds them into per-token
running statistics straight away:

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

Kernels, both on a 1-D grid of (row blocks x vocabulary splits) programs, in the launch order of
``triton_tiles.split_program`` (split-major within groups of row blocks: W tiles shared in L2):

* ``_sdft_stats_kernel``: partial m, l (and A or B) of each split, written to [S, N] buffers and
  merged in torch in a fixed order (deterministic, no atomics). Splits give enough programs
  when N is small.
* ``_sdft_jsd_loss_kernel``: partial KL(T||M) and KL(S||M) from the merged lse.

Cost: 2 GEMM-equivalents (one N x V x D GEMM each for z_s and z_t), 4 for the JSD.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sdft_kernels.triton_configs import (
    DO_NOT_SPECIALIZE_SPLIT,
    launch_args,
    launch_meta,
    split_group_rows,
    vocab_splits,
    with_config,
)
from sdft_kernels.triton_tiles import (
    MODE_FORWARD_KL,
    MODE_REVERSE_KL,
    jsd_log_mixture,
    split_program,
    student_teacher_logits,
)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE_SPLIT)
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
    splits,  # vocabulary splits S
    group_rows,  # row blocks per launch group (``triton_tiles.split_program``)
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_split = split_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, group_rows)
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
        z_s, z_t = student_teacher_logits(
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


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE_SPLIT)
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
    splits,
    group_rows,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n, pid_split = split_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, group_rows)
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
        z_s, z_t = student_teacher_logits(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, D,
            stride_h_n, stride_w_v, stride_w_d, inv_temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        log_p_s = z_s - lse_s[:, None]
        log_p_t = z_t - lse_t[:, None]
        log_m = jsd_log_mixture(log_p_s, log_p_t, log_one_minus_alpha, log_alpha)
        # KL(T||M) += sum p_t (log p_t - log m); KL(S||M) += sum p_s (log p_s - log m)
        term_t = tl.where(col_mask[None, :], tl.exp(log_p_t) * (log_p_t - log_m), 0.0)
        term_s = tl.where(col_mask[None, :], tl.exp(log_p_s) * (log_p_s - log_m), 0.0)
        kl_t_m += tl.sum(term_t, axis=1)
        kl_s_m += tl.sum(term_s, axis=1)

    out = pid_split.to(tl.int64) * N + rows
    tl.store(kl_t_m_ptr + out, kl_t_m, mask=row_mask)
    tl.store(kl_s_m_ptr + out, kl_s_m, mask=row_mask)


def launch_forward(
    student: torch.Tensor,  # [N, D] contiguous
    teacher: torch.Tensor,  # [N, D] contiguous, same dtype
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    alpha: float,
    temperature: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses and the three floats per token that the backward recomputes from.

    Returns (loss, lse_s, lse_t, grad_center), each [N] fp32 (grad_center: E_s[z_s - z_t] for
    reverse KL, KL(S||M) for the JSD, zeros for forward KL). ``num_splits`` overrides the
    number of vocabulary splits (tests).
    """
    num_tokens = student.shape[0]
    vocab = weight.shape[0]
    device = student.device
    args = launch_args(student, weight, bias, alpha, temperature)

    def run(config):
        row_blocks = triton.cdiv(num_tokens, config["BLOCK_N"])
        vocab_tiles = triton.cdiv(vocab, config["BLOCK_V"])
        wanted = vocab_splits(row_blocks, vocab_tiles, device, num_splits)
        tiles_per_split = triton.cdiv(vocab_tiles, wanted)
        splits = triton.cdiv(vocab_tiles, tiles_per_split)  # every split holds >= 1 real column
        columns_per_split = tiles_per_split * config["BLOCK_V"]
        meta = launch_meta(config, device)

        grid = (row_blocks * splits,)
        order = (splits, split_group_rows(row_blocks, splits, device))  # launch order of the programs
        partial = torch.empty((5, splits, num_tokens), dtype=torch.float32, device=device)  # [5, S, N]
        _sdft_stats_kernel[grid](
            student, teacher, weight, args.bias_arg, partial[0], partial[1], partial[2], partial[3],
            partial[4], *args.shapes, args.inv_temperature, columns_per_split, *order,
            MODE=args.mode, HAS_BIAS=args.has_bias, **args.dot, **meta,
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

        if args.mode == MODE_FORWARD_KL:
            # KL(T||S) = B / l_t - (lse_t - lse_s)
            cross = (cross_k * rescale_t).sum(dim=0)
            loss = cross / sum_t + lse_gap
            grad_center = torch.zeros_like(loss)  # g = p_s - p_t subtracts nothing
        elif args.mode == MODE_REVERSE_KL:
            # KL(S||T) = A / l_s - (lse_s - lse_t); g subtracts E_s[z_s - z_t] = A / l_s
            grad_center = (cross_k * rescale_s).sum(dim=0) / sum_s
            loss = grad_center - lse_gap
        else:
            kl = torch.empty((2, splits, num_tokens), dtype=torch.float32, device=device)  # [2, S, N]
            _sdft_jsd_loss_kernel[grid](
                student, teacher, weight, args.bias_arg, lse_s, lse_t, kl[0], kl[1],
                *args.shapes, args.inv_temperature, args.log_one_minus_alpha, args.log_alpha,
                columns_per_split, *order, HAS_BIAS=args.has_bias, **args.dot, **meta,
            )  # fmt: skip
            kl_t_m, kl_s_m = kl.sum(dim=1).unbind(0)  # [N] each
            loss = alpha * kl_t_m + (1.0 - alpha) * kl_s_m
            grad_center = kl_s_m  # g subtracts KL(S||M)
        return loss, lse_s, lse_t, grad_center

    return with_config(("forward", student.dtype, args.mode, args.has_bias), device, run)
