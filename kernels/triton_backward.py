"""Backward kernels of the Triton self-distillation loss: dh and, when asked for, dW and dbias.

Nothing of the forward's [N, V] work is kept: each kernel recomputes both logit tiles from the
hidden states and g = dLoss/dz_s from the three floats per token of the forward (lse_s, lse_t,
grad_center; ``triton_tiles.recompute_grad_tile``), then multiplies g by W (dh) or by h_s (dW).
Every program owns the rows of the result it writes (plain read-modify-write, deterministic,
no atomics); the per-token incoming gradient and 1/tau scale dh's rows after the sum, so that
tiny scales never underflow inside low-precision GEMM operands.

Kernels and their grids:

* ``_sdft_grad_hidden_kernel`` (row blocks,): accumulates sum_v g[n, v] W[v, :] tile by tile
  into the program's own rows of an fp32 [N, D] buffer.
* ``_sdft_grad_hidden_staged_kernel`` (row blocks,), the default: the same dh, with g for
  STAGE_V columns parked in a per-program slab and multiplied by W as one GEMM, so the fp32 dh
  rows are read and written STAGE_V / BLOCK_V times less often.
* ``_sdft_grad_weight_kernel`` (vocabulary tiles,): only when W or b requires grad; each
  program owns its BLOCK_V rows of dW (fp32 read-modify-write) and of dbias (registers),
  looping over all row blocks.

In bf16/fp16, g enters the GEMMs in the input dtype, as g_hi + g_lo for the modes of
``triton_configs.SPLIT_G_MODES``. Cost: dh 3 GEMM-equivalents (both logit tiles again, then
g @ W; 4 with the split), dW 3 (4) more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from sdft_kernels.triton_configs import (
    DO_NOT_SPECIALIZE,
    DO_NOT_SPECIALIZE_SPLIT,
    dh_splits,
    launch_args,
    launch_meta,
    split_group_rows,
    with_config,
)
from sdft_kernels.triton_tiles import load_row_stats, recompute_grad_tile, split_operand, split_program


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE_SPLIT)
def _sdft_grad_hidden_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp (from the forward)
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    grad_center_ptr,  # [N] fp32 reverse KL: E_s[z_s - z_t]; JSD: KL(S||M); forward KL: unused
    grad_hidden_ptr,  # [S, N, D] fp32 in/out, zero-initialised: split s holds sum_{v in s} g[n, v] W[v, :]
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
    columns_per_split,  # a multiple of BLOCK_V
    splits,  # vocabulary splits S
    group_rows,  # row blocks per launch group (``triton_tiles.split_program``)
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # dh[n, :] = sum_v g[n, v] W[v, :]  (the caller sums the splits and scales row n by
    # grad_output[n] / tau). This program owns rows [pid_n * BLOCK_N, +BLOCK_N) of its split's
    # partial dh: plain read-modify-write, deterministic, no atomics.
    pid_n, pid_split = split_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), splits, group_rows)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_s, lse_t, grad_center = load_row_stats(lse_s_ptr, lse_t_ptr, grad_center_ptr, rows, row_mask)
    v_begin = pid_split.to(tl.int64) * columns_per_split
    v_end = tl.minimum(v_begin + columns_per_split, V)
    grad_hidden_ptr += pid_split.to(tl.int64) * N * D  # this split's partial dh

    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        g = recompute_grad_tile(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, lse_s, lse_t, grad_center,
            rows, row_mask, cols, col_mask, D, stride_h_n, stride_w_v, stride_w_d,
            inv_temperature, alpha, log_one_minus_alpha, log_alpha,
            MODE, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        # Rows past N and masked columns must add nothing (g is 0 there already; be explicit).
        g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
        # g enters the GEMM in the weight's dtype (tensor cores; |g| <= ~1 so no underflow
        # worries: the per-row incoming gradient is applied after the sum). SPLIT_G (the JSD in
        # bf16/fp16): g = g_hi + g_lo, both in the weight's dtype, two GEMMs.
        g_op, g_lo = split_operand(g, weight_ptr.dtype.element_ty, SPLIT_G, DOT_IN_FP32)
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


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE_SPLIT)
def _sdft_grad_hidden_staged_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp (from the forward)
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    grad_center_ptr,  # [N] fp32 reverse KL: E_s[z_s - z_t]; JSD: KL(S||M); forward KL: unused
    grad_hidden_ptr,  # [S, N, D] fp32 in/out, zero-initialised: split s holds sum_{v in s} g[n, v] W[v, :]
    stage_ptr,  # [programs, 1 + SPLIT_G, BLOCK_N, STAGE_V] scratch for g (GEMM operand dtype):
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
    columns_per_split,  # a multiple of STAGE_V
    splits,  # vocabulary splits S
    group_rows,  # row blocks per launch group (``triton_tiles.split_program``)
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
    pid = tl.program_id(0)
    pid_n, pid_split = split_program(pid, tl.cdiv(N, BLOCK_N), splits, group_rows)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse_s, lse_t, grad_center = load_row_stats(lse_s_ptr, lse_t_ptr, grad_center_ptr, rows, row_mask)
    v_begin = pid_split.to(tl.int64) * columns_per_split
    v_end = tl.minimum(v_begin + columns_per_split, V)
    grad_hidden_ptr += pid_split.to(tl.int64) * N * D  # this split's partial dh
    slab_ptr = stage_ptr + pid.to(tl.int64) * ((1 + SPLIT_G) * BLOCK_N * STAGE_V)
    slab_lo_ptr = slab_ptr + BLOCK_N * STAGE_V  # g_lo slab (read and written only when SPLIT_G)
    slab_rows = tl.arange(0, BLOCK_N)[:, None] * STAGE_V  # [BLOCK_N, 1] offsets inside the slab

    for v_stage in range(v_begin, v_end, STAGE_V):
        # Columns of this stage that exist (the last stage may be short): whole tiles up to it.
        stage_width = tl.minimum(v_end - v_stage, STAGE_V)
        # 1) g for the stage's columns, tile by tile, into the slab (zeros past V and N).
        for v_offset in range(0, stage_width, BLOCK_V):
            cols = v_stage + v_offset + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < V
            g = recompute_grad_tile(
                student_ptr, teacher_ptr, weight_ptr, bias_ptr, lse_s, lse_t, grad_center,
                rows, row_mask, cols, col_mask, D, stride_h_n, stride_w_v, stride_w_d,
                inv_temperature, alpha, log_one_minus_alpha, log_alpha,
                MODE, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
            )  # fmt: skip
            g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
            slab_cols = v_offset + tl.arange(0, BLOCK_V)
            # The split of triton_tiles.split_operand, written out so that g_hi is stored before
            # g_lo is formed: the compiled kernel stays the one docs/kernels.md checked.
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


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def _sdft_grad_weight_kernel(
    student_ptr,  # [N, D] student hidden states
    teacher_ptr,  # [N, D] teacher hidden states
    weight_ptr,  # [V, D] LM head
    bias_ptr,  # [V] bias (HAS_BIAS) or any pointer
    lse_s_ptr,  # [N] fp32 student log-sum-exp
    lse_t_ptr,  # [N] fp32 teacher log-sum-exp
    grad_center_ptr,  # [N] fp32 (see _sdft_grad_hidden_kernel)
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
        lse_s, lse_t, grad_center = load_row_stats(lse_s_ptr, lse_t_ptr, grad_center_ptr, rows, row_mask)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        g = recompute_grad_tile(
            student_ptr, teacher_ptr, weight_ptr, bias_ptr, lse_s, lse_t, grad_center,
            rows, row_mask, cols, col_mask, D, stride_h_n, stride_w_v, stride_w_d,
            inv_temperature, alpha, log_one_minus_alpha, log_alpha,
            MODE, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_IN_FP32,
        )  # fmt: skip
        # The row scale multiplies along the contraction dimension here, so it goes in before
        # the GEMM; tl.where keeps rows past N (and masked columns) at exactly 0.
        g = tl.where(row_mask[:, None] & col_mask[None, :], g * row_scale[:, None], 0.0)
        if GRAD_BIAS:
            grad_bias += tl.sum(g, axis=0)
        if GRAD_WEIGHT:
            # SPLIT_G: g_hi + g_lo, two GEMMs
            g_hi, g_lo = split_operand(g, weight_ptr.dtype.element_ty, SPLIT_G, DOT_IN_FP32)
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


def launch_backward(
    student: torch.Tensor,  # [N, D]
    teacher: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    lse_s: torch.Tensor,  # [N] fp32
    lse_t: torch.Tensor,  # [N] fp32
    grad_center: torch.Tensor,  # [N] fp32
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
    args = launch_args(student, weight, bias, alpha, temperature)
    scalars = (*args.shapes, args.inv_temperature, alpha, args.log_one_minus_alpha, args.log_alpha)
    flags = dict(MODE=args.mode, HAS_BIAS=args.has_bias, SPLIT_G=args.split_g, **args.dot)
    stats = (student, teacher, weight, args.bias_arg, lse_s, lse_t, grad_center)
    # dz_s = grad_loss[n] * g / tau; grad_loss may arrive expanded (stride 0) or in any dtype.
    row_scale = (grad_loss.to(torch.float32) * args.inv_temperature).contiguous()  # [N]
    grad_hidden = grad_weight = grad_bias = None

    if need_hidden:

        def run_hidden(config):
            row_blocks = triton.cdiv(num_tokens, config["BLOCK_N"])
            # Vocabulary splits when the row blocks alone leave SMs idle: S partial dh summed
            # below in a fixed order (deterministic), each split over whole stages / tiles.
            step = config.get("STAGE_V") or config["BLOCK_V"]
            tiles = triton.cdiv(vocab, step)
            tiles_per_split = triton.cdiv(tiles, dh_splits(row_blocks, tiles, device))
            splits = triton.cdiv(tiles, tiles_per_split)
            split_args = (tiles_per_split * step, splits, split_group_rows(row_blocks, splits, device))
            partial = torch.zeros(
                (splits, num_tokens, hidden), dtype=torch.float32, device=device
            )  # [S, N, D]
            grid = (row_blocks * splits,)
            meta = launch_meta(config, device)
            if config.get("STAGE_V"):
                assert config["STAGE_V"] % config["BLOCK_V"] == 0, (
                    f"STAGE_V must be a multiple of BLOCK_V: {config}"
                )
                # [programs, 1 + SPLIT_G, BLOCK_N, STAGE_V] slab(s) per program for g, in the
                # GEMM operand dtype
                stage = torch.empty(
                    (grid[0], 1 + args.split_g, config["BLOCK_N"], config["STAGE_V"]),
                    dtype=student.dtype,
                    device=device,
                )
                _sdft_grad_hidden_staged_kernel[grid](
                    *stats, partial, stage, *scalars, *split_args, STAGE_V=config["STAGE_V"],
                    BLOCK_DH=config["BLOCK_DH"], **flags, **meta,
                )  # fmt: skip
            else:
                _sdft_grad_hidden_kernel[grid](*stats, partial, *scalars, *split_args, **flags, **meta)
            summed = partial[0]
            for split in range(1, splits):  # fixed order: the same sum on every run
                summed.add_(partial[split])
            return summed

        summed = with_config(("grad_hidden", student.dtype, args.mode, args.has_bias), device, run_hidden)
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
                *stats, row_scale, dw, db, *scalars, GRAD_WEIGHT=need_weight, GRAD_BIAS=need_bias,
                **flags, **launch_meta(config, device),
            )  # fmt: skip
            return dw, db

        dw, db = with_config(
            ("grad_weight", student.dtype, args.mode, args.has_bias, need_weight, need_bias),
            device,
            run_weight,
        )
        if need_weight:
            grad_weight = dw.to(weight.dtype)
        if need_bias:
            grad_bias = db.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias
