"""Triton kernel of the top-k support: the k ids of largest support-side logit per token, found
while streaming vocabulary tiles, and (for the tail bucket) both sides' log-sum-exps.

One program owns BLOCK_N tokens and sweeps the whole vocabulary in tiles of BLOCK_V = KP columns
(KP = k rounded up to a power of two). Each tile's logits are computed in fp32 from the hidden
states and the head (student and teacher heads may differ), never stored; the program keeps its
tokens' running top-KP as int64 keys (``sdft_kernels.topk_support.sortable_keys``: value in the
high half, 2^32 - 1 - id in the low half, so keys are unique and ties go to the lower id, as in
the PyTorch twin and the reference) and merges a tile in only when one of its keys beats a
token's current k-th (bitonic sort of the tile, elementwise max against the kept keys, one
bitonic merge: the KP largest of the 2 KP, sorted).
Memory: O(N k) outputs, no [N, V] tensor.

The logits at the chosen ids, the gradient and the tail's E_{p_s}[W] come from the PyTorch side
(``torch_topk``: gather-dots of k head rows per token and one chunked sweep), which this
module plugs its selection into. When a gradient flows through the tail bucket, lse_s is taken
from that torch sweep instead of the kernel: the backward recomputes p_s = exp(z_s - lse_s) with
torch's tiles, and the tail's dLoss/dlse_s ~ P_topk / (1 - P_topk) would amplify even a 1-ulp
mismatch between the two. Tested on the CPU under TRITON_INTERPRET=1; its speed on a GPU has not
been measured yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from sdft_kernels.torch_tiles import DEFAULT_MEMORY_BUDGET_MB
from sdft_kernels.torch_topk import student_lse_sweep, torch_topk_support
from sdft_kernels.triton_configs import dot_options

BLOCK_N = 16
BLOCK_D = 32
MIN_KP = 16  # tl.dot needs tiles of at least 16 columns
KEY_FLOOR = -(2**63) + 1  # below every real key: the empty slots of the running top-k


@triton.jit
def _logit_tile(
    hidden_ptr,  # [N, D] hidden states, row stride stride_h, unit column stride
    weight_ptr,  # [V, D] LM head, row stride stride_w, unit column stride
    bias_ptr,  # [V] (read only when HAS_BIAS)
    rows,  # [BLOCK_N] int64 token indices
    row_mask,  # [BLOCK_N]
    cols,  # [BLOCK_V] int64 vocabulary indices
    col_mask,  # [BLOCK_V]
    D,
    stride_h,
    stride_w,
    inv_tau,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # z = (h W^T + b) / tau in fp32 for one tile; columns past V are -inf (never selected, exp 0).
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_h + ds[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        w = tl.load(
            weight_ptr + cols[None, :] * stride_w + ds[:, None],
            mask=d_mask[:, None] & col_mask[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_V]
        if DOT_IN_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_tau
    return tl.where(col_mask[None, :], acc, -float("inf"))


@triton.jit
def _online_lse(running_max, running_sum, z):
    # One tile of the running max / sum exp(z - max) (see torch_tiles.online_softmax_update).
    new_max = tl.maximum(running_max, tl.max(z, 1))
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
    return new_max, running_sum


@triton.jit
def _indicator(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    # 0/1 along hypercube axis AXIS (counted from the innermost), broadcastable to [2] * N_DIMS
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - AXIS - 1) + [2] + [1] * AXIS)


@triton.jit
def _compare_swap(cube, flip, AXIS: tl.constexpr, N_DIMS: tl.constexpr):
    # One bitonic compare-and-swap between the two halves of hypercube axis AXIS: the side
    # selected by flip ^ position gets the max of the pair, the other the min. Built on max/min
    # reductions over a size-2 axis (exact for int64 keys, fast in the interpreter too).
    high = tl.max(cube, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    low = tl.min(cube, axis=N_DIMS - 1 - AXIS, keep_dims=True)
    return tl.where((_indicator(N_DIMS, AXIS) ^ flip) != 0, high, low)


@triton.jit
def _merge_top(kept, keys, LOG_KP: tl.constexpr, N_DIMS: tl.constexpr):
    # kept: [BLOCK_N, KP] keys sorted descending; keys: [BLOCK_N, KP] a tile's keys, any order.
    # Returns the KP largest of both, sorted descending: sort the tile ascending (bitonic sort),
    # take max(kept[i], tile[i]) (the top KP of the union, as a bitonic sequence), then sort that
    # descending with one bitonic merge.
    shape = keys.shape
    cube = tl.reshape(keys, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_KP + 1):
        if stage < LOG_KP:
            flip = _indicator(N_DIMS, stage)  # alternate directions between sub-sequences
        else:
            flip = tl.zeros([1] * N_DIMS, dtype=tl.int32)  # last stage: ascending overall
        for i in tl.static_range(stage):
            cube = _compare_swap(cube, flip, stage - 1 - i, N_DIMS)
    cube = tl.maximum(tl.reshape(kept, [2] * N_DIMS), cube)
    descending = tl.full([1] * N_DIMS, 1, dtype=tl.int32)
    for i in tl.static_range(LOG_KP):
        cube = _compare_swap(cube, descending, LOG_KP - 1 - i, N_DIMS)
    return tl.reshape(cube, shape)


@triton.jit
def _topk_support_kernel(
    student_ptr,  # [N, D] student hidden states
    weight_ptr,  # [V, D] student head
    bias_ptr,  # [V] student head bias
    teacher_ptr,  # [N, D_t] teacher hidden states
    teacher_weight_ptr,  # [V, D_t] teacher head
    teacher_bias_ptr,  # [V] teacher head bias
    ids_ptr,  # [N, K] int64 out: the support ids, by descending logit
    lse_s_ptr,  # [N] fp32 out (written when NEED_LSE)
    lse_t_ptr,  # [N] fp32 out (written when NEED_LSE)
    N,
    V,
    D,
    D_T,
    K,
    stride_hs,
    stride_ws,
    stride_ht,
    stride_wt,
    inv_tau,
    HAS_BIAS: tl.constexpr,
    HAS_TEACHER_BIAS: tl.constexpr,
    SUPPORT_TEACHER: tl.constexpr,
    NEED_LSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,  # running top-k width = vocabulary tile width, a power of two >= K
    LOG_KP: tl.constexpr,  # log2(KP)
    LOG_NUMEL: tl.constexpr,  # log2(BLOCK_N * KP): dimensions of the hypercube view of a tile
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kept = tl.full((BLOCK_N, KP), KEY_FLOOR, dtype=tl.int64)  # sorted descending, always
    m_s = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    l_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_t = tl.full((BLOCK_N,), -float("inf"), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(0, V, KP):
        cols = v_start + tl.arange(0, KP).to(tl.int64)
        col_mask = cols < V
        if NEED_LSE or not SUPPORT_TEACHER:
            z_s = _logit_tile(
                student_ptr,
                weight_ptr,
                bias_ptr,
                rows,
                row_mask,
                cols,
                col_mask,
                D,
                stride_hs,
                stride_ws,
                inv_tau,
                HAS_BIAS,
                BLOCK_N,
                KP,
                BLOCK_D,
                DOT_PRECISION,
                DOT_IN_FP32,
            )  # [BLOCK_N, KP]
        if NEED_LSE or SUPPORT_TEACHER:
            z_t = _logit_tile(
                teacher_ptr,
                teacher_weight_ptr,
                teacher_bias_ptr,
                rows,
                row_mask,
                cols,
                col_mask,
                D_T,
                stride_ht,
                stride_wt,
                inv_tau,
                HAS_TEACHER_BIAS,
                BLOCK_N,
                KP,
                BLOCK_D,
                DOT_PRECISION,
                DOT_IN_FP32,
            )  # [BLOCK_N, KP]
        if NEED_LSE:
            m_s, l_s = _online_lse(m_s, l_s, z_s)
            m_t, l_t = _online_lse(m_t, l_t, z_t)
        if SUPPORT_TEACHER:
            z = z_t + 0.0  # + 0.0 folds -0.0 into +0.0
        else:
            z = z_s + 0.0
        # key = monotone int32 image of the fp32 value << 32 | (2^32 - 1 - id)
        bits = z.to(tl.int32, bitcast=True)
        monotone = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (monotone.to(tl.int64) << 32) | (4294967295 - cols[None, :])  # [BLOCK_N, KP]
        kth = tl.min(kept, 1)  # the smallest kept key of each token
        beats = tl.sum((tl.max(keys, 1) > kth).to(tl.int32), 0)
        if beats > 0:  # merge: the KP largest of the 2 KP keys
            kept = _merge_top(kept, keys, LOG_KP, LOG_NUMEL)
    slots = tl.arange(0, KP)
    ids = 4294967295 - (kept & 4294967295)
    tl.store(
        ids_ptr + rows[:, None] * K + slots[None, :],
        ids,
        mask=row_mask[:, None] & (slots[None, :] < K),
    )
    if NEED_LSE:
        tl.store(lse_s_ptr + rows, m_s + tl.log(l_s), mask=row_mask)
        tl.store(lse_t_ptr + rows, m_t + tl.log(l_t), mask=row_mask)


def triton_topk_statistics(
    student_hidden,  # [N, D]
    weight,  # [V, D]
    bias,  # [V] | None
    teacher_hidden,  # [N, D_t]
    teacher_weight,  # [V, D_t]
    teacher_bias,  # [V] | None
    *,
    k: int,
    inv_tau: float,
    support_teacher: bool,
    need_lse: bool,
    want_expected: bool,
    student_grad: bool,
    memory_budget_mb: float,
):  # same outputs as torch_topk.topk_statistics
    """The support ids (and log-sum-exps) by the Triton kernel; launcher of ``_topk_support_kernel``."""
    num_tokens, hidden = student_hidden.shape
    vocab, teacher_dim = weight.shape[0], teacher_hidden.shape[1]
    tensors = [student_hidden, weight, teacher_hidden, teacher_weight]
    tensors += [b for b in (bias, teacher_bias) if b is not None]
    tensors = [t.contiguous() for t in tensors]
    student_hidden, weight, teacher_hidden, teacher_weight = tensors[:4]
    bias = None if bias is None else bias.contiguous()
    teacher_bias = None if teacher_bias is None else teacher_bias.contiguous()
    device = student_hidden.device
    ids = torch.empty(num_tokens, k, dtype=torch.long, device=device)
    lse_s = torch.empty(num_tokens if need_lse else 1, dtype=torch.float32, device=device)
    lse_t = torch.empty_like(lse_s)
    kp = max(MIN_KP, triton.next_power_of_2(k))
    _topk_support_kernel[(triton.cdiv(num_tokens, BLOCK_N),)](
        student_hidden,
        weight,
        weight if bias is None else bias,
        teacher_hidden,
        teacher_weight,
        teacher_weight if teacher_bias is None else teacher_bias,
        ids,
        lse_s,
        lse_t,
        num_tokens,
        vocab,
        hidden,
        teacher_dim,
        k,
        student_hidden.stride(0),
        weight.stride(0),
        teacher_hidden.stride(0),
        teacher_weight.stride(0),
        inv_tau,
        HAS_BIAS=bias is not None,
        HAS_TEACHER_BIAS=teacher_bias is not None,
        SUPPORT_TEACHER=support_teacher,
        NEED_LSE=need_lse,
        BLOCK_N=BLOCK_N,
        KP=kp,
        LOG_KP=kp.bit_length() - 1,
        LOG_NUMEL=(BLOCK_N * kp).bit_length() - 1,
        BLOCK_D=BLOCK_D,
        **dot_options(student_hidden.dtype, device),
    )
    if not need_lse:
        return ids, None, None, None
    expected = None
    if student_grad:  # the backward's p_s = exp(z - lse_s) needs lse_s from torch's arithmetic
        lse_s, expected = student_lse_sweep(
            student_hidden, weight, bias, inv_tau, want_expected, memory_budget_mb
        )
    return ids, lse_s, lse_t, expected


def triton_topk_support(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    support: str = "student",
    tail: bool = False,
    temperature: float = 1.0,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
):
    """``torch_topk.torch_topk_support`` with the ids found by the Triton kernel."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return torch_topk_support(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        k=k,
        support=support,
        tail=tail,
        temperature=temperature,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        memory_budget_mb=memory_budget_mb,
        select=triton_topk_statistics,
    )
