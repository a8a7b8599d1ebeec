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
        gradient_checkpointing: bool = False,
    ):
        self.hf_model = hf_model
        self.student_route = student_route
        self.teacher_route = teacher_route
        self.teacher_params = teacher_params
        self.gradient_checkpointing = gradient_checkpointing

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

    def decoder_layer(
        self, layer, student_h, teacher_h, student_stream, teacher_stream, student_rope, teacher_rope
    ):
        """One decoder layer over both streams (teacher rows without grad; ``teacher_h`` None: the
        student stream alone). Returns the new (student_h, teacher_h)."""
        config = self.hf_model.config
        pair_linear = self.pair_linear
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = attn.head_dim
        # --- attention block
        xs, xt = self.pair_norm(layer.input_layernorm, student_h, teacher_h)
        (qs, ks, vs), (qt, kt, vt) = self.fused_pair_linear([attn.q_proj, attn.k_proj, attn.v_proj], xs, xt)
        qs, ks, vs = (
            qs.view(-1, heads, head_dim),
            ks.view(-1, kv_heads, head_dim),
            vs.view(-1, kv_heads, head_dim),
        )
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
            qs, _ = self.pair_norm(attn.q_norm, qs, None)
            ks, _ = self.pair_norm(attn.k_norm, ks, None)
        qs, ks = apply_rope(qs, *student_rope), apply_rope(ks, *student_rope)
        attn_s = prefix_tree_attention(qs, ks, vs, student_stream.attention, attn.scaling).reshape(
            -1, heads * head_dim
        )
        attn_t = None
        if teacher_h is not None:
            with torch.no_grad():
                qt, kt, vt = (
                    qt.view(-1, heads, head_dim),
                    kt.view(-1, kv_heads, head_dim),
                    vt.view(-1, kv_heads, head_dim),
                )
                if hasattr(attn, "q_norm"):
                    qt, kt = self.teacher_norm(attn.q_norm, qt), self.teacher_norm(attn.k_norm, kt)
                qt, kt = apply_rope(qt, *teacher_rope), apply_rope(kt, *teacher_rope)
                attn_t = prefix_tree_attention(qt, kt, vt, teacher_stream.attention, attn.scaling).reshape(
                    -1, heads * head_dim
                )
        os_, ot = pair_linear(attn.o_proj, attn_s, attn_t)
        student_h = student_h + os_
        if teacher_h is not None:
            teacher_h = teacher_h + ot
        # --- SwiGLU MLP block
        xs, xt = self.pair_norm(layer.post_attention_layernorm, student_h, teacher_h)
        (gs, us), (gt, ut) = self.fused_pair_linear([mlp.gate_proj, mlp.up_proj], xs, xt)
        hidden_act = getattr(config, "hidden_act", None)
        ms = gated_activation(mlp, gs, us, hidden_act)
        mt = None
        if teacher_h is not None:
            with torch.no_grad():
                mt = gated_activation(mlp, gt, ut, hidden_act)
        ds, dt = pair_linear(mlp.down_proj, ms, mt)
        student_h = student_h + ds
        if teacher_h is not None:
            teacher_h = teacher_h + dt
        return student_h, teacher_h

    def __call__(self, student_stream: PrefixTreeStream, teacher_stream: PrefixTreeStream | None):
        """Our Llama-family forward over the packed student (+ teacher) stream.

        Shapes: Ns / Nt packed tokens, D hidden, H / Hkv heads, hd head dim.
        Teacher tensors never require grad: the packed GEMM marks them constant,
        every other teacher op runs under no_grad with detached weights.
        """
        backbone = self.hf_model.model
        config = self.hf_model.config

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
        student_rope, teacher_rope = (cos_s, sin_s), (None if teacher_stream is None else (cos_t, sin_t))
        for layer in backbone.layers[:n_layers]:

            def run(student_x, teacher_x, layer=layer):
                return self.decoder_layer(
                    layer, student_x, teacher_x, student_stream, teacher_stream, student_rope, teacher_rope
                )

            if self.gradient_checkpointing and student_h.requires_grad:
                student_h, teacher_h = _StudentCheckpoint.run(run, student_h, teacher_h)
            else:
                student_h, teacher_h = run(student_h, teacher_h)
        # Final norm only on the rows that predict completion tokens.
        student_out, teacher_out = self.pair_norm(
            backbone.norm,
            student_h[student_stream.gather_rows],
            None if teacher_stream is None else teacher_h[teacher_stream.gather_rows],
        )
        return student_out, teacher_out


class _StudentCheckpoint(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer, student rows only.

    The forward runs the layer over both streams without recording a graph and keeps only the
    student input ([Ns, D]); the backward runs the layer again over the student stream alone (the
    teacher rows have no gradient, so they are not recomputed), with grad on, and backpropagates
    through that. The parameters' gradients accumulate from the inner backward, as in
    ``torch.utils.checkpoint``'s reentrant mode. The recompute uses the student-only form of the
    GEMMs (``pair_linear`` without teacher rows): the same math, the same values up to fp32
    summation order.
    """

    @staticmethod
    def run(layer_fn, student_h, teacher_h):
        holder = []
        student_out = _StudentCheckpoint.apply(student_h, layer_fn, teacher_h, holder)
        return student_out, holder[0]

    @staticmethod
    def forward(ctx, student_h, layer_fn, teacher_h, holder):
        student_out, teacher_out = layer_fn(student_h, teacher_h)  # Function.forward runs without grad
        holder.append(teacher_out)
        ctx.layer_fn = layer_fn
        ctx.save_for_backward(student_h)
        return student_out

    @staticmethod
    def backward(ctx, grad_out):
        (student_h,) = ctx.saved_tensors
        student_x = student_h.detach().requires_grad_(True)
        with torch.enable_grad():
            student_out, _ = ctx.layer_fn(student_x, None)
        torch.autograd.backward(student_out, grad_out)
        return student_x.grad, None, None, None
