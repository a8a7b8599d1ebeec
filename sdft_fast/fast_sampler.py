"""Fast batched sampling from the student for Llama-family models (the rollout sampler).

The reference decode loop (:func:`sdft_fast.sampling.reference_generate`) runs the Hugging Face
forward once per new token: un-merged LoRA layers (three GEMMs per linear: base, A, B), a growing
cache and a concatenated attention mask every step. This module is a drop-in sampler with the
SAME contract and the same random stream:

* Merged weights, built once per call under ``no_grad`` and dropped at the end
  (never stale after an optimizer step): ``W_eff = W + s * B @ A`` for every
  LoRA linear (the student's delta), q/k/v fused into one ``[(H + 2 Hkv) hd, D]``
  weight and gate/up into one ``[2 I, D]`` weight, so a decoder layer is four
  GEMMs. The active LoRA route decides the delta (``generate(policy="teacher")`` samples with
  the teacher's slot, or the base weights alone). Full fine-tuning (``lora_config=None``) just
  fuses the current weights.
* Our own decode loop over preallocated K/V caches ``[B, Hkv, S, hd]`` (S =
  longest prompt + max_new_tokens). Row b's prompt sits at ``[0, len_b)`` and
  its token of step t at ``len_b + t`` (an index_put, no growth); a boolean key
  mask per row; ``F.scaled_dot_product_attention`` with ``enable_gqa``.
* Prefill shares work: the longest common prefix of all prompts (a chat
  template's system turn) runs once at batch 1 and is copied into every row;
  identical prompts (several rollouts of one prompt) prefill their suffix once
  and copy it. The distinct suffixes run packed (no padding in the GEMMs; only
  the attention pads them), and only each row's last prompt position reaches
  the final norm and the LM head.
* Rows that finished (stop token) leave the batch: their cache rows are dropped.
* On CPU in fp32 every merged weight is pre-packed by oneDNN for the batch size
  (``_Linear``): a decode step multiplies a handful of rows by every weight, a
  weight-streaming GEMM that oneDNN's packed kernel runs faster than the default
  sgemm (docs/performance.md has the figures). Elsewhere (CUDA, bf16/fp16, no
  oneDNN): ``F.linear``.

Semantics are those of ``generate``: the adapter of the active route is on,
positions are ``0..len-1`` per row, logits are cast to fp32 before
``sampling.pick_next``, which is called once per step on the whole ``[B, V]``
batch (finished rows included) with a ``torch.Generator`` seeded the same way;
a finished row keeps its last (valid) logits, so the random stream and the other
rows' draws are unchanged. Numbers differ from the reference loop only by fp32
rounding (merged vs un-merged LoRA, GEMM shapes).

Supported: the fast-path family of :mod:`sdft_fast.llama_ops` (llama, mistral,
qwen2, qwen3) with a RoPE whose frequencies do not depend on the sequence
length and no sliding window shorter than the sequence.
:func:`supports_fast_generate` says why not otherwise; the reference loop stays
the fallback. This module reads the model (``hf_model``, ``fast_path``, ``config``,
``device``) but imports nothing from :mod:`sdft_fast.model`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdft_fast import sampling
from sdft_fast.llama_ops import apply_rope, norm_eps, rms_norm, sliding_window_in_use
from sdft_fast.lora import ROUTE_NONE, ROUTE_STUDENT, LoraLinear, current_route

# RoPE types whose cos/sin at a position do not depend on how long the sequence is:
# one table for all positions of the call reproduces HF exactly. "dynamic" and
# "longrope" recompute their frequencies from the longest position in each forward.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# ------------------------------------------------------------------------------ support check
def supports_fast_generate(model, max_len: int | None = None) -> tuple[bool, str]:
    """(True, "") when :func:`fast_generate` reproduces ``model.generate``; else (False, why).

    ``max_len`` = longest prompt + max_new_tokens. It only matters for models with a
    sliding window: the window is a no-op while every sequence fits in it, and the
    fast sampler does not implement it otherwise (so with a window and no
    ``max_len`` the answer is False).
    """
    if not getattr(model, "fast_path", False):
        reason = getattr(model, "_fallback_reason", "") or "model.fast_path is False"
        return False, f"not a Llama-family fast-path model ({reason})"
    backbone = model.hf_model.model
    rotary = backbone.rotary_emb
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str) or rope_type not in STATIC_ROPE_TYPES:
        return (
            False,
            f"rope type {rope_type!r} is not one of {STATIC_ROPE_TYPES} (its frequencies may depend on the length)",
        )
    if getattr(model.config, "attention_dropout", 0.0):
        return False, "attention_dropout > 0"
    for layer in backbone.layers[: model.config.num_hidden_layers]:
        attn = layer.self_attn
        if hasattr(attn, "q_norm") != hasattr(attn, "k_norm"):
            return False, "attention has only one of q_norm / k_norm"
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if not isinstance(module, (nn.Linear, LoraLinear)):
                return False, f"attention projection is a {type(module).__name__}, not nn.Linear / LoraLinear"
        for module in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(module, (nn.Linear, LoraLinear)):
                return False, f"MLP projection is a {type(module).__name__}, not nn.Linear / LoraLinear"
    window = sliding_window_in_use(model.config)
    if window is not None:
        if max_len is None:
            return (
                False,
                f"sliding_window={window} is set: pass max_len to check that every sequence fits in it",
            )
        if max_len > window:
            return False, f"prompt + max_new_tokens = {max_len} tokens exceed sliding_window={window}"
    return True, ""


# ------------------------------------------------------------------------------ merged weights
def _out_in(module: nn.Module) -> tuple[int, int]:
    # nn.Linear and LoraLinear both carry (out_features, in_features)
    return module.out_features, module.in_features


@torch.no_grad()
def _fused_linear(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-stack the effective weights of ``modules`` under the active LoRA route into one
    [sum out, in] weight.

    A LoRA linear contributes ``W + s * B @ A`` of the route's slot (the student's adapter, or the EMA
    teacher's; ``W`` alone under ROUTE_NONE), written straight into its rows of the fused buffer by
    one addmm: no [out, in] temporary.
    Bias: the row-stacked biases, or None when no module has one.
    """
    route = current_route()
    outs = [_out_in(m)[0] for m in modules]
    in_features = _out_in(modules[0])[1]
    first = modules[0].base.weight if isinstance(modules[0], LoraLinear) else modules[0].weight
    weight = torch.empty(sum(outs), in_features, dtype=first.dtype, device=first.device)  # [sum out, in]
    biases = [(m.base.bias if isinstance(m, LoraLinear) else m.bias) for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.zeros(sum(outs), dtype=first.dtype, device=first.device)  # [sum out]
    row = 0
    for module, n_out, b in zip(modules, outs, biases):
        rows = weight[row : row + n_out]  # [out, in], contiguous view
        if isinstance(module, LoraLinear) and route != ROUTE_NONE:
            down, up = (
                (module.lora_A, module.lora_B) if route == ROUTE_STUDENT else (module.ema_A, module.ema_B)
            )
            torch.addmm(module.base_weight, up, down, alpha=module.scaling, out=rows)
        elif isinstance(module, LoraLinear):
            rows.copy_(module.base_weight)
        else:
            rows.copy_(module.weight)
        if b is not None:
            bias[row : row + n_out].copy_(b)
        row += n_out
    return weight, bias


_ONEDNN_OK: bool | None = None  # None until _onednn_self_test ran in this process


def _onednn_self_test() -> bool:
    """Pack a small weight and compare with F.linear: the ops are internal to PyTorch
    (inductor's frozen CPU graphs use them), so check once per process that they exist,
    run on this CPU and compute the right thing before trusting them."""
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=gen)  # [out, in]
        bias = torch.randn(24, generator=gen)
        x = torch.randn(3, 40, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4))
    except (RuntimeError, AttributeError, TypeError):
        return False


def _onednn_available(weight: torch.Tensor) -> bool:
    """oneDNN pre-packed fp32 GEMMs usable for this weight (CPU, fp32, ops present and correct)."""
    global _ONEDNN_OK
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
    ):
        return False
    if _ONEDNN_OK is None:
        _ONEDNN_OK = _onednn_self_test()
    return _ONEDNN_OK


class _Linear:
    """y = x W^T + b, with W pre-packed by oneDNN for the decode batch size when possible.

    A decode step multiplies a few rows by every weight of the model, where a weight
    reordered once for that batch size streams faster than the default sgemm (fp32
    throughout, same math: only the summation order differs). Packing copies the weight
    once per generate call, like the merge itself; the unpacked copy is then dropped
    (``weight`` = None) so the call holds one extra copy of the model, not two. Anywhere
    else (CUDA, bf16/fp16, no oneDNN) it is ``F.linear`` on ``weight``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int, pack: bool):
        global _ONEDNN_OK
        self.weight: torch.Tensor | None = weight  # [out, in]
        self.bias = bias  # [out] | None
        self.packed = None
        if pack and _onednn_available(weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
                self.weight = None
            except RuntimeError:
                _ONEDNN_OK = False  # a shape or layout oneDNN refuses: F.linear from now on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [N, in] -> [N, out]
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor, float]:
    return norm.weight, norm_eps(norm)


@dataclass
class _LayerWeights:
    """One decoder layer with the student adapter merged: four GEMMs per token."""

    qkv: _Linear  # weight [(H + 2 Hkv) hd, D]: q, k, v rows stacked
    o: _Linear  # [D, H hd]
    gate_up: _Linear  # [2 I, D]: gate rows, then up rows
    down: _Linear  # [D, I]
    input_norm: tuple[torch.Tensor, float]  # weight [D], eps
    post_norm: tuple[torch.Tensor, float]
    q_norm: tuple[torch.Tensor, float] | None  # Qwen3: weight [hd], eps
    k_norm: tuple[torch.Tensor, float] | None
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


def _merge_layers(model, batch_hint: int, pack: bool) -> list[_LayerWeights]:
    backbone = model.hf_model.model
    layers = []
    for layer in backbone.layers[: model.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp

        def linear(modules: list[nn.Module]) -> _Linear:
            return _Linear(*_fused_linear(modules), batch_hint=batch_hint, pack=pack)

        layers.append(
            _LayerWeights(
                qkv=linear([attn.q_proj, attn.k_proj, attn.v_proj]),
                o=linear([attn.o_proj]),
                gate_up=linear([mlp.gate_proj, mlp.up_proj]),
                down=linear([mlp.down_proj]),
                input_norm=_norm_params(layer.input_layernorm),
                post_norm=_norm_params(layer.post_attention_layernorm),
                q_norm=_norm_params(attn.q_norm) if hasattr(attn, "q_norm") else None,
                k_norm=_norm_params(attn.k_norm) if hasattr(attn, "k_norm") else None,
                act_fn=mlp.act_fn,
                scaling=float(attn.scaling),
            )
        )
    return layers


# ------------------------------------------------------------------------------ the decoder
class _Decoder:
    """Merged weights + preallocated K/V caches for one generate call.

    Shapes: R cache rows (the batch, shrinking as rows finish), S cache slots per
    row, D hidden, H / Hkv heads, hd head dim, V vocabulary.
    """

    def __init__(self, model, rows: int, slots: int, pack: bool = True):
        config = model.config
        backbone = model.hf_model.model
        self.layers = _merge_layers(model, batch_hint=rows, pack=pack)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = backbone.layers[0].self_attn.head_dim
        self.embed_w = backbone.embed_tokens.weight  # [V, D]
        self.dtype, self.device = self.embed_w.dtype, self.embed_w.device
        self.final_norm = _norm_params(backbone.norm)
        lm_head = model.hf_model.get_output_embeddings()
        # weight [V, D], may be embed_tokens.weight (tied); never LoRA-wrapped
        self.lm_head = _Linear(lm_head.weight, getattr(lm_head, "bias", None), batch_hint=rows, pack=pack)
        # cos/sin [S, hd] for every position of the call, from the model's own rotary
        # embedding (its rope scaling included); positions are 0..len-1 per row.
        probe = torch.zeros(1, 1, config.hidden_size, dtype=self.dtype, device=self.device)
        cos, sin = backbone.rotary_emb(probe, torch.arange(slots, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [S, hd]
        # Zeros, not empty: masked key slots still enter the P @ V product (0 * NaN = NaN).
        shape = (rows, self.kv_heads, slots, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.gqa = {"enable_gqa": True} if self.kv_heads != self.heads else {}

    # -- building blocks -------------------------------------------------------------------
    def _qkv(self, lw: _LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # h [N, D], cos/sin [N, hd] -> q [N, H, hd], k [N, Hkv, hd], v [N, Hkv, hd] (roped)
        n = h.shape[0]
        x = rms_norm(h, *lw.input_norm)
        qkv = lw.qkv(x)  # [N, (H + 2 Hkv) hd]
        q, k, v = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(n, self.heads, self.head_dim)
        k = k.view(n, self.kv_heads, self.head_dim)
        v = v.view(n, self.kv_heads, self.head_dim)
        if lw.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q, k = rms_norm(q, *lw.q_norm), rms_norm(k, *lw.k_norm)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attn_out_and_mlp(self, lw: _LayerWeights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # h [N, D] residual stream, attn [N, H hd] -> [N, D] after o_proj and the SwiGLU MLP
        h = h + lw.o(attn)
        x = rms_norm(h, *lw.post_norm)
        gate, up = lw.gate_up(x).chunk(2, dim=-1)  # [N, I] each
        return h + lw.down(lw.act_fn(gate) * up)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        # h [N, D] -> fp32 logits [N, V]
        return self.lm_head(rms_norm(h, *self.final_norm)).float()

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, rows: list[int], segments: list[list[int]], start: int, need_logits: bool
    ) -> torch.Tensor | None:
        """Run ``segments[u]`` (positions start.. of cache row ``rows[u]``) through the model.

        Each row's cache must already hold its first ``start`` tokens. The linears run
        packed over all N segment tokens; attention pads the segments to [U, Tmax].
        Returns fp32 logits [U, V] of each segment's last token (None when not needed:
        then the last layer stops after writing its K/V).
        """
        device = self.device
        u_count = len(rows)
        seg_lens = [len(s) for s in segments]
        t_max = max(seg_lens)
        ids = torch.tensor([t for s in segments for t in s], dtype=torch.long, device=device)  # [N]
        seg_lens_t = torch.tensor(seg_lens, device=device)  # [U]
        u_of = torch.repeat_interleave(torch.arange(u_count, device=device), seg_lens_t)  # [N]
        i_of = torch.cat([torch.arange(n, device=device) for n in seg_lens])  # [N] index in segment
        pos = start + i_of  # [N] absolute positions = cache slots
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)  # [U]
        row_of = rows_t[u_of]  # [N]
        last = seg_lens_t.cumsum(0) - 1  # [U] packed index of each segment's last token
        cos, sin = self.cos[pos], self.sin[pos]  # [N, hd]
        keys = start + t_max
        single = u_count == 1  # one segment: no padding, a slice of the cache
        if single and start == 0:
            mask, causal = None, True
        else:
            rel = torch.arange(keys, device=device) - start  # [K] key slot relative to the segment
            steps = torch.arange(t_max, device=device)  # [Tmax] query index in the segment
            # key j visible to query i of segment u: j is before the segment, or in the
            # segment at or before i (and a real token, not padding)
            mask = (rel[None, None, :] <= steps[None, :, None]) & (
                rel[None, None, :] < seg_lens_t[:, None, None]
            )  # [U, Tmax, K]
            mask, causal = mask[:, None], False  # [U, 1, Tmax, K]
        h = F.embedding(ids, self.embed_w)  # [N, D]
        n_layers = len(self.layers)
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(lw, h, cos, sin)
            k_cache, v_cache = self.k_cache[li], self.v_cache[li]
            k_cache[row_of, :, pos] = k
            v_cache[row_of, :, pos] = v
            if li == n_layers - 1 and not need_logits:
                return None
            if single:
                r = rows[0]
                q_pad = q.view(1, t_max, self.heads, self.head_dim)
                k_rows, v_rows = k_cache[r : r + 1, :, :keys], v_cache[r : r + 1, :, :keys]
            else:
                q_pad = q.new_zeros(u_count, t_max, self.heads, self.head_dim)  # [U, Tmax, H, hd]
                q_pad[u_of, i_of] = q
                k_rows, v_rows = k_cache[rows_t, :, :keys], v_cache[rows_t, :, :keys]  # [U, Hkv, K, hd]
            out = F.scaled_dot_product_attention(
                q_pad.transpose(1, 2),
                k_rows,
                v_rows,
                attn_mask=mask,
                is_causal=causal,
                scale=lw.scaling,
                **self.gqa,
            )  # [U, H, Tmax, hd]
            out = out.transpose(1, 2)  # [U, Tmax, H, hd]
            attn = out.reshape(t_max, -1) if single else out[u_of, i_of].reshape(len(ids), -1)  # [N, H hd]
            if li == n_layers - 1:
                # only the last prompt token of each segment predicts anything
                h, attn = h[last], attn[last]  # [U, D], [U, H hd]
            h = self._attn_out_and_mlp(lw, h, attn)
        return self._logits(h)  # [U, V]

    @torch.no_grad()
    def copy_rows(self, src: list[int] | int, dst: list[int] | None, upto: int) -> None:
        """Cache slots [0, upto) of row(s) ``src`` into rows ``dst`` (None = every row)."""
        for cache in (*self.k_cache, *self.v_cache):
            if dst is None:
                cache[:, :, :upto] = cache[src : src + 1, :, :upto]
            else:
                cache[dst, :, :upto] = cache[src, :, :upto]

    @torch.no_grad()
    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop the cache rows of finished sequences (index [R'] long: the rows kept, in order)."""
        self.k_cache = [c.index_select(0, index) for c in self.k_cache]
        self.v_cache = [c.index_select(0, index) for c in self.v_cache]

    # -- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, keys: int) -> torch.Tensor:
        """One new token per cache row: tokens [R] at positions [R] -> fp32 logits [R, V].

        ``keys`` = max(positions) + 1: attention reads cache slots [0, keys) only.
        """
        rows = torch.arange(tokens.shape[0], device=self.device)  # [R]
        mask = (torch.arange(keys, device=self.device)[None, :] <= positions[:, None])[
            :, None, None
        ]  # [R,1,1,K]
        cos, sin = self.cos[positions], self.sin[positions]  # [R, hd]
        h = F.embedding(tokens, self.embed_w)  # [R, D]
        for li, lw in enumerate(self.layers):
            q, k, v = self._qkv(lw, h, cos, sin)  # [R, H, hd], [R, Hkv, hd] x2
            k_cache, v_cache = self.k_cache[li], self.v_cache[li]
            k_cache[rows, :, positions] = k
            v_cache[rows, :, positions] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None, :],
                k_cache[:, :, :keys],
                v_cache[:, :, :keys],
                attn_mask=mask,
                scale=lw.scaling,
                **self.gqa,
            )  # [R, H, 1, hd]
            h = self._attn_out_and_mlp(lw, h, out.reshape(tokens.shape[0], -1))
        return self._logits(h)  # [R, V]


# ------------------------------------------------------------------------------ generate
def _common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


@torch.no_grad()
def fast_generate(
    model,
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
    """``SelfDistillModel.generate`` on merged student weights and our own KV-cache loop.

    Same contract (see :mod:`sdft_fast.sampling`): one completion per prompt, including the stop
    token when one was produced and nothing after it; the same seeded random stream. Raises
    NotImplementedError for models :func:`supports_fast_generate` rejects.
    """
    sampling.check_generate_args(model.config, prompts, max_new_tokens, do_sample, temperature, top_p, top_k)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    lens = [len(p) for p in prompts]
    ok, reason = supports_fast_generate(model, max(lens) + max_new_tokens)
    if not ok:
        raise NotImplementedError(f"fast_generate does not support this model: {reason}")
    stop_ids = sampling.as_id_list(eos_token_id)
    pad = sampling.fill_id(pad_token_id, stop_ids)
    device = model.device
    batch = len(prompts)
    generator = sampling.make_generator(device, seed)

    # Identical prompts prefill once: unique prompt u lives in cache row reps[u].
    unique_index: dict[tuple[int, ...], int] = {}
    group: list[int] = []  # [B] unique-prompt index of each row
    reps: list[int] = []  # [U] the first row of each unique prompt
    for b, p in enumerate(prompts):
        key = tuple(p)
        if key not in unique_index:
            unique_index[key] = len(reps)
            reps.append(b)
        group.append(unique_index[key])
    unique = [list(prompts[r]) for r in reps]
    # Shared prefix, leaving every prompt at least one token to produce its logits.
    prefix = min(_common_prefix_len(unique), min(lens) - 1)

    decoder = _Decoder(model, batch, max(lens) + max_new_tokens)
    if prefix > 0:
        decoder.prefill([reps[0]], [unique[0][:prefix]], start=0, need_logits=False)
        decoder.copy_rows(reps[0], None, prefix)
    unique_logits = decoder.prefill(
        reps, [p[prefix:] for p in unique], start=prefix, need_logits=True
    )  # [U, V]
    rep_set = set(reps)
    duplicates = [b for b in range(batch) if b not in rep_set]
    if duplicates:
        decoder.copy_rows([reps[group[b]] for b in duplicates], duplicates, max(lens))
    logits = unique_logits[torch.tensor(group, device=device)]  # [B, V] fp32

    stop_tensor = torch.tensor(stop_ids, dtype=torch.long, device=device)
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)  # [B]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
    alive = torch.arange(batch, device=device)  # [R] batch row of each cache row
    new_tokens: list[torch.Tensor] = []
    while True:
        next_tok = sampling.pick_next(logits, do_sample, temperature, top_p, top_k, generator)  # [B]
        next_tok = torch.where(finished, torch.full_like(next_tok, pad), next_tok)
        new_tokens.append(torch.where(finished, torch.full_like(next_tok, -1), next_tok))
        if stop_tensor.numel():
            finished = finished | torch.isin(next_tok, stop_tensor)
        if bool(finished.all()) or len(new_tokens) == max_new_tokens:
            break
        still = ~finished[alive]  # [R]
        if not bool(still.all()):
            kept = still.nonzero().squeeze(1)
            decoder.keep_rows(kept)
            alive = alive[kept]
        positions = lens_t[alive] + (len(new_tokens) - 1)  # [R] slot of the token just sampled
        keys = int(positions.max()) + 1
        row_logits = decoder.decode(next_tok[alive], positions, keys)  # [R, V]
        # Finished rows keep their last (valid) logits: pick_next's draw for them is discarded.
        logits = logits.index_copy(0, alive, row_logits)
    return sampling.trim_finished(new_tokens)
