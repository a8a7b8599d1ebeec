"""Chunked linear cross-entropy vs full-logit cross-entropy in float64 (values and gradients)."""

import pytest
import torch
from sdft_kernels.torch_linear_ce import torch_linear_cross_entropy


@pytest.mark.parametrize("weight_grad", [False, True])  # dh in the forward sweep / recomputed
def test_linear_cross_entropy_matches_full_logits(weight_grad):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    weight = torch.randn(333, 20, generator=gen, dtype=torch.float64) / 20**0.5 * 2
    b = torch.randn(333, generator=gen, dtype=torch.float64)
    grad_out = torch.rand(50, generator=gen, dtype=torch.float64)
    grad_out[::5] = 0.0
    targets = torch.randint(0, 333, (50,), generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in (
        lambda hh, w, bb: torch.nn.functional.cross_entropy((hh @ w.T + bb) / 0.8, targets, reduction="none"),
        lambda hh, w, bb: torch_linear_cross_entropy(
            hh, w, bb, targets, temperature=0.8, memory_budget_mb=0.01
        ),
    ):
        hh, w, bb = (
            h.clone().requires_grad_(),
            weight.clone().requires_grad_(weight_grad),
            b.clone().requires_grad_(weight_grad),
        )
        loss = fn(hh, w, bb)
        (loss * grad_out).sum().backward()
        outs.append([loss.detach(), hh.grad, w.grad, bb.grad])
    for x, y in zip(*outs):
        assert (x is None) == (y is None)
        if x is not None:
            assert (x - y).abs().max().item() < 1e-10
