"""Decoding shared by every sampler: argument checks, the stop rule, next-token choice and the
reference decode loop.

``SelfDistillModel.generate`` and :func:`sdft_fast.fast_sampler.fast_generate` have one contract:
one completion per prompt (token ids, no padding), ending with the stop token when one was produced
and nothing after it; greedy or sampled with temperature / top-p / top-k from a
``torch.Generator`` seeded with ``seed``. Both check their arguments with
:func:`check_generate_args` and choose tokens with :func:`pick_next`, so the same seed draws the
same tokens on both paths. :func:`reference_generate` is the plain decode loop over a Hugging Face
forward with its KV cache: the path for models the fast sampler does not cover, and the reference
it is tested against.

Training rollouts and evaluation stop on the same tokens: :func:`stop_token_ids`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn


def check_token_lists(name: str, seqs, vocab_size: int | None, allow_empty: bool) -> None:
    """Raise naming ``name[b][t]`` unless ``seqs`` is a list of lists of in-vocabulary int ids."""
    if not isinstance(seqs, (list, tuple)):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(seqs).__name__}")
    for b, seq in enumerate(seqs):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}[{b}] must be a list of ints, got {type(seq).__name__}")
        if not seq and not allow_empty:
            raise ValueError(
                f"{name}[{b}] is empty: the completion span would start outside the sequence "
                "(completion token 0 is predicted by the last prompt token)"
            )
        for t, tok in enumerate(seq):
            if not isinstance(tok, int) or isinstance(tok, bool):
                raise TypeError(f"{name}[{b}][{t}] must be an int token id, got {tok!r}")
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise ValueError(f"{name}[{b}][{t}] = {tok} is outside the vocabulary [0, {vocab_size})")


def check_generate_args(config, prompts, max_new_tokens, do_sample, temperature, top_p, top_k) -> None:
    """The argument checks of every ``generate`` (``config`` gives the vocabulary size)."""
    check_token_lists("prompts", prompts, getattr(config, "vocab_size", None), allow_empty=False)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")


# ------------------------------------------------------------------------------ stop and pad ids
def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, plus the EOS ids of the model's
    generation config (chat models often end a turn with a token that is not the tokenizer's EOS).

    ``model`` is a Hugging Face model, or anything holding one as ``hf_model``.
    """
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for token_id in eos if isinstance(eos, (list, tuple)) else [eos]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    hf_model = getattr(model, "hf_model", model)
    generation_config = getattr(hf_model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for token_id in [extra] if isinstance(extra, int) else extra or []:
        if int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def as_id_list(token_ids: int | Sequence[int] | None) -> list[int]:
    """``eos_token_id`` as given to ``generate`` (an int, a list, or None) as a list."""
    if token_ids is None:
        return []
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


def pad_token_id(tokenizer, stop_ids: Sequence[int]) -> int | None:
    """The tokenizer's pad id, else the first stop id (it only fills finished rows)."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return int(stop_ids[0]) if stop_ids else None


def fill_id(pad_id: int | None, stop_ids: Sequence[int]) -> int:
    """The id that fills a finished row: pad, else the first stop id, else 0."""
    return pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


# ------------------------------------------------------------------------------ next token
def pick_next(logits, do_sample, temperature, top_p, top_k, generator) -> torch.Tensor:
    """logits [B, V] fp32 -> [B] token ids (argmax, or one draw from the filtered distribution).

    ``torch.multinomial`` draws one exponential per vocabulary entry of every row whatever the
    values, so the rows of a batch never change each other's draws: a finished row may carry any
    valid logits and the random stream stays the same.
    """
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens strictly above it already hold top_p of the mass;
        # the most likely token is always kept.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def trim_finished(new_tokens: list[torch.Tensor]) -> list[list[int]]:
    """Per-step [B] tokens, -1 after a row finished -> one completion per row."""
    tokens = torch.stack(new_tokens, 1).tolist()  # [B, steps]
    return [[t for t in row if t >= 0] for row in tokens]


# ------------------------------------------------------------------------------ reference loop
@torch.no_grad()
def reference_generate(
    hf_model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """The decode loop over a Hugging Face causal LM: left padding, its own KV cache, one
    forward per new token. Whatever LoRA route is active applies (the caller sets it)."""
    check_generate_args(hf_model.config, prompts, max_new_tokens, do_sample, temperature, top_p, top_k)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    stop_ids = as_id_list(eos_token_id)
    pad = fill_id(pad_token_id, stop_ids)
    device = next(hf_model.parameters()).device
    batch, max_len = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, max_len), pad, dtype=torch.long, device=device)  # [B, T] left padded
    attention_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        input_ids[b, max_len - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, max_len - len(p) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generator = make_generator(device, seed)
    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    forward_params = inspect.signature(hf_model.forward).parameters
    cache_kw = "cache" if "cache" in forward_params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
    was_training = hf_model.training
    hf_model.eval()
    try:
        out = hf_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()  # [B, V]
            next_tok = pick_next(logits, do_sample, temperature, top_p, top_k, generator)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
            new_tokens.append(torch.where(finished, torch.full_like(next_tok, -1), next_tok))
            if stop_tensor.numel():
                finished = finished | torch.isin(next_tok, stop_tensor)
            if bool(finished.all()) or len(new_tokens) == max_new_tokens:
                break
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            attention_mask = torch.cat(
                [attention_mask, torch.ones(batch, 1, dtype=torch.long, device=device)], 1
            )
            position_ids = position_ids[:, -1:] + 1
            out = hf_model(
                input_ids=next_tok[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kw: cache},
                **extra,
            )
    finally:
        hf_model.train(was_training)
    return trim_finished(new_tokens)
