"""LoRA with two adapter slots and routing by row block.

SDFT scores the same rollout under two contexts: the student (prompt only,
trainable adapter) and the teacher (prompt + demonstration, teacher adapter).
Both share the frozen base weights, so one LoRA-wrapped linear layer carries
two adapter slots:

    slot "student"  lora_A [r, in], lora_B [out, r]      trainable parameters
    slot "teacher"  ema_A  [r, in], ema_B  [out, r]      buffers, EMA of the student

and every row block is routed to one of them (or to none, the base model):

    ROUTE_NONE     y = W x + b
    ROUTE_STUDENT  y = W x + b + s * B A dropout(x)        s = alpha / r
    ROUTE_TEACHER  y = W x + b + s * B_ema A_ema x          (no grad, no dropout)

A Hugging Face forward reads the route from a context variable set with
:func:`lora_route`, so the Hugging Face code runs unchanged: we only replace
``nn.Linear`` submodules, we never patch transformers' classes. Our packed
forward routes its student and teacher row blocks itself
(:meth:`LoraLinear.forward_pair`, :func:`fused_pair_linear`).

EMA of LoRA factors (the choice, and why)
-----------------------------------------
``teacher <- (1 - r) teacher + r student`` is applied to each factor
separately: ``A_ema <- lerp(A_ema, A, r)`` and ``B_ema <- lerp(B_ema, B, r)``.
The teacher's weight delta is then ``s * B_ema @ A_ema``, which is NOT the EMA
of the student's deltas ``s * EMA(B @ A)``: the difference is a sum of
cross-covariance terms of the factor trajectories, second order in the
per-step drift. We accept that because

* the teacher stays a rank-r adapter, applied in the same low-rank form as the
  student (O(r (in + out)) per token; an EMA of ``B @ A`` is a dense
  [out, in] matrix per module, i.e. a second copy of every targeted weight,
  which is exactly what the shared-weight design avoids);
* at initialisation ``B = 0`` so both views agree (teacher = base model), and
  with the small rates SDFT uses (0.01) the factors move slowly relative to
  the average, so the second-order gap stays small;
* it is what "EMA of the trainable parameters" means literally, and it is the
  same rule used for full fine-tuning (where it is exact).

``tests/sdft_fast/test_lora.py`` pins both the update rule and the (documented)
fact that it differs from the EMA of the products.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROUTE_NONE = 0
ROUTE_STUDENT = 1
ROUTE_TEACHER = 2
_ROUTE_NAMES = {"none": ROUTE_NONE, "student": ROUTE_STUDENT, "teacher": ROUTE_TEACHER}

# The route every LoraLinear reads in forward(): one code for the whole call.
_ACTIVE_ROUTE: contextvars.ContextVar = contextvars.ContextVar("sdft_lora_route", default=ROUTE_STUDENT)


@dataclass
class LoraConfig:
    """LoRA hyper-parameters.

    ``target_modules=None`` wraps every linear layer of the decoder blocks
    (attention and MLP projections; never the embedding or the LM head, whose
    weight the fused loss reads directly). Otherwise a list of module names:
    a name matches a module whose full path equals it or ends with ``"." + name``.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | None = field(default=None)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("LoraConfig.target_modules is empty; use None for all decoder linears")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def route_code(route: int | str) -> int:
    if isinstance(route, str):
        if route not in _ROUTE_NAMES:
            raise ValueError(f"route must be one of {sorted(_ROUTE_NAMES)}, got {route!r}")
        return _ROUTE_NAMES[route]
    if route not in (ROUTE_NONE, ROUTE_STUDENT, ROUTE_TEACHER):
        raise ValueError(f"route code must be 0 (none), 1 (student) or 2 (teacher), got {route!r}")
    return int(route)


@contextlib.contextmanager
def lora_route(route: int | str) -> Iterator[None]:
    """Route every LoRA layer's tokens for the duration of the block: "none" / "student" /
    "teacher" (or its code)."""
    token = _ACTIVE_ROUTE.set(route_code(route))
    try:
        yield
    finally:
        _ACTIVE_ROUTE.reset(token)


def current_route() -> int:
    """The route LoRA layers apply right now (ROUTE_STUDENT outside any lora_route block)."""
    return _ACTIVE_ROUTE.get()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: weight stored [in, out] (fan_in_fan_out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class _PackedBaseLinear(torch.autograd.Function):
    """y = x W^T + b for student rows and teacher rows in ONE GEMM.

    The two row blocks are concatenated so the (frozen or shared) base weight
    is streamed once; but only the student rows are saved for backward (and
    only when the weight itself needs a gradient): teacher rows are constants,
    their output is marked non-differentiable and nothing of them is kept.
    """

    @staticmethod
    def forward(ctx, student_x, teacher_x, weight, bias, own_student_storage):
        # student_x [Ns, in], teacher_x [Nt, in], weight [out, in], bias [out] | None
        n_student = student_x.shape[0]
        packed_y = F.linear(
            torch.cat([student_x, teacher_x.to(student_x.dtype)]), weight, bias
        )  # [Ns+Nt, out]
        student_y, teacher_y = packed_y[:n_student], packed_y[n_student:]
        if own_student_storage:
            # A view would pin the whole packed buffer (teacher rows included) for as long
            # as any later op saves the student output for backward: copy the rows out.
            student_y = student_y.clone()
        ctx.mark_non_differentiable(teacher_y)
        weight_needs_grad = ctx.needs_input_grad[2]
        ctx.save_for_backward(weight, student_x if weight_needs_grad else None)
        ctx.has_bias = bias is not None
        return student_y, teacher_y

    @staticmethod
    def backward(ctx, grad_student_y, grad_teacher_y):
        weight, student_x = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_student_y @ weight  # [Ns, in]
        if ctx.needs_input_grad[2]:
            grad_w = grad_student_y.t() @ student_x  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_student_y.sum(0)
        return grad_x, None, grad_w, grad_b, None


def packed_linear(
    student_x: torch.Tensor,  # [Ns, in]
    teacher_x: torch.Tensor,  # [Nt, in], constant
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,  # [out]
    own_student_storage: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GEMM over student + teacher rows; only student rows enter autograd.

    ``own_student_storage=False`` returns the student rows as a view of the packed
    output: only safe when the caller immediately makes a new tensor from it
    (e.g. adds the LoRA delta), so no saved tensor can pin the teacher rows.
    """
    return _PackedBaseLinear.apply(student_x, teacher_x.detach(), weight, bias, own_student_storage)


class LoraLinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) plus two LoRA slots."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif _is_conv1d(base):
            in_features, out_features = base.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(f"LoraLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=w.dtype, device=w.device))
        # Standard LoRA init: A like a default nn.Linear, B zero, so the delta starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Teacher slot; None until the model asks for an EMA teacher.
        self.register_buffer("ema_A", None, persistent=False)
        self.register_buffer("ema_B", None, persistent=False)

    # -- teacher slot ---------------------------------------------------------------
    def init_teacher_slot(self) -> None:
        """Teacher <- copy of the student factors (the EMA starts at the student)."""
        self.ema_A = self.lora_A.detach().clone()
        self.ema_B = self.lora_B.detach().clone()

    @property
    def has_teacher_slot(self) -> bool:
        return self.ema_A is not None

    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        # Factor-wise EMA (see the module docstring for why not EMA(B @ A)).
        self.ema_A.lerp_(self.lora_A.detach(), rate)
        self.ema_B.lerp_(self.lora_B.detach(), rate)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Fold the student delta into the frozen base weight and restart the adapter at zero (B = 0,
        A kept): the layer computes the same function, and the base route now means the merged
        weight. An EMA teacher slot restarts at the student (its old delta is not representable on
        the new base at rank r)."""
        delta = self.delta_weight(ROUTE_STUDENT).to(self.base.weight.dtype)  # [out, in]
        self.base.weight.add_(delta.t() if self.fan_in_fan_out else delta)
        self.lora_B.zero_()
        if self.ema_A is not None:
            self.ema_A.copy_(self.lora_A)
            self.ema_B.zero_()

    # -- math -----------------------------------------------------------------------
    @property
    def base_weight(self) -> torch.Tensor:  # [out, in]
        return self.base.weight.t() if self.fan_in_fan_out else self.base.weight

    def delta_weight(self, route: int = ROUTE_STUDENT) -> torch.Tensor:  # [out, in]
        a, b = (self.lora_A, self.lora_B) if route == ROUTE_STUDENT else (self.ema_A, self.ema_B)
        return (b @ a) * self.scaling

    def student_delta(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]; dropout on the LoRA branch only, as in the LoRA paper.
        if self.dropout_p > 0.0 and self.training:
            x = F.dropout(x, self.dropout_p, training=True)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def teacher_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.ema_A is None:
            raise RuntimeError("teacher route used but this LoRA layer has no EMA teacher slot")
        with torch.no_grad():
            return F.linear(F.linear(x, self.ema_A), self.ema_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.routed_delta(x, _ACTIVE_ROUTE.get())
        y = self.base(x)
        return y if delta is None else y + delta

    def routed_delta(self, x: torch.Tensor, route: int) -> torch.Tensor | None:
        """The LoRA delta of one route's slot for all rows of x (None for ROUTE_NONE).

        ROUTE_STUDENT keeps the graph only when grad mode is on; callers run
        teacher rows under no_grad, which is how a 'live' teacher shares the
        student adapter without saving anything.
        """
        if route == ROUTE_STUDENT:
            return self.student_delta(x)
        if route == ROUTE_TEACHER:
            return self.teacher_delta(x)
        return None

    def forward_pair(
        self,
        student_x: torch.Tensor,  # [Ns, in]
        teacher_x: torch.Tensor,  # [Nt, in]
        teacher_route: int,
        student_route: int = ROUTE_STUDENT,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student rows and teacher rows in one base GEMM; the delta of each row block's route.

        ``teacher_route`` is ROUTE_TEACHER (EMA adapter), ROUTE_NONE (base) or
        ROUTE_STUDENT (live student adapter, no grad). ``student_route`` is
        ROUTE_STUDENT except under ``adapters_disabled`` (ROUTE_NONE).
        """
        student_delta = self.routed_delta(student_x, student_route)
        student_y, teacher_y = packed_linear(
            student_x, teacher_x, self.base_weight, self.base.bias, own_student_storage=student_delta is None
        )
        if student_delta is not None:
            student_y = student_y + student_delta
        with torch.no_grad():
            teacher_delta = self.routed_delta(teacher_x, teacher_route)
            if teacher_delta is not None:
                teacher_y = teacher_y + teacher_delta
        return student_y, teacher_y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, teacher_slot={self.has_teacher_slot}"


def fused_pair_linear(
    modules: list[LoraLinear],
    student_x: torch.Tensor,  # [Ns, in]
    teacher_x: torch.Tensor | None,  # [Nt, in]
    student_route: int,
    teacher_route: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Several LoRA layers that read the same input (q/k/v; gate/up) as ONE wider layer.

    One base GEMM over the concatenated frozen weights instead of one per layer, one LoRA-A
    GEMM per row block; the backward's input gradient is one GEMM too. The caller checks
    :func:`can_fuse` first. Returns ([Ns, out_i] per layer, [Nt, out_i] per layer or Nones).
    """
    outs = [m.out_features for m in modules]
    weight = torch.cat([m.base.weight for m in modules])  # [sum out, in], frozen
    bias = None
    if any(m.base.bias is not None for m in modules):
        bias = torch.cat(
            [m.base.bias if m.base.bias is not None else weight.new_zeros(m.out_features) for m in modules]
        )

    def delta(x, route):  # [N, in] -> [N, sum out] | None
        if route == ROUTE_NONE:
            return None
        factors = [(m.lora_A, m.lora_B) if route == ROUTE_STUDENT else (m.ema_A, m.ema_B) for m in modules]
        if any(a is None for a, _ in factors):
            raise RuntimeError("teacher route used but a LoRA layer has no EMA teacher slot")
        low = F.linear(x, torch.cat([a for a, _ in factors]))  # [N, sum r]
        parts = low.split([a.shape[0] for a, _ in factors], dim=1)
        return torch.cat(
            [F.linear(part, b) * m.scaling for part, (_, b), m in zip(parts, factors, modules)], dim=1
        )

    student_delta = delta(student_x, student_route)
    if teacher_x is None:
        student_y = F.linear(student_x, weight, bias)
        teacher_y = None
    else:
        student_y, teacher_y = packed_linear(
            student_x, teacher_x, weight, bias, own_student_storage=student_delta is None
        )
        with torch.no_grad():
            teacher_delta = delta(teacher_x, teacher_route)
            if teacher_delta is not None:
                teacher_y = teacher_y + teacher_delta
    if student_delta is not None:
        student_y = student_y + student_delta
    return (
        list(student_y.split(outs, dim=1)),
        [None] * len(modules) if teacher_y is None else list(teacher_y.split(outs, dim=1)),
    )


def can_fuse(modules: list[nn.Module]) -> bool:
    """True when :func:`fused_pair_linear` applies: LoRA layers over frozen, shared nn.Linear
    weights ([out, in]) without active dropout."""
    return all(
        isinstance(m, LoraLinear) and not m.fan_in_fan_out and not (m.dropout_p > 0 and m.training)
        for m in modules
    )


# -- injection ------------------------------------------------------------------------
def decoder_block_prefixes(model: nn.Module) -> list[str]:
    """Module paths of the decoder blocks: the ModuleList with num_hidden_layers same-type children."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            if len(module) > len(best):
                best = [f"{name}.{i}" for i in range(len(module))]
    if not best:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__} (no ModuleList of layers)"
        )
    return best


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def select_target_modules(model: nn.Module, target_modules: list[str] | None) -> list[str]:
    """Full module paths LoRA will wrap (sorted in model order)."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = [(n, m) for n, m in model.named_modules() if is_linear_like(m) and not isinstance(m, LoraLinear)]
    if target_modules is None:
        prefixes = tuple(p + "." for p in decoder_block_prefixes(model))
        chosen = [n for n, _ in named if n.startswith(prefixes)]
    else:
        chosen = []
        for target in target_modules:
            hits = [n for n, _ in named if n == target or n.endswith("." + target)]
            if not hits:
                raise ValueError(
                    f"LoraConfig.target_modules entry {target!r} matches no linear layer of {type(model).__name__}"
                )
            chosen.extend(hits)
        chosen = [n for n, _ in named if n in set(chosen)]
    if output_embeddings is not None:
        for n, m in named:
            if m is output_embeddings and n in chosen:
                raise ValueError(
                    f"LoRA on the LM head ({n!r}) is not supported: the fused loss reads lm_head.weight"
                )
    if not chosen:
        raise ValueError(f"no linear layer to wrap with LoRA in {type(model).__name__}")
    return chosen


def inject_lora(model: nn.Module, config: LoraConfig) -> dict[str, LoraLinear]:
    """Replace the targeted linear submodules by LoraLinear; freeze every base parameter.

    Returns {module path: LoraLinear} in model order.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoraLinear] = {}
    for path in select_target_modules(model, config.target_modules):
        parent_path, _, child_name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        lora = LoraLinear(getattr(parent, child_name), config.r, config.alpha, config.dropout)
        setattr(parent, child_name, lora)
        wrapped[path] = lora
    return wrapped
