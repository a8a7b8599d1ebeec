"""Shared-weight student/teacher around a Hugging Face causal LM.

SDFT needs, for every rollout y of prompt x with demonstration c, the final-norm
hidden states of

    student: the trained model on  x + y          (gradient)
    teacher: the SAME base weights on  x' + y     (x' = teacher prompt with c; no gradient)

at every position that predicts a token of y. :class:`SelfDistillModel`
returns exactly the inputs of ``sdft_fast.loss.self_distill_loss`` (hidden
states + ``lm_head_weight``); it never computes logits.

Two ways to get them, same API and same numbers:

* Fast path (the Llama family of :mod:`sdft_fast.llama_ops`). Our own forward over the
  HF modules' weights. Student rows and teacher rows are two streams of ONE pass (batch 1, no
  padding, per-sequence position ids), each laid out as a prefix tree
  (:mod:`sdft_fast.prefix_tree`: shared prefixes computed once; ``prefix_sharing=False`` turns
  it off). Every linear layer runs one GEMM over both streams (``lora.packed_linear``; q/k/v
  and gate/up fused, ``lora.fused_pair_linear``); the LoRA delta is routed per stream
  (student adapter with grad; EMA adapter / nothing / student adapter without grad for the
  teacher). Only student rows enter autograd; teacher rows save nothing for backward.
* Generic path (any other ``AutoModelForCausalLM``): a right-padded teacher
  pass under ``torch.no_grad``, then the student pass, through the HF backbone
  with the LoRA route set per pass.

Row layout of :class:`PairHidden`: for completion token j of sequence b, the
row holds the hidden state at the position that PREDICTS it (j = 0: the last
prompt token). The input of sequence b is ``prompt + completion[:-1]``: the
last completion token predicts nothing we score, so it is never fed.

Teacher modes (``config.TEACHER_MODES``): ``ema`` (an EMA of the student's trainable weights:
the LoRA teacher slot, or a full copy for full fine-tuning), ``base`` (the frozen start model)
and ``live`` (the student itself, without gradient).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sdft_fast import peft_io, prefix_tree
from sdft_fast.config import TEACHER_MODES
from sdft_fast.fast_sampler import fast_generate, supports_fast_generate
from sdft_fast.llama_ops import (
    fast_path_support,
    sliding_window_in_use,
)
from sdft_fast.lora import (
    ROUTE_NONE,
    ROUTE_STUDENT,
    ROUTE_TEACHER,
    LoraConfig,
    LoraLinear,
    current_route,
    inject_lora,
    lora_route,
)
from sdft_fast.packed_forward import PackedForward
from sdft_fast.prefix_tree import PrefixTreeStream
from sdft_fast.sampling import check_generate_args, check_token_lists, reference_generate


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """ "auto" is CUDA when available, else the CPU; anything else as torch reads it. A device this
    machine does not have is a ValueError saying why (not torch's assertion deep in a load)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"CUDA is not available ({why}; torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"there are {torch.cuda.device_count()} CUDA devices, no {name}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("MPS is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto" is fp32 on the CPU (bf16 matmuls are slow there and fp32 keeps runs reproducible)
    and bf16 on CUDA; else float32 / bfloat16 / float16."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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
        # Fast path: compute prefixes shared by several sequences of a stream once (exact; see prefix_tree).
        self.prefix_sharing = True
        # Recompute each decoder layer's student activations in the backward instead of keeping them.
        self.gradient_checkpointing = False
        # generate(): our merged-weight KV-cache sampler (sdft_fast.sampler) where it supports the
        # model, else the Hugging Face forward per token. Same contract and random stream.
        self.fast_sampling = True
        self.fast_path, reason = fast_path_support(hf_causal_lm)
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
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        trust_remote_code: bool = False,
    ) -> SelfDistillModel:
        """Load a local Hugging Face model folder (no hub downloads). ``dtype``/``device`` take
        torch values or the names of :func:`resolve_dtype` / :func:`resolve_device`."""
        from transformers import AutoModelForCausalLM

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)

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
        check_token_lists("student_prompts", student_prompts, vocab, allow_empty=False)
        check_token_lists("completions", completions, vocab, allow_empty=True)
        self._check_lengths("student_prompts", student_prompts, completions)
        if teacher_prompts is not None:
            check_token_lists("teacher_prompts", teacher_prompts, vocab, allow_empty=False)
            self._check_lengths("teacher_prompts", teacher_prompts, completions)

    def _use_fast_path(self, lengths: list[int]) -> bool:
        if not self.fast_path:
            return False
        window = sliding_window_in_use(self.config)
        if window is not None and max(lengths, default=0) > window:
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
            # Read at call time: tests lower it to exercise sharing on tiny sequences.
            min_shared = prefix_tree.MIN_SHARED_PREFIX if self.prefix_sharing else 0
            student_stream = PrefixTreeStream(
                s_seqs, [len(p) for p in s_prompts], completion_lens, device, min_shared
            )
            teacher_stream = (
                None
                if t_seqs is None
                else PrefixTreeStream(
                    t_seqs, [len(p) for p in t_prompts], completion_lens, device, min_shared
                )
            )
            # The student stream follows the active LoRA route: the student adapter, or none
            # inside adapters_disabled().
            forward = PackedForward(
                self.hf_model,
                current_route(),
                self._teacher_lora_route,
                self._teacher_by_param_id,
                gradient_checkpointing=self.gradient_checkpointing,
            )
            student_hidden, teacher_hidden = forward(student_stream, teacher_stream)
        else:
            teacher_hidden = None
            if t_seqs is not None:
                with torch.no_grad():
                    teacher_hidden = self._generic_hidden(
                        t_seqs, [len(p) for p in t_prompts], completion_lens, for_teacher=True
                    )
            student_hidden = self._generic_hidden(
                s_seqs, [len(p) for p in s_prompts], completion_lens, for_teacher=False
            )
        return PairHidden(student_hidden, teacher_hidden, sequence_ids, completion_positions, targets)

    # -- teacher plumbing ---------------------------------------------------------------------
    @property
    def _teacher_lora_route(self) -> int:
        return {"ema": ROUTE_TEACHER, "base": ROUTE_NONE, "live": ROUTE_STUDENT}[self.teacher_mode]

    # -- generic path ---------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        backbone = getattr(self.hf_model, "base_model", None)
        if backbone is None or backbone is self.hf_model:
            raise TypeError(
                f"{type(self.hf_model).__name__} exposes no backbone (base_model) for hidden states"
            )
        return backbone

    def _generic_hidden(self, seqs, prompt_lens, completion_lens, for_teacher: bool) -> torch.Tensor:
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
        route = self._teacher_lora_route if for_teacher else current_route()
        with lora_route(route):
            if for_teacher and self._teacher_params:
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

    @torch.no_grad()
    def merge_adapter_into_base(self) -> None:
        """Fold the student adapter into the base weights and restart it at zero (LoRA only;
        ``LoraLinear.merge_into_base``): the student computes the same function, and the 'base'
        teacher becomes this model — what a continual run does between stages so that each stage's
        frozen teacher is the model that stage starts from."""
        if self.lora_config is None:
            raise ValueError("merge_adapter_into_base: full fine-tuning has no adapter to merge")
        for layer in self.lora_layers.values():
            layer.merge_into_base()

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
        with self._teacher_copy_swapped_in():
            yield

    @contextlib.contextmanager
    def _teacher_copy_swapped_in(self) -> Iterator[None]:
        """Full fine-tuning: the teacher's own copy of the weights (base or EMA) in the model for the
        block, the trained weights back afterwards."""
        saved = {}
        params = dict(self.hf_model.named_parameters())
        try:
            with torch.no_grad():
                for name, teacher in self._teacher_params.items():
                    saved[name] = params[name].detach().clone()
                    params[name].copy_(teacher)
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
        policy: str = "student",
    ) -> list[list[int]]:
        """Batched sampling (the contract of :mod:`sdft_fast.sampling`) from the student, or with
        ``policy="teacher"`` from the teacher's weights (the EMA adapter, the base weights for
        ``teacher='base'``, the student itself for ``'live'``).

        Llama-family models go through ``fast_sampler.fast_generate`` (the policy's delta merged
        into a per-call copy of the weights, our own decode loop); others, or
        ``fast_sampling=False``, through ``sampling.reference_generate`` with its adapter active.
        """
        if policy not in ("student", "teacher"):
            raise ValueError(f"policy must be 'student' or 'teacher', got {policy!r}")
        check_generate_args(self.config, prompts, max_new_tokens, do_sample, temperature, top_p, top_k)
        if not prompts or max_new_tokens == 0:
            return [[] for _ in prompts]
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
        )
        with self._policy_weights(policy):
            if self.fast_sampling:
                supported, _ = supports_fast_generate(self, max(len(p) for p in prompts) + max_new_tokens)
                if supported:
                    return fast_generate(self, prompts, **kwargs)
            return reference_generate(self.hf_model, prompts, **kwargs)

    @contextlib.contextmanager
    def _policy_weights(self, policy: str) -> Iterator[None]:
        """The student's or the teacher's weights for the block: a LoRA route, or (full fine-tuning
        with an ema/base teacher) the teacher's copy swapped in and the trained weights back after."""
        if policy == "student" or self.teacher_mode == "live":
            with lora_route(ROUTE_STUDENT):
                yield
            return
        if self.lora_config is not None:
            with lora_route(self._teacher_lora_route):
                yield
            return
        with self._teacher_copy_swapped_in():
            yield

    # -- save / load (PEFT format; see sdft_fast.peft_io) ----------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> None:
        """Student adapter in PEFT format (or the full weights when lora=None). Safetensors only."""
        peft_io.save_adapter(self, directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT LoRA adapter (ours or PEFT's) into the student slot; or full weights when lora=None."""
        peft_io.load_adapter(self, directory)

    def merge_and_save(self, directory: str | os.PathLike) -> None:
        """A plain HF model folder (config + safetensors) with the student adapter merged in."""
        peft_io.merge_and_save(self, directory)


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
