"""Llama-family building blocks: the memory-lean SwiGLU autograd function, the fast-path rules."""

import torch
from helpers import gpt2, llama, mistral

from sdft_fast.llama_ops import SiluGateMul, fast_path_support, sliding_window_in_use


def test_silu_gate_mul_gradient():
    gate = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluGateMul.apply, (gate, up))


def test_fast_path_support_and_sliding_window_rules():
    assert fast_path_support(llama()) == (True, "")
    ok, reason = fast_path_support(gpt2())
    assert not ok and "gpt2" in reason
    assert sliding_window_in_use(mistral(sliding_window=16).config) == 16
    assert sliding_window_in_use(mistral(sliding_window=None).config) is None
    assert sliding_window_in_use(llama().config) is None
