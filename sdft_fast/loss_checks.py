"""Input checks of the public loss API (``sdft_fast.loss``): shapes, dtypes, devices, finiteness
and option values, each failure a ValueError that names the argument and what it got."""

from __future__ import annotations

import torch
from sdft_kernels.topk_support import TOPK_SUPPORTS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or +-inf in ``t``. aminmax reads the tensor once without a temporary of its size
    (isfinite(W) would materialise a bool [V, D]: more than the fused loss's whole working
    memory); a NaN or an inf shows in its min or max."""
    return t.numel() == 0 or all(bool(torch.isfinite(x)) for x in torch.aminmax(t))


def check_hidden_and_head(
    student_hidden, teacher_hidden, weight, bias, *, check_finite=True, teacher_dim=None, teacher_dtype=None
):
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() not in (2, 3):
        raise ValueError(
            "student_hidden must be a [B, T, D] or [N, D] tensor, got "
            + (
                describe(student_hidden)
                if isinstance(student_hidden, torch.Tensor)
                else repr(type(student_hidden))
            )
        )
    teacher_shape = tuple(student_hidden.shape[:-1]) + (teacher_dim or student_hidden.shape[-1],)
    if teacher_hidden is not None and (
        not isinstance(teacher_hidden, torch.Tensor) or tuple(teacher_hidden.shape) != teacher_shape
    ):
        raise ValueError(
            f"teacher_hidden must have the shape {teacher_shape} (the tokens of student_hidden"
            + (", the hidden size of teacher_weight" if teacher_dim else "")
            + "), got "
            + (
                describe(teacher_hidden)
                if isinstance(teacher_hidden, torch.Tensor)
                else repr(type(teacher_hidden))
            )
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            "lm_head_weight must be a [V, D] tensor, got "
            + (describe(weight) if isinstance(weight, torch.Tensor) else repr(type(weight)))
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
            + (describe(bias) if isinstance(bias, torch.Tensor) else repr(type(bias)))
        )
    named = [("student_hidden", student_hidden), ("lm_head_weight", weight)]
    if teacher_hidden is not None:
        named.insert(1, ("teacher_hidden", teacher_hidden))
    if bias is not None:
        named.append(("lm_head_bias", bias))
    for name, t in named:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {describe(t)}")
    for name, t in named[1:]:
        if name == "teacher_hidden" and teacher_dtype is not None:
            if t.dtype != teacher_dtype:
                raise ValueError(
                    f"teacher_hidden dtype {t.dtype} differs from teacher_weight dtype {teacher_dtype}; "
                    "cast them to one dtype"
                )
        elif t.dtype != student_hidden.dtype:
            raise ValueError(
                f"{name} dtype {t.dtype} differs from student_hidden dtype {student_hidden.dtype}; "
                "cast them to one dtype"
            )
        if t.device != student_hidden.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {student_hidden.device}")
    if check_finite:
        # The LM head too: a NaN in W turns every logit of its row into NaN, and the loss with it.
        for name, t in named:
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{name} ({describe(t)}) contains {bad} NaN/inf values")


def check_teacher_head(student_weight, student_bias, teacher_weight, teacher_bias):
    """The teacher's own head (weight [V, D_t], bias [V] | None), validated; None when it shares
    the student's (no teacher_weight, or the very same tensors)."""
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias needs teacher_weight (the teacher's own [V, D_t] head)")
        return None
    if not isinstance(teacher_weight, torch.Tensor) or teacher_weight.dim() != 2:
        raise ValueError(
            "teacher_weight must be a [V, D_t] tensor, got "
            + (
                describe(teacher_weight)
                if isinstance(teacher_weight, torch.Tensor)
                else repr(type(teacher_weight))
            )
        )
    if teacher_weight is student_weight and teacher_bias is student_bias:
        return None
    vocab = student_weight.shape[0] if isinstance(student_weight, torch.Tensor) else None
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"teacher_weight {tuple(teacher_weight.shape)} has V={teacher_weight.shape[0]} rows but "
            f"lm_head_weight has V={vocab}: the teacher must share the student's vocabulary"
        )
    if teacher_bias is not None and (
        not isinstance(teacher_bias, torch.Tensor) or teacher_bias.shape != (vocab,)
    ):
        raise ValueError(
            f"teacher_bias must be a [V]=[{vocab}] tensor, got "
            + (describe(teacher_bias) if isinstance(teacher_bias, torch.Tensor) else repr(type(teacher_bias)))
        )
    for name, t in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {describe(t)}")
        if t is not None and t.device != student_weight.device:
            raise ValueError(f"{name} is on {t.device} but lm_head_weight is on {student_weight.device}")
    for name, t in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if t is not None and not all_finite(t):
            raise ValueError(
                f"{name} ({describe(t)}) contains {int((~torch.isfinite(t)).sum())} NaN/inf values"
            )
    if teacher_bias is not None and teacher_bias.dtype != teacher_weight.dtype:
        raise ValueError(
            f"teacher_bias dtype {teacher_bias.dtype} differs from teacher_weight's {teacher_weight.dtype}"
        )
    return teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()


def check_topk(topk, topk_tail, topk_support, vocab):
    if topk is None:
        if topk_tail:
            raise ValueError("topk_tail=True needs topk (the number of support ids per token)")
        return
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
        raise ValueError(
            f"topk must be an integer in [1, V={vocab}] (or None: the full vocabulary), got {topk!r}"
        )
    if not isinstance(topk_tail, bool):
        raise ValueError(f"topk_tail must be True or False, got {topk_tail!r}")
    if topk_support not in TOPK_SUPPORTS:
        raise ValueError(f"topk_support must be one of {TOPK_SUPPORTS}, got {topk_support!r}")


def check_token_tensor(name, t, lead_shape, device, *, kind):
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
