"""The Llama-family building blocks our own forward passes use, and the rules for when they apply.

Both fast paths — the packed one-pass forward (``model``) and the merged-weight decoder
(``fast_sampler``) — run RMSNorm, RoPE and the SwiGLU MLP from these functions over the weights
of a Hugging Face model (llama, qwen2, qwen3, mistral; SmolLM2 is llama), so they compute the same
numbers as the Hugging Face modules. The checks below say whether a model has that layout
(:func:`fast_path_support`) and whether a sliding window would change attention
(:func:`sliding_window_in_use`); every caller asks them instead of repeating the rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FAST_PATH_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module (HF's Llama-family norms call it variance_epsilon)."""
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF's LlamaRMSNorm: normalise in fp32, scale in the input dtype.
    input_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [N, H, hd]; cos/sin [N, hd] (already scaled by the rotary embedding's attention_scaling).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class SiluGateMul(torch.autograd.Function):
    """silu(gate) * up, saving only (gate, up) and recomputing silu in backward.

    Autograd's op-by-op version keeps gate, silu(gate) and up: one [N, I] tensor more
    per layer, the widest activations of the model.
        d/dgate = grad * up * sig(gate) * (1 + gate * (1 - sig(gate)))
        d/dup   = grad * silu(gate)
    """

    @staticmethod
    def forward(ctx, gate, up):  # [N, I] each
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_gate = grad * up * sig * (1 + gate * (1 - sig)) if ctx.needs_input_grad[0] else None
        grad_up = grad * gate * sig if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def gated_activation(
    mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, hidden_act: str | None
) -> torch.Tensor:
    """act(gate) * up of a SwiGLU MLP; the memory-lean autograd function when SiLU needs a gradient."""
    if hidden_act == "silu" and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluGateMul.apply(gate, up)
    return mlp.act_fn(gate) * up


def fast_path_support(hf_model: nn.Module) -> tuple[bool, str]:
    """(True, "") when ``hf_model`` has the Llama-family layout our forwards read; else (False, why)."""
    config = hf_model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAST_PATH_MODEL_TYPES:
        return (
            False,
            f"model_type {model_type!r} is not in the fast path's Llama family {FAST_PATH_MODEL_TYPES}",
        )
    backbone = getattr(hf_model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if backbone is None or not all(hasattr(backbone, a) for a in needed):
        return False, f"{type(hf_model).__name__} lacks the Llama module layout ({', '.join(needed)})"
    for layer in backbone.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        attn_parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
        if attn is None or mlp is None or not all(hasattr(attn, a) for a in attn_parts):
            return False, "decoder layer lacks self_attn.{q,k,v,o}_proj"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False, "decoder layer lacks a SwiGLU mlp"
    if getattr(config, "attention_dropout", 0.0):
        return False, "attention_dropout > 0 is not implemented on the fast path"
    return True, ""


def sliding_window_in_use(config) -> int | None:
    """The sliding window the Hugging Face forward would apply, or None.

    Our forwards implement full causal attention, which equals windowed attention only while
    every sequence fits in the window; callers compare their lengths with the returned value.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    uses_window = (
        window is not None
        and (layer_types is None or "sliding_attention" in layer_types)
        and getattr(config, "use_sliding_window", True)
    )
    return window if uses_window else None
