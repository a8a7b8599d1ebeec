"""Shared-weight student/teacher around a Hugging Face causal LM.

SDFT needs, for every rollout y of prompt x with demonstration c, the final-norm
hidden states of

    student: the trained model on  x + y          (gradient)
    teacher: the SAME base weights on  x' + y     (x' = teacher prompt with c; no gradient)

at every position that predicts a token of y. :class:`SelfDistillModel`
returns exactly the inputs of ``sdft_fast.loss.self_distill_loss`` (hidden
states + ``lm_head_weight``); it never computes logits.

Two ways to get them, same API and same numbers:

* Fast path (Llama family: llama, qwen2, qwen3, mistral; SmolLM2 is llama).
  Our own forward over the HF modules' weights (RMSNorm, RoPE from the model's
  rotary embedding, grouped-query attention, SwiGLU). Student rows and teacher
  rows are two contiguous segments of ONE packed token stream (batch 1, no
  padding, per-sequence position ids). Every linear layer runs one GEMM over
  both segments (``lora.packed_linear``); the LoRA delta is routed per segment
  (student adapter with grad; EMA adapter / nothing / student adapter without
  grad for the teacher). Each stream is laid out as a prefix tree: a prefix that
  several sequences share (the chat template's system prompt, one prompt with
  several rollouts) is computed once, and the sequences continuing it attend to
  its rows (exact under causal attention; ``prefix_sharing=False`` turns it off).
  Attention is causal within each sequence: flash-attn varlen on CUDA when
  installed, else SDPA per group of equal-shape segments (no padding FLOPs).
  Only student rows enter autograd; teacher rows save nothing for backward.
  The stream is routed by row blocks (student rows first, then teacher rows)
  rather than by a per-token route tensor: the same routing, with no index
  gathers; ``lora.lora_route(tensor)`` remains for HF forwards over mixed batches.
* Generic path (any other ``AutoModelForCausalLM``): a right-padded teacher
  pass under ``torch.no_grad``, then the student pass, through the HF backbone
  with the LoRA route set per pass.

Row layout of :class:`PairHidden`: for completion token j of sequence b, the
row holds the hidden state at the position that PREDICTS it (j = 0: the last
prompt token). The input of sequence b is ``prompt + completion[:-1]``: the
last completion token predicts nothing we score, so it is never fed.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdft_fast.lora import (
    ROUTE_NONE,
    ROUTE_STUDENT,
    ROUTE_TEACHER,
    LoraConfig,
    LoraLinear,
    current_route,
    inject_lora,
    lora_route,
    packed_linear,
    parse_peft_key,
    peft_key,
    peft_target_modules,
)

FAST_PATH_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
TEACHER_MODES = ("ema", "base", "live")


@dataclass
class PairBatch:
    """One batch of rollouts: token ids, no padding, one entry per sequence."""

    student_prompts: list[list[int]]
    teacher_prompts: list[list[int]]
    completions: list[list[int]]


@dataclass
class PairHidden:
    """Hidden states aligned to completion tokens (N = total completion tokens)."""

    student_hidden: torch.Tensor  # [N, D], requires grad when something is trainable
    teacher_hidden: torch.Tensor | None  # [N, D], no grad
    sequence_ids: torch.Tensor  # [N] long, index b of the sequence in the batch
    completion_positions: torch.Tensor  # [N] long, index j of the token in its completion
    targets: torch.Tensor  # [N] long, the completion token ids


def _check_token_lists(name: str, seqs, vocab_size: int | None, allow_empty: bool) -> None:
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
    """The argument checks of ``SelfDistillModel.generate`` (shared with ``sampler.fast_generate``)."""
    _check_token_lists("prompts", prompts, getattr(config, "vocab_size", None), allow_empty=False)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}")


def _norm_eps(norm: nn.Module) -> float:
    # HF's Llama-family RMSNorm calls it variance_epsilon; other norms call it eps.
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as HF's LlamaRMSNorm: normalise in fp32, scale in the input dtype.
    input_dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(input_dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [N, H, hd]; cos/sin [N, hd] (already scaled by the rotary embedding's attention_scaling).
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_varlen_func


# Shorter common prefixes are recomputed per sequence: sharing a handful of tokens saves less
# than the extra attention call of one more segment costs.
MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class _Segment:
    """A run of rows computed once: queries at rows [start, start + length).

    ``key_rows`` are the rows its queries attend to, in position order: the rows of the
    segments it continues (its shared prefix), then its own rows, causal over the own part.
    """

    start: int
    length: int
    key_rows: tuple[int, ...]


class _Stream:
    """One packed token stream (student or teacher), laid out as a prefix tree.

    Sequences that begin with the same tokens (the chat template's system prompt; the same
    prompt sampled several times) share rows: the common prefix is computed once and every
    sequence that continues it attends to those rows. Exact under causal attention, where a
    position's hidden state depends only on the tokens up to it; gradients from every sequence
    that reads a shared row add up on it. ``min_shared=0`` turns sharing off (one segment per
    sequence, the plain block-diagonal layout).
    """

    def __init__(
        self,
        seqs: list[list[int]],
        prompt_lens: list[int],
        completion_lens: list[int],
        device,
        min_shared: int = MIN_SHARED_PREFIX,
    ):
        tokens: list[int] = []
        positions: list[int] = []
        self.segments: list[_Segment] = []
        paths: list[tuple[int, ...]] = [()] * len(seqs)  # the rows of each sequence, position by position

        def add_segment(prefix_rows: tuple[int, ...], seq: list[int], depth: int, length: int):
            start = len(tokens)
            tokens.extend(seq[depth : depth + length])
            positions.extend(range(depth, depth + length))
            rows = prefix_rows + tuple(range(start, start + length))
            self.segments.append(_Segment(start, length, rows))
            return rows

        def build(group: list[int], depth: int, prefix_rows: tuple[int, ...]) -> None:
            # Every sequence of `group` starts with the `depth` tokens already laid out at prefix_rows.
            if len(group) == 1 or min_shared <= 0:
                for b in group:
                    rest = len(seqs[b]) - depth
                    paths[b] = add_segment(prefix_rows, seqs[b], depth, rest) if rest > 0 else prefix_rows
                return
            first = seqs[group[0]]
            limit = min(len(seqs[b]) for b in group) - depth
            common = 0
            while common < limit and all(seqs[b][depth + common] == first[depth + common] for b in group):
                common += 1
            if common >= min_shared:
                prefix_rows = add_segment(prefix_rows, first, depth, common)
                depth += common
                common = 0
            # Split where the sequences first differ; each subgroup shares a longer prefix than
            # `group` (or starts a new shared segment), so the recursion ends.
            split = depth + common
            subgroups: dict[int, list[int]] = {}
            for b in group:
                if len(seqs[b]) == split:
                    build([b], depth, prefix_rows)
                else:
                    subgroups.setdefault(seqs[b][split], []).append(b)
            for sub in subgroups.values():
                build(sub, depth, prefix_rows)

        build(list(range(len(seqs))), 0, ())
        self.input_ids = torch.tensor(tokens, dtype=torch.long, device=device)  # [Ns] unique rows
        self.position_ids = torch.tensor(positions, dtype=torch.long, device=device)  # [Ns]
        gather: list[int] = []
        for path, p, c in zip(paths, prompt_lens, completion_lens):
            gather.extend(path[p - 1 : p - 1 + c])
        self.gather_rows = torch.tensor(gather, dtype=torch.long, device=device)  # [N]
        self.attention = _AttentionPlan(self.segments, device)


@dataclass(frozen=True)
class _AttentionGroup:
    """Segments of one (query, key) length pair: one [G, H, Lq, hd] SDPA call."""

    length: int  # Lq
    key_length: int  # Lk
    count: int  # G
    first: int | None  # start row when the group is G back-to-back segments without a prefix (a view)
    rows: torch.Tensor  # [G*Lq] query rows
    key_rows: torch.Tensor | None  # [G*Lk] key rows (None with `first`)
    mask: torch.Tensor | None  # [Lq, Lk] bottom-right causal; None when Lq == Lk (is_causal)


class _AttentionPlan:
    """Index tensors for :func:`prefix_tree_attention`, built once per stream and reused by every
    layer: they depend on the stream's segments only."""

    def __init__(self, segments: list[_Segment], device):
        self.num_rows = sum(s.length for s in segments)
        # flash-attn varlen: queries are the rows in order; keys gathered per segment when shared
        lengths = [s.length for s in segments]
        self.shared = any(len(s.key_rows) != s.length for s in segments)
        self.cu_q = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        self.max_q = max(lengths)
        key_lengths = [len(s.key_rows) for s in segments]
        self.cu_k = torch.tensor([0, *itertools.accumulate(key_lengths)], dtype=torch.int32, device=device)
        self.max_k = max(key_lengths)
        self.key_index = (
            torch.tensor([r for s in segments for r in s.key_rows], device=device) if self.shared else None
        )
        # SDPA: segments of equal (query, key) lengths form one batch: no padding, few calls
        by_shape: dict[tuple[int, int], list[_Segment]] = {}
        for segment in segments:
            by_shape.setdefault((segment.length, len(segment.key_rows)), []).append(segment)
        self.groups: list[_AttentionGroup] = []
        for (length, key_length), group in by_shape.items():
            g, first = len(group), group[0].start
            back_to_back = key_length == length and all(
                s.start == first + i * length for i, s in enumerate(group)
            )
            if back_to_back:
                rows = torch.arange(first, first + g * length, device=device)
                key_rows = None
            else:
                rows = (
                    torch.tensor([s.start for s in group], device=device)[:, None]
                    + torch.arange(length, device=device)
                ).reshape(-1)
                key_rows = torch.tensor([s.key_rows for s in group], device=device).reshape(-1)
            mask = (
                None
                if key_length == length
                else torch.ones(length, key_length, dtype=torch.bool, device=device).tril(key_length - length)
            )
            self.groups.append(
                _AttentionGroup(length, key_length, g, first if back_to_back else None, rows, key_rows, mask)
            )
        # One group holds every segment in row order: its output rows are already in order.
        self.inverse = None
        if len(self.groups) > 1:
            self.inverse = torch.empty(self.num_rows, dtype=torch.long, device=device)
            self.inverse[torch.cat([group.rows for group in self.groups])] = torch.arange(
                self.num_rows, device=device
            )


def prefix_tree_attention(
    q: torch.Tensor,  # [N, Hq, hd]
    k: torch.Tensor,  # [N, Hkv, hd]
    v: torch.Tensor,  # [N, Hkv, hd]
    plan: _AttentionPlan,  # of the stream's segments (in row order, covering the N rows)
    scaling: float,
) -> torch.Tensor:  # [N, Hq, hd]
    """Causal attention over a packed prefix tree (see :class:`_Stream`).

    Each segment's queries attend to its shared-prefix rows and causally to its own rows, i.e.
    causal attention aligned to the bottom right of its [length, len(key_rows)] block. With no
    shared prefixes this is block-diagonal causal attention over sequences packed back to back.
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    flash = _flash_attn_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        if plan.shared:  # flash-attn >= 2.1 aligns the causal mask to the bottom right, as needed here
            k, v = k[plan.key_index], v[plan.key_index]
        return flash(
            q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, softmax_scale=scaling, causal=True
        )
    # SDPA's enable_gqa keeps the fused CPU kernel and saves the un-repeated K/V for backward.
    gqa = {"enable_gqa": True} if n_kv_heads != n_heads else {}
    pieces = []
    for group in plan.groups:
        g, length, key_length = group.count, group.length, group.key_length
        if group.first is not None:  # back-to-back segments without a prefix: a view, no gather copy
            qg, kg, vg = (t[group.first : group.first + g * length] for t in (q, k, v))
        else:
            qg, kg, vg = q[group.rows], k[group.key_rows], v[group.key_rows]
        qg = qg.view(g, length, n_heads, -1).transpose(1, 2)  # [G, H, Lq, hd]
        kg = kg.view(g, key_length, n_kv_heads, -1).transpose(1, 2)  # [G, Hkv, Lk, hd]
        vg = vg.view(g, key_length, n_kv_heads, -1).transpose(1, 2)
        if group.mask is None:
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scaling, **gqa)
        else:  # bottom-right causal: query i sees every prefix key and its own keys up to i
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scaling, **gqa)
        pieces.append(out.transpose(1, 2).reshape(g * length, n_heads, -1))  # [G*Lq, H, hd]
    if plan.inverse is None:
        return pieces[0]
    return torch.cat(pieces)[plan.inverse]


class _SiluGateMul(torch.autograd.Function):
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


def _gated_activation(
    mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, hidden_act: str | None
) -> torch.Tensor:
    if hidden_act == "silu" and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluGateMul.apply(gate, up)
    return mlp.act_fn(gate) * up


class SelfDistillModel(nn.Module):
    """Student and teacher sharing one HF causal LM's weights (see module docstring)."""

    def __init__(self, hf_causal_lm: nn.Module, lora: LoraConfig | None = None, teacher: str = "ema"):
        super().__init__()
        if teacher not in TEACHER_MODES:
            raise ValueError(f"teacher must be one of {TEACHER_MODES}, got {teacher!r}")
        if lora is not None and not isinstance(lora, LoraConfig):
            raise TypeError(f"lora must be a LoraConfig or None, got {type(lora).__name__}")
        self.hf_model = hf_causal_lm
        self.lora_config = lora
        self.teacher_mode = teacher
        self.lora_layers: dict[str, LoraLinear] = {}
        # Full fine-tuning with an ema/base teacher needs its own copy of the weights
        # (there is nothing to share): {parameter name: tensor}.
        self._teacher_params: dict[str, torch.Tensor] = {}
        if lora is not None:
            self.lora_layers = inject_lora(hf_causal_lm, lora)
            if teacher == "ema":
                for layer in self.lora_layers.values():
                    layer.init_teacher_slot()
        else:
            for p in hf_causal_lm.parameters():
                p.requires_grad_(True)
            if teacher in ("ema", "base"):
                self._teacher_params = {
                    name: p.detach().clone() for name, p in hf_causal_lm.named_parameters()
                }
        self._teacher_by_param_id = {
            id(p): self._teacher_params[name]
            for name, p in hf_causal_lm.named_parameters()
            if name in self._teacher_params
        }
        # Fast path: compute prefixes shared by several sequences of a stream once (exact; see _Stream).
        self.prefix_sharing = True
        # generate(): our merged-weight KV-cache sampler (sdft_fast.sampler) where it supports the
        # model, else the Hugging Face forward per token. Same contract and random stream.
        self.fast_sampling = True
        self.fast_path, reason = self._fast_path_support()
        self._fallback_reason = reason
        self._warned_fallback = False
        if not self.fast_path:
            self._warn_fallback(reason)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        lora: LoraConfig | None = None,
        teacher: str = "ema",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> SelfDistillModel:
        from transformers import AutoModelForCausalLM

        if not os.path.isdir(path):
            raise FileNotFoundError(f"model path {str(path)!r} is not a local directory (no hub downloads)")
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            hf_model = AutoModelForCausalLM.from_pretrained(
                path, torch_dtype=dtype, trust_remote_code=trust_remote_code
            )
        return cls(hf_model.to(device), lora=lora, teacher=teacher)

    def _fast_path_support(self) -> tuple[bool, str]:
        config = self.hf_model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in FAST_PATH_MODEL_TYPES:
            return (
                False,
                f"model_type {model_type!r} is not in the fast path's Llama family {FAST_PATH_MODEL_TYPES}",
            )
        backbone = getattr(self.hf_model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if backbone is None or not all(hasattr(backbone, a) for a in needed):
            return (
                False,
                f"{type(self.hf_model).__name__} lacks the Llama module layout ({', '.join(needed)})",
            )
        for layer in backbone.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if (
                attn is None
                or mlp is None
                or not all(
                    hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
                )
            ):
                return False, "decoder layer lacks self_attn.{q,k,v,o}_proj"
            if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return False, "decoder layer lacks a SwiGLU mlp"
        if getattr(config, "attention_dropout", 0.0):
            return False, "attention_dropout > 0 is not implemented on the fast path"
        return True, ""

    def _warn_fallback(self, reason: str) -> None:
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(
                f"SelfDistillModel: packed one-pass fast path not used ({reason}); "
                "using the generic two-pass path (teacher no-grad pass, then student pass)",
                stacklevel=3,
            )

    # -- properties ----------------------------------------------------------------------
    @property
    def config(self):
        return self.hf_model.config

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def lm_head_weight(self) -> torch.Tensor:  # [V, D]
        return self.hf_model.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:  # [V]
        return getattr(self.hf_model.get_output_embeddings(), "bias", None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.lora_config is not None:
            return [p for layer in self.lora_layers.values() for p in (layer.lora_A, layer.lora_B)]
        return [p for p in self.hf_model.parameters() if p.requires_grad]

    # -- input checks ----------------------------------------------------------------------
    def _check_lengths(self, name: str, prompts, completions) -> None:
        max_positions = getattr(self.config, "max_position_embeddings", None) or getattr(
            self.config, "n_positions", None
        )
        if max_positions is None:
            return
        for b, (p, c) in enumerate(zip(prompts, completions)):
            if len(p) + len(c) - 1 > max_positions:
                raise ValueError(
                    f"{name}[{b}] + completions[{b}] has {len(p) + len(c) - 1} input tokens, more than the "
                    f"model's max_position_embeddings={max_positions}"
                )

    def _validate(self, student_prompts, teacher_prompts, completions) -> None:
        vocab = getattr(self.config, "vocab_size", None)
        if not isinstance(completions, (list, tuple)) or not isinstance(student_prompts, (list, tuple)):
            raise TypeError("student_prompts and completions must be lists of token-id lists")
        if len(student_prompts) != len(completions):
            raise ValueError(
                f"batch size mismatch: {len(student_prompts)} student_prompts vs {len(completions)} completions"
            )
        if teacher_prompts is not None and len(teacher_prompts) != len(completions):
            raise ValueError(
                f"batch size mismatch: {len(teacher_prompts)} teacher_prompts vs {len(completions)} completions"
            )
        _check_token_lists("student_prompts", student_prompts, vocab, allow_empty=False)
        _check_token_lists("completions", completions, vocab, allow_empty=True)
        self._check_lengths("student_prompts", student_prompts, completions)
        if teacher_prompts is not None:
            _check_token_lists("teacher_prompts", teacher_prompts, vocab, allow_empty=False)
            self._check_lengths("teacher_prompts", teacher_prompts, completions)

    def _use_fast_path(self, lengths: list[int]) -> bool:
        if not self.fast_path:
            return False
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        uses_window = (
            window is not None
            and (layer_types is None or "sliding_attention" in layer_types)
            and getattr(self.config, "use_sliding_window", True)
        )
        if uses_window and max(lengths, default=0) > window:
            self._warn_fallback(f"a sequence is longer than sliding_window={window}")
            return False
        return True

    # -- public forward API ----------------------------------------------------------------
    def forward_pair(self, batch: PairBatch) -> PairHidden:
        """Student (grad) and teacher (no grad) hidden states aligned to completion tokens."""
        if not isinstance(batch, PairBatch):
            raise TypeError(f"forward_pair takes a PairBatch, got {type(batch).__name__}")
        self._validate(batch.student_prompts, batch.teacher_prompts, batch.completions)
        return self._forward(batch.student_prompts, batch.teacher_prompts, batch.completions)

    def forward_student(self, student_prompts: list[list[int]], completions: list[list[int]]) -> PairHidden:
        """Student hidden states only (teacher_hidden=None); e.g. for SFT or importance ratios."""
        self._validate(student_prompts, None, completions)
        return self._forward(student_prompts, None, completions)

    def forward(self, batch: PairBatch) -> PairHidden:
        return self.forward_pair(batch)

    def _forward(self, student_prompts, teacher_prompts, completions) -> PairHidden:
        device = self.device
        keep = [b for b, c in enumerate(completions) if len(c) > 0]  # empty completions give no rows
        comp = [list(completions[b]) for b in keep]
        s_prompts = [list(student_prompts[b]) for b in keep]
        t_prompts = None if teacher_prompts is None else [list(teacher_prompts[b]) for b in keep]
        completion_lens = [len(c) for c in comp]
        sequence_ids = torch.tensor(
            [b for b, n in zip(keep, completion_lens) for _ in range(n)], dtype=torch.long, device=device
        )
        completion_positions = torch.tensor(
            [j for n in completion_lens for j in range(n)], dtype=torch.long, device=device
        )
        targets = torch.tensor([t for c in comp for t in c], dtype=torch.long, device=device)
        if not keep:
            d = self.config.hidden_size
            empty = torch.zeros(0, d, dtype=self.dtype, device=device)
            return PairHidden(
                empty.requires_grad_(any(p.requires_grad for p in self.trainable_parameters())),
                None if teacher_prompts is None else empty.clone(),
                sequence_ids,
                completion_positions,
                targets,
            )
        # The last completion token predicts nothing we score: feed prompt + completion[:-1].
        s_seqs = [p + c[:-1] for p, c in zip(s_prompts, comp)]
        t_seqs = None if t_prompts is None else [p + c[:-1] for p, c in zip(t_prompts, comp)]
        lengths = [len(s) for s in s_seqs] + ([len(s) for s in t_seqs] if t_seqs else [])
        if self._use_fast_path(lengths):
            min_shared = MIN_SHARED_PREFIX if self.prefix_sharing else 0
            student_stream = _Stream(s_seqs, [len(p) for p in s_prompts], completion_lens, device, min_shared)
            teacher_stream = (
                None
                if t_seqs is None
                else _Stream(t_seqs, [len(p) for p in t_prompts], completion_lens, device, min_shared)
            )
            student_hidden, teacher_hidden = self._packed_forward(student_stream, teacher_stream)
        else:
            teacher_hidden = None
            if t_seqs is not None:
                with torch.no_grad():
                    teacher_hidden = self._generic_hidden(
                        t_seqs, [len(p) for p in t_prompts], completion_lens, teacher=True
                    )
            student_hidden = self._generic_hidden(
                s_seqs, [len(p) for p in s_prompts], completion_lens, teacher=False
            )
        return PairHidden(student_hidden, teacher_hidden, sequence_ids, completion_positions, targets)

    # -- teacher plumbing ---------------------------------------------------------------------
    @property
    def _teacher_lora_route(self) -> int:
        return {"ema": ROUTE_TEACHER, "base": ROUTE_NONE, "live": ROUTE_STUDENT}[self.teacher_mode]

    def _teacher_weight(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """The teacher's value of a (non-LoRA) parameter: its own copy, or the shared one detached."""
        if param is None:
            return None
        return self._teacher_by_param_id.get(id(param), param).detach()

    # -- fast path ----------------------------------------------------------------------------
    def _pair_linear(self, module: nn.Module, student_x, teacher_x, student_slot: int):
        # student_x [Ns, in]; teacher_x [Nt, in] or None -> ([Ns, out], [Nt, out] | None)
        if isinstance(module, LoraLinear):
            if teacher_x is None:
                student_y = module.base(student_x)
                delta = module.routed_delta(student_x, student_slot)
                return (student_y if delta is None else student_y + delta), None
            return module.forward_pair(student_x, teacher_x, self._teacher_lora_route, student_slot)
        if teacher_x is None:
            return module(student_x), None
        if id(module.weight) not in self._teacher_by_param_id:
            return packed_linear(student_x, teacher_x, module.weight, module.bias)
        # Full fine-tuning with its own teacher weights: nothing shared, two GEMMs.
        with torch.no_grad():
            teacher_y = F.linear(
                teacher_x, self._teacher_weight(module.weight), self._teacher_weight(module.bias)
            )
        return module(student_x), teacher_y

    def _fused_pair_linear(self, modules: list[nn.Module], student_x, teacher_x, student_slot: int):
        """Several linear layers that read the same input (q/k/v; gate/up) as ONE wider layer.

        One base GEMM over the concatenated weights instead of one per layer, one input concat,
        one LoRA-A GEMM per row block; the backward's input gradient is one GEMM too. Only for
        LoRA layers over frozen, shared base weights without dropout; anything else goes layer
        by layer. Returns ([Ns, out_i] per layer, [Nt, out_i] per layer or Nones).
        """
        fusable = all(
            isinstance(m, LoraLinear) and not m.fan_in_fan_out and not (m.dropout_p > 0 and m.training)
            for m in modules
        )
        if not fusable:
            pairs = [self._pair_linear(m, student_x, teacher_x, student_slot) for m in modules]
            return [s for s, _ in pairs], [t for _, t in pairs]
        outs = [m.out_features for m in modules]
        weight = torch.cat([m.base.weight for m in modules])  # [sum out, in], frozen
        bias = None
        if any(m.base.bias is not None for m in modules):
            bias = torch.cat(
                [
                    m.base.bias if m.base.bias is not None else weight.new_zeros(m.out_features)
                    for m in modules
                ]
            )

        def delta(x, slot):  # [N, in] -> [N, sum out] | None
            if slot == ROUTE_NONE:
                return None
            factors = [(m.lora_A, m.lora_B) if slot == ROUTE_STUDENT else (m.ema_A, m.ema_B) for m in modules]
            if any(a is None for a, _ in factors):
                raise RuntimeError("teacher route used but a LoRA layer has no EMA teacher slot")
            low = F.linear(x, torch.cat([a for a, _ in factors]))  # [N, sum r]
            parts = low.split([a.shape[0] for a, _ in factors], dim=1)
            return torch.cat(
                [F.linear(part, b) * m.scaling for part, (_, b), m in zip(parts, factors, modules)], dim=1
            )

        student_delta = delta(student_x, student_slot)
        if teacher_x is None:
            student_y = F.linear(student_x, weight, bias)
            teacher_y = None
        else:
            student_y, teacher_y = packed_linear(
                student_x, teacher_x, weight, bias, own_student_storage=student_delta is None
            )
            with torch.no_grad():
                teacher_delta = delta(teacher_x, self._teacher_lora_route)
                if teacher_delta is not None:
                    teacher_y = teacher_y + teacher_delta
        if student_delta is not None:
            student_y = student_y + student_delta
        return (
            list(student_y.split(outs, dim=1)),
            [None] * len(modules) if teacher_y is None else list(teacher_y.split(outs, dim=1)),
        )

    def _pair_norm(self, norm: nn.Module, student_x, teacher_x):
        eps = _norm_eps(norm)
        return _rms_norm(student_x, norm.weight, eps), self._teacher_norm(norm, teacher_x)

    @torch.no_grad()
    def _teacher_norm(self, norm: nn.Module, teacher_x):
        if teacher_x is None:
            return None
        eps = _norm_eps(norm)
        return _rms_norm(teacher_x, self._teacher_weight(norm.weight), eps)

    def _packed_forward(self, student: _Stream, teacher: _Stream | None):
        """Our Llama-family forward over the packed student (+ teacher) stream.

        Shapes: Ns / Nt packed tokens, D hidden, H / Hkv heads, hd head dim.
        Teacher tensors never require grad: the packed GEMM marks them constant,
        every other teacher op runs under no_grad with detached weights.
        """
        backbone = self.hf_model.model
        # The student stream follows the active LoRA route: the student adapter, or none
        # inside adapters_disabled(). A per-token route tensor has no meaning here.
        route = current_route()
        if isinstance(route, torch.Tensor):
            raise ValueError(
                "the packed fast path routes student/teacher rows itself; do not set a per-token route"
            )
        student_slot = route

        def pair_linear(module, student_x, teacher_x):
            return self._pair_linear(module, student_x, teacher_x, student_slot)

        embed_w = backbone.embed_tokens.weight  # [V, D]
        student_h = F.embedding(student.input_ids, embed_w)  # [Ns, D]
        teacher_h = None
        with torch.no_grad():
            if teacher is not None:
                teacher_h = F.embedding(teacher.input_ids, self._teacher_weight(embed_w))  # [Nt, D]
            # cos/sin [N, hd] from the model's own rotary embedding (handles rope scaling types).
            cos_s, sin_s = (t[0] for t in backbone.rotary_emb(student_h, student.position_ids[None]))
            if teacher is not None:
                cos_t, sin_t = (t[0] for t in backbone.rotary_emb(teacher_h, teacher.position_ids[None]))
        n_layers = self.config.num_hidden_layers
        for layer in backbone.layers[:n_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
            head_dim = attn.head_dim
            # --- attention block
            xs, xt = self._pair_norm(layer.input_layernorm, student_h, teacher_h)
            (qs, ks, vs), (qt, kt, vt) = self._fused_pair_linear(
                [attn.q_proj, attn.k_proj, attn.v_proj], xs, xt, student_slot
            )
            qs, ks, vs = (
                qs.view(-1, heads, head_dim),
                ks.view(-1, kv_heads, head_dim),
                vs.view(-1, kv_heads, head_dim),
            )
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                qs, _ = self._pair_norm(attn.q_norm, qs, None)
                ks, _ = self._pair_norm(attn.k_norm, ks, None)
            qs, ks = _apply_rope(qs, cos_s, sin_s), _apply_rope(ks, cos_s, sin_s)
            attn_s = prefix_tree_attention(qs, ks, vs, student.attention, attn.scaling).reshape(
                -1, heads * head_dim
            )
            attn_t = None
            if teacher is not None:
                with torch.no_grad():
                    qt, kt, vt = (
                        qt.view(-1, heads, head_dim),
                        kt.view(-1, kv_heads, head_dim),
                        vt.view(-1, kv_heads, head_dim),
                    )
                    if hasattr(attn, "q_norm"):
                        qt, kt = self._teacher_norm(attn.q_norm, qt), self._teacher_norm(attn.k_norm, kt)
                    qt, kt = _apply_rope(qt, cos_t, sin_t), _apply_rope(kt, cos_t, sin_t)
                    attn_t = prefix_tree_attention(qt, kt, vt, teacher.attention, attn.scaling).reshape(
                        -1, heads * head_dim
                    )
            os_, ot = pair_linear(attn.o_proj, attn_s, attn_t)
            student_h = student_h + os_
            if teacher is not None:
                teacher_h = teacher_h + ot
            # --- SwiGLU MLP block
            xs, xt = self._pair_norm(layer.post_attention_layernorm, student_h, teacher_h)
            (gs, us), (gt, ut) = self._fused_pair_linear([mlp.gate_proj, mlp.up_proj], xs, xt, student_slot)
            hidden_act = getattr(self.config, "hidden_act", None)
            ms = _gated_activation(mlp, gs, us, hidden_act)
            mt = None
            if teacher is not None:
                with torch.no_grad():
                    mt = _gated_activation(mlp, gt, ut, hidden_act)
            ds, dt = pair_linear(mlp.down_proj, ms, mt)
            student_h = student_h + ds
            if teacher is not None:
                teacher_h = teacher_h + dt
        # Final norm only on the rows that predict completion tokens.
        student_out, teacher_out = self._pair_norm(
            backbone.norm,
            student_h[student.gather_rows],
            None if teacher is None else teacher_h[teacher.gather_rows],
        )
        return student_out, teacher_out

    # -- generic path ---------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        backbone = getattr(self.hf_model, "base_model", None)
        if backbone is None or backbone is self.hf_model:
            raise TypeError(
                f"{type(self.hf_model).__name__} exposes no backbone (base_model) for hidden states"
            )
        return backbone

    def _generic_hidden(self, seqs, prompt_lens, completion_lens, teacher: bool) -> torch.Tensor:
        """Right-padded HF backbone forward; rows that predict completion tokens. [N, D]"""
        device = self.device
        max_len = max(len(s) for s in seqs)
        input_ids = torch.zeros(len(seqs), max_len, dtype=torch.long, device=device)  # [B, T]
        attention_mask = torch.zeros(len(seqs), max_len, dtype=torch.long, device=device)
        for b, s in enumerate(seqs):
            input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[b, : len(s)] = 1
        position_ids = torch.arange(max_len, device=device)[None].expand(len(seqs), -1)
        batch_rows = torch.tensor([b for b, n in enumerate(completion_lens) for _ in range(n)], device=device)
        time_rows = torch.tensor(
            [p - 1 + j for p, n in zip(prompt_lens, completion_lens) for j in range(n)], device=device
        )
        kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        backbone = self._backbone()
        route = self._teacher_lora_route if teacher else current_route()
        with lora_route(route):
            if teacher and self._teacher_params:
                prefix = self.hf_model.base_model_prefix + "."
                params = {
                    k[len(prefix) :]: v for k, v in self._teacher_params.items() if k.startswith(prefix)
                }
                out = torch.func.functional_call(backbone, params, args=(), kwargs=kwargs, strict=False)
            else:
                out = backbone(**kwargs)
        hidden = out.last_hidden_state  # [B, T, D]
        return hidden[batch_rows, time_rows]

    # -- EMA teacher -------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(self, rate: float) -> None:
        """teacher <- (1 - rate) teacher + rate student, on the trainable parameters.

        With LoRA this is factor-wise (A and B separately); see ``sdft_fast.lora``.
        """
        if self.teacher_mode != "ema":
            raise RuntimeError(
                f"ema_update needs teacher='ema', this model has teacher={self.teacher_mode!r}"
            )
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"ema rate must be in [0, 1], got {rate!r}")
        if self.lora_config is not None:
            for layer in self.lora_layers.values():
                layer.ema_update(rate)
        else:
            for name, p in self.hf_model.named_parameters():
                self._teacher_params[name].lerp_(p.detach(), rate)

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA teacher's own tensors (empty for 'base'/'live' teachers: nothing to save)."""
        if self.teacher_mode != "ema":
            return {}
        if self.lora_config is not None:
            out = {}
            for path, layer in self.lora_layers.items():
                out[f"{path}.ema_A"] = layer.ema_A.detach().clone()
                out[f"{path}.ema_B"] = layer.ema_B.detach().clone()
            return out
        return {name: t.clone() for name, t in self._teacher_params.items()}

    @torch.no_grad()
    def load_teacher_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = self.teacher_state_dict()
        _check_state_keys("teacher state dict", expected, state_dict)
        if self.lora_config is not None:
            for path, layer in self.lora_layers.items():
                layer.ema_A.copy_(state_dict[f"{path}.ema_A"])
                layer.ema_B.copy_(state_dict[f"{path}.ema_B"])
        else:
            for name, t in self._teacher_params.items():
                t.copy_(state_dict[name])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if self.lora_config is not None:
            out = {}
            for path, layer in self.lora_layers.items():
                out[f"{path}.lora_A"] = layer.lora_A.detach().clone()
                out[f"{path}.lora_B"] = layer.lora_B.detach().clone()
            return out
        return {name: p.detach().clone() for name, p in self.hf_model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        _check_state_keys("trainable state dict", expected, state_dict)
        if self.lora_config is not None:
            for path, layer in self.lora_layers.items():
                layer.lora_A.copy_(state_dict[f"{path}.lora_A"])
                layer.lora_B.copy_(state_dict[f"{path}.lora_B"])
        else:
            for name, p in self.hf_model.named_parameters():
                if name in state_dict:
                    p.copy_(state_dict[name])

    # -- adapters off ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model for the duration of the block (LoRA delta off).

        Full fine-tuning has no adapter: there it swaps in the frozen base copy
        (teacher='base' keeps one) and swaps the trained weights back afterwards.
        """
        if self.lora_config is not None:
            with lora_route(ROUTE_NONE):
                yield
            return
        if self.teacher_mode != "base":
            raise RuntimeError(
                "adapters_disabled() with full fine-tuning needs teacher='base' (the only mode that keeps the base weights)"
            )
        saved = {}
        params = dict(self.hf_model.named_parameters())
        try:
            with torch.no_grad():
                for name, base in self._teacher_params.items():
                    saved[name] = params[name].detach().clone()
                    params[name].copy_(base)
            yield
        finally:
            with torch.no_grad():
                for name, trained in saved.items():
                    params[name].copy_(trained)

    # -- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
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
        """Batched sampling from the student, KV cache.

        Llama-family models go through ``sdft_fast.sampler.fast_generate`` (student delta merged
        into a per-call copy of the weights, our own decode loop); others, or
        ``fast_sampling=False``, through the HF forward with the adapter active and left padding.

        Returns one completion per prompt, including the EOS token when one was
        produced and nothing after it.
        """
        check_generate_args(self.config, prompts, max_new_tokens, do_sample, temperature, top_p, top_k)
        if not prompts or max_new_tokens == 0:
            return [[] for _ in prompts]
        if self.fast_sampling:
            from sdft_fast.sampler import fast_generate, supports_fast_generate

            supported, _ = supports_fast_generate(self, max(len(p) for p in prompts) + max_new_tokens)
            if supported:
                return fast_generate(
                    self,
                    prompts,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    seed=seed,
                )
        eos_ids = (
            []
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        device = self.device
        batch, max_len = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, max_len), pad, dtype=torch.long, device=device)  # [B, T] left padded
        attention_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            input_ids[b, max_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, max_len - len(p) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens = []
        forward_params = inspect.signature(self.hf_model.forward).parameters
        cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params else {}
        was_training = self.hf_model.training
        self.hf_model.eval()
        try:
            with lora_route(ROUTE_STUDENT):
                out = self.hf_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **extra,
                )
                for _ in range(max_new_tokens):
                    logits = out.logits[:, -1, :].float()  # [B, V]
                    next_tok = self._pick_next(logits, do_sample, temperature, top_p, top_k, generator)
                    next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
                    new_tokens.append(torch.where(finished, torch.full_like(next_tok, -1), next_tok))
                    if eos_tensor.numel():
                        finished = finished | torch.isin(next_tok, eos_tensor)
                    if bool(finished.all()) or len(new_tokens) == max_new_tokens:
                        break
                    cache = (
                        out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
                    )
                    attention_mask = torch.cat(
                        [attention_mask, torch.ones(batch, 1, dtype=torch.long, device=device)], 1
                    )
                    position_ids = position_ids[:, -1:] + 1
                    out = self.hf_model(
                        input_ids=next_tok[:, None],
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        use_cache=True,
                        **{cache_kw: cache},
                        **extra,
                    )
        finally:
            self.hf_model.train(was_training)
        tokens = torch.stack(new_tokens, 1).tolist()  # [B, steps]; -1 after a sequence finished
        return [[t for t in row if t >= 0] for row in tokens]

    @staticmethod
    def _pick_next(logits, do_sample, temperature, top_p, top_k, generator) -> torch.Tensor:
        # logits [B, V] fp32 -> [B] token ids
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

    # -- save / load ------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Student adapter in PEFT format (or the full weights when lora=None). Safetensors only."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        if self.lora_config is None:
            self.hf_model.save_pretrained(directory, safe_serialization=True)
            return
        tensors = {}
        for path, layer in self.lora_layers.items():
            tensors[peft_key(path, "A")] = layer.lora_A.detach().contiguous().cpu()
            tensors[peft_key(path, "B")] = layer.lora_B.detach().contiguous().cpu()
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = self.lora_config
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(self.config, "_name_or_path", None) or None,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": peft_target_modules(self.hf_model, list(self.lora_layers)),
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in self.lora_layers.values()),
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2)

    @torch.no_grad()
    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT LoRA adapter (ours or PEFT's) into the student slot; or full weights when lora=None."""
        from safetensors.torch import load_file

        if self.lora_config is None:
            weights_path = os.path.join(directory, "model.safetensors")
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(
                    f"{weights_path} not found (full fine-tuning saves model.safetensors)"
                )
            state = load_file(weights_path, device=str(self.device))
            params = dict(self.hf_model.named_parameters())
            missing = [n for n in params if n not in state]
            if missing:
                raise ValueError(
                    f"{weights_path} lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}"
                )
            for name, p in params.items():
                p.copy_(state[name])
            return
        config_path = os.path.join(directory, "adapter_config.json")
        weights_path = os.path.join(directory, "adapter_model.safetensors")
        for needed in (config_path, weights_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f"{needed} not found (a PEFT adapter folder has adapter_config.json + adapter_model.safetensors)"
                )
        with open(config_path) as f:
            adapter_config = json.load(f)
        if adapter_config.get("peft_type") != "LORA":
            raise ValueError(f"{config_path}: peft_type {adapter_config.get('peft_type')!r} is not 'LORA'")
        if adapter_config.get("r") != self.lora_config.r or float(adapter_config.get("lora_alpha")) != float(
            self.lora_config.alpha
        ):
            raise ValueError(
                f"{config_path}: r={adapter_config.get('r')}, lora_alpha={adapter_config.get('lora_alpha')} differ from this "
                f"model's LoraConfig r={self.lora_config.r}, alpha={self.lora_config.alpha}"
            )
        if adapter_config.get("use_rslora") or adapter_config.get("use_dora"):
            raise ValueError(f"{config_path}: rsLoRA / DoRA adapters are not supported")
        state = load_file(weights_path)
        seen = set()
        for key, tensor in state.items():
            path, factor = parse_peft_key(key.replace(".default.", "."))
            layer = self.lora_layers.get(path)
            if layer is None:
                raise ValueError(
                    f"{weights_path}: key {key!r} names module {path!r}, which has no LoRA layer here"
                )
            target = layer.lora_A if factor == "A" else layer.lora_B
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{weights_path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            seen.add((path, factor))
        missing = [p for p in self.lora_layers if (p, "A") not in seen or (p, "B") not in seen]
        if missing:
            raise ValueError(f"{weights_path} has no factors for LoRA layers {missing[:5]}")

    @torch.no_grad()
    def merge_and_save(self, directory: str | os.PathLike) -> None:
        """A plain HF model folder (config + safetensors) with the student adapter merged in.

        The live model is untouched afterwards: base weights are restored from
        copies (not by subtracting the delta, which would round).
        """
        if self.lora_config is None:
            self.hf_model.save_pretrained(directory, safe_serialization=True)
            return
        restore = []
        try:
            for path, layer in self.lora_layers.items():
                parent_path, _, child = path.rpartition(".")
                parent = self.hf_model.get_submodule(parent_path) if parent_path else self.hf_model
                original = layer.base.weight.detach().clone()
                restore.append((parent, child, layer, original))
                delta = layer.delta_weight("student").to(layer.base.weight.dtype)  # [out, in]
                layer.base.weight.add_(delta.t() if layer.fan_in_fan_out else delta)
                setattr(parent, child, layer.base)
            self.hf_model.save_pretrained(directory, safe_serialization=True)
        finally:
            for parent, child, layer, original in restore:
                layer.base.weight.copy_(original)
                setattr(parent, child, layer)


def _check_state_keys(what: str, expected: dict, given: dict) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, tensor in expected.items():
        if tuple(given[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{what}: {key} has shape {tuple(given[key].shape)}, expected {tuple(tensor.shape)}"
            )
