"""A Hugging Face causal LM as (backbone, LM head): what the fused loss takes instead of logits.

``model(input_ids).logits`` is ``lm_head(backbone(input_ids).last_hidden_state)`` for the common
decoder families (Llama, Qwen, Mistral, GPT-2, ...): running the backbone and handing its hidden
states with ``lm_head.weight`` / ``lm_head.bias`` to ``sdft_fast.self_distill_loss`` gives the
same loss as the logits would, without the [tokens, vocab] tensor. Some families change the
logits after the head (Gemma-2's soft-capping, Cohere's logit scale, Granite's divisor) or wrap
the head (a PEFT adapter on ``lm_head``): ``plain_linear_head`` finds out with one tiny forward,
so a caller can fall back to the logits there instead of computing a different loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CausalLMParts(NamedTuple):
    backbone: torch.nn.Module  # input_ids -> .last_hidden_state [B, T, D] (after the final norm)
    weight: torch.Tensor  # [V, D] LM head weight (a Parameter: gradients reach it as usual)
    bias: torch.Tensor | None  # [V]


def causal_lm_parts(model: torch.nn.Module) -> CausalLMParts | None:
    """Backbone and head of a causal LM (a PEFT model is looked through: its adapters stay in the
    backbone's layers), or None when the model has no plain ``nn.Linear`` output layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    backbone, head = get_decoder(), get_head()
    if backbone is None or backbone is base or type(head) is not torch.nn.Linear:
        return None  # no separate decoder, or a wrapped / adapted / custom head
    return CausalLMParts(backbone, head.weight, head.bias)


def last_hidden_states(parts: CausalLMParts, input_ids, attention_mask) -> torch.Tensor:  # [B, T, D]
    return parts.backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state


@torch.no_grad()
def plain_linear_head(model: torch.nn.Module, parts: CausalLMParts | None) -> bool:
    """Whether ``model``'s logits are exactly its head applied to its backbone's output, checked on
    a 4-token probe (to a relative 1e-3 of the largest logit: soft-capping or a logit scale miss
    that by far more)."""
    if parts is None:
        return False
    vocab = parts.weight.shape[0]
    device = parts.weight.device
    probe = (torch.arange(4, device=device) * 7919 % vocab)[None, :]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.eval()
    try:
        # The class's forward: an instance-level wrapper (accelerate's autocast) would compare
        # mixed-precision logits with full-precision hidden states.
        logits = (
            type(base)
            .forward(base, input_ids=probe, attention_mask=torch.ones_like(probe), use_cache=False)
            .logits
        )
        hidden = last_hidden_states(parts, probe, torch.ones_like(probe))
    finally:
        model.train(was_training)
    ours = torch.nn.functional.linear(hidden, parts.weight, parts.bias).float()
    scale = float(logits.float().abs().max()) or 1.0
    return logits.shape == ours.shape and float((logits.float() - ours).abs().max()) <= 1e-3 * scale
