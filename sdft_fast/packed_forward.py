"""The one-pass Llama-family forward over a packed student stream and teacher stream.

Student rows and teacher rows go through every layer together: each linear layer is one GEMM
over both (``lora.packed_linear``; q/k/v and gate/up fused into one wider GEMM,
``lora.fused_pair_linear``), RMSNorm, RoPE and SwiGLU come from :mod:`sdft_fast.llama_ops`, and
attention runs per stream over its prefix tree (:mod:`sdft_fast.prefix_tree`). The LoRA delta is
routed per stream: the student's route (the student adapter, or none inside
``adapters_disabled``) and the teacher's (EMA adapter, none, or the live student adapter without
gradient). Teacher tensors never require grad: the packed GEMM marks them constant and every
other teacher op runs under ``no_grad`` with detached weights, so teacher rows save nothing for
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdft_fast.llama_ops import apply_rope, gated_activation, norm_eps, rms_norm
from sdft_fast.lora import LoraLinear, can_fuse, fused_pair_linear, packed_linear
from sdft_fast.prefix_tree import PrefixTreeStream, prefix_tree_attention


class PackedForward:
    """One call of the packed forward: the HF model, the two routes, the teacher's own weights.

    ``teacher_params`` maps ``id(parameter)`` to the teacher's copy of it (full fine-tuning with an
    EMA or base teacher keeps one); parameters not in it are shared with the student.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        student_route: int,
        teacher_route: int,
        teacher_params: dict[int, torch.Tensor],
    ):
        self.hf_model = hf_model
        self.student_route = student_route
        self.teacher_route = teacher_route
        self.teacher_params = teacher_params

    def teacher_weight(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """The teacher's value of a (non-LoRA) parameter: its own copy, or the shared one detached."""
        if param is None:
            return None
        return self.teacher_params.get(id(param), param).detach()

    def pair_linear(self, module: nn.Module, student_x, teacher_x):
        # student_x [Ns, in]; teacher_x [Nt, in] or None -> ([Ns, out], [Nt, out] | None)
        if isinstance(module, LoraLinear):
            if teacher_x is None:
                student_y = module.base(student_x)
                delta = module.routed_delta(student_x, self.student_route)
                return (student_y if delta is None else student_y + delta), None
            return module.forward_pair(student_x, teacher_x, self.teacher_route, self.student_route)
        if teacher_x is None:
            return module(student_x), None
        if id(module.weight) not in self.teacher_params:
            return packed_linear(student_x, teacher_x, module.weight, module.bias)
        # Full fine-tuning with its own teacher weights: nothing shared, two GEMMs.
        with torch.no_grad():
            teacher_y = F.linear(
                teacher_x, self.teacher_weight(module.weight), self.teacher_weight(module.bias)
            )
        return module(student_x), teacher_y

    def fused_pair_linear(self, modules: list[nn.Module], student_x, teacher_x):
        """Linear layers that read the same input (q/k/v; gate/up): one wider GEMM when they are
        LoRA layers over frozen shared weights (``lora.fused_pair_linear``), else one by one."""
        if can_fuse(modules):
            return fused_pair_linear(modules, student_x, teacher_x, self.student_route, self.teacher_route)
        pairs = [self.pair_linear(m, student_x, teacher_x) for m in modules]
        return [s for s, _ in pairs], [t for _, t in pairs]

    def pair_norm(self, norm: nn.Module, student_x, teacher_x):
        eps = norm_eps(norm)
        return rms_norm(student_x, norm.weight, eps), self.teacher_norm(norm, teacher_x)

    @torch.no_grad()
    def teacher_norm(self, norm: nn.Module, teacher_x):
        if teacher_x is None:
            return None
        eps = norm_eps(norm)
        return rms_norm(teacher_x, self.teacher_weight(norm.weight), eps)

    def __call__(self, student_stream: PrefixTreeStream, teacher_stream: PrefixTreeStream | None):
        """Our Llama-family forward over the packed student (+ teacher) stream.

        Shapes: Ns / Nt packed tokens, D hidden, H / Hkv heads, hd head dim.
        Teacher tensors never require grad: the packed GEMM marks them constant,
        every other teacher op runs under no_grad with detached weights.
        """
        backbone = self.hf_model.model
        config = self.hf_model.config
        pair_linear = self.pair_linear

        embed_w = backbone.embed_tokens.weight  # [V, D]
        student_h = F.embedding(student_stream.input_ids, embed_w)  # [Ns, D]
        teacher_h = None
        with torch.no_grad():
            if teacher_stream is not None:
                teacher_h = F.embedding(teacher_stream.input_ids, self.teacher_weight(embed_w))  # [Nt, D]
            # cos/sin [N, hd] from the model's own rotary embedding (handles rope scaling types).
            cos_s, sin_s = (t[0] for t in backbone.rotary_emb(student_h, student_stream.position_ids[None]))
            if teacher_stream is not None:
                cos_t, sin_t = (
                    t[0] for t in backbone.rotary_emb(teacher_h, teacher_stream.position_ids[None])
                )
        n_layers = config.num_hidden_layers
        for layer in backbone.layers[:n_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            head_dim = attn.head_dim
            # --- attention block
            xs, xt = self.pair_norm(layer.input_layernorm, student_h, teacher_h)
            (qs, ks, vs), (qt, kt, vt) = self.fused_pair_linear(
                [attn.q_proj, attn.k_proj, attn.v_proj], xs, xt
            )
            qs, ks, vs = (
                qs.view(-1, heads, head_dim),
                ks.view(-1, kv_heads, head_dim),
                vs.view(-1, kv_heads, head_dim),
            )
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                qs, _ = self.pair_norm(attn.q_norm, qs, None)
                ks, _ = self.pair_norm(attn.k_norm, ks, None)
            qs, ks = apply_rope(qs, cos_s, sin_s), apply_rope(ks, cos_s, sin_s)
            attn_s = prefix_tree_attention(qs, ks, vs, student_stream.attention, attn.scaling).reshape(
                -1, heads * head_dim
            )
            attn_t = None
            if teacher_stream is not None:
                with torch.no_grad():
                    qt, kt, vt = (
                        qt.view(-1, heads, head_dim),
                        kt.view(-1, kv_heads, head_dim),
                        vt.view(-1, kv_heads, head_dim),
                    )
                    if hasattr(attn, "q_norm"):
                        qt, kt = self.teacher_norm(attn.q_norm, qt), self.teacher_norm(attn.k_norm, kt)
                    qt, kt = apply_rope(qt, cos_t, sin_t), apply_rope(kt, cos_t, sin_t)
                    attn_t = prefix_tree_attention(
                        qt, kt, vt, teacher_stream.attention, attn.scaling
                    ).reshape(-1, heads * head_dim)
            os_, ot = pair_linear(attn.o_proj, attn_s, attn_t)
            student_h = student_h + os_
            if teacher_stream is not None:
                teacher_h = teacher_h + ot
            # --- SwiGLU MLP block
            xs, xt = self.pair_norm(layer.post_attention_layernorm, student_h, teacher_h)
            (gs, us), (gt, ut) = self.fused_pair_linear([mlp.gate_proj, mlp.up_proj], xs, xt)
            hidden_act = getattr(config, "hidden_act", None)
            ms = gated_activation(mlp, gs, us, hidden_act)
            mt = None
            if teacher_stream is not None:
                with torch.no_grad():
                    mt = gated_activation(mlp, gt, ut, hidden_act)
            ds, dt = pair_linear(mlp.down_proj, ms, mt)
            student_h = student_h + ds
            if teacher_stream is not None:
                teacher_h = teacher_h + dt
        # Final norm only on the rows that predict completion tokens.
        student_out, teacher_out = self.pair_norm(
            backbone.norm,
            student_h[student_stream.gather_rows],
            None if teacher_stream is None else teacher_h[teacher_stream.gather_rows],
        )
        return student_out, teacher_out
