"""LoRA layer: slots, routes, packed GEMM autograd, EMA of the factors, injection."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sdft_fast.lora import (
    ROUTE_NONE,
    ROUTE_STUDENT,
    ROUTE_TEACHER,
    LoraConfig,
    LoraLinear,
    inject_lora,
    lora_route,
    packed_linear,
)
from sdft_fast.peft_io import peft_target_modules


def _layer(seed=0, in_f=12, out_f=10, r=3, bias=True):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero so the student delta is visible
    layer.init_teacher_slot()
    with torch.no_grad():
        layer.ema_A.normal_()
        layer.ema_B.normal_()
    return layer


def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )


def test_config_validation():
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoraConfig(target_modules=[])
    assert LoraConfig(r=8, alpha=16).scaling == 2.0


def test_routes_apply_the_right_slot():
    layer = _layer()
    x = torch.randn(5, 12)
    base = layer.base(x)
    s = layer.scaling
    with lora_route("none"):
        torch.testing.assert_close(layer(x), base)
    with lora_route("student"):
        torch.testing.assert_close(layer(x), base + s * x @ layer.lora_A.T @ layer.lora_B.T)
    with lora_route("teacher"):
        torch.testing.assert_close(layer(x), base + s * x @ layer.ema_A.T @ layer.ema_B.T)
    # default route (no context) is the student
    torch.testing.assert_close(layer(x), base + s * x @ layer.lora_A.T @ layer.lora_B.T)


def test_unknown_route_names_the_choices():
    with pytest.raises(ValueError, match="route must be one of"):
        with lora_route("ema"):
            pass
    with pytest.raises(ValueError, match="route code must be"):
        with lora_route(7):
            pass


def test_teacher_route_without_slot_raises():
    layer = LoraLinear(nn.Linear(4, 4), r=2, alpha=2)
    with lora_route("teacher"), pytest.raises(RuntimeError, match="no EMA teacher slot"):
        layer(torch.randn(1, 4))


@pytest.mark.parametrize("weight_trainable", [False, True])
def test_packed_linear_values_grads_and_saved_rows(weight_trainable):
    torch.manual_seed(0)
    weight = torch.randn(7, 5, requires_grad=weight_trainable)
    bias = torch.randn(7, requires_grad=weight_trainable)
    student_x = torch.randn(3, 5, requires_grad=True)
    teacher_x = torch.randn(11, 5)
    saved_rows = []

    def pack(t):
        saved_rows.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student_y, teacher_y = packed_linear(student_x, teacher_x, weight, bias)
    torch.testing.assert_close(student_y, F.linear(student_x, weight, bias))
    torch.testing.assert_close(teacher_y, F.linear(teacher_x, weight, bias).detach())
    assert not teacher_y.requires_grad
    # nothing with the teacher's 11 rows is kept for backward
    assert all(shape[0] != 11 for shape in saved_rows)
    grad_out = torch.randn(3, 7)
    student_y.backward(grad_out)
    ref_x = student_x.detach().clone().requires_grad_(True)
    ref_w = weight.detach().clone().requires_grad_(weight_trainable)
    ref_b = bias.detach().clone().requires_grad_(weight_trainable)
    F.linear(ref_x, ref_w, ref_b).backward(grad_out)
    torch.testing.assert_close(student_x.grad, ref_x.grad)
    if weight_trainable:
        torch.testing.assert_close(weight.grad, ref_w.grad)
        torch.testing.assert_close(bias.grad, ref_b.grad)


def test_forward_pair_routes_match_whole_call_routes():
    layer = _layer(2)
    student_x, teacher_x = torch.randn(4, 12), torch.randn(6, 12)
    for route in (ROUTE_TEACHER, ROUTE_NONE, ROUTE_STUDENT):
        student_y, teacher_y = layer.forward_pair(student_x, teacher_x, route)
        with lora_route(ROUTE_STUDENT):
            torch.testing.assert_close(student_y, layer(student_x))
        with lora_route(route):
            torch.testing.assert_close(teacher_y, layer(teacher_x).detach())
        assert student_y.requires_grad and not teacher_y.requires_grad


def test_ema_is_factorwise_and_not_the_ema_of_the_product():
    layer = _layer(3)
    teacher_a, teacher_b = layer.ema_A.clone(), layer.ema_B.clone()
    rate = 0.25
    layer.ema_update(rate)
    torch.testing.assert_close(layer.ema_A, (1 - rate) * teacher_a + rate * layer.lora_A.detach())
    torch.testing.assert_close(layer.ema_B, (1 - rate) * teacher_b + rate * layer.lora_B.detach())
    # The documented choice: the teacher delta is B_ema @ A_ema, which differs from
    # the EMA of the deltas (1 - r) B_t A_t + r B A by the cross terms r (1 - r) (B - B_t)(A - A_t).
    ema_of_products = (1 - rate) * (teacher_b @ teacher_a) + rate * (layer.lora_B @ layer.lora_A).detach()
    cross = rate * (1 - rate) * (layer.lora_B.detach() - teacher_b) @ (layer.lora_A.detach() - teacher_a)
    product_of_emas = layer.ema_B @ layer.ema_A
    torch.testing.assert_close(product_of_emas, ema_of_products - cross)
    assert (product_of_emas - ema_of_products).abs().max() > 1e-3
    # rate 1 copies the student exactly
    layer.ema_update(1.0)
    torch.testing.assert_close(layer.delta_weight(ROUTE_TEACHER), layer.delta_weight(ROUTE_STUDENT).detach())


def test_inject_default_targets_all_decoder_linears_and_freezes_base():
    model = _tiny_llama()
    wrapped = inject_lora(model, LoraConfig(r=2, alpha=4))
    leafs = {p.rpartition(".")[2] for p in wrapped}
    assert leafs == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(wrapped) == 7 * 2
    assert not isinstance(model.lm_head, LoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{f}" for p in wrapped for f in "AB"}
    assert peft_target_modules(model, list(wrapped)) == sorted(leafs)


def test_inject_named_targets_and_errors():
    model = _tiny_llama()
    wrapped = inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "model.layers.1.mlp.down_proj"]))
    assert list(wrapped) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    # the leaf name down_proj would also select layer 0: the PEFT list must be full paths
    assert peft_target_modules(model, list(wrapped)) == list(wrapped)
    with pytest.raises(ValueError, match="'nope' matches no linear layer"):
        inject_lora(_tiny_llama(), LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="LM head"):
        inject_lora(_tiny_llama(), LoraConfig(target_modules=["lm_head"]))


def test_gpt2_conv1d_layers_are_wrapped_with_transposed_weight():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    wrapped = inject_lora(model, LoraConfig(r=2, alpha=2))
    assert {p.rpartition(".")[2] for p in wrapped} == {"c_attn", "c_proj", "c_fc"}
    layer = wrapped["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out
    x = torch.randn(3, 16)
    with lora_route("none"):
        torch.testing.assert_close(layer(x), F.linear(x, layer.base_weight, layer.base.bias))
