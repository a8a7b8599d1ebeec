"""Realistic-scale checks of the Triton kernels on a CUDA GPU (skipped without one).

Run by bench/gpu_check.sh. Model-sized shapes in bf16 against a float64 oracle, and a problem
with N * V > 2**31 that only passes with int64 offsets.
"""

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.triton]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sdft_fast.loss import self_distill_loss  # noqa: E402


def inputs(n, d, v, dtype, seed=0, noise=0.5):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h_s = torch.randn(n, d, generator=g, device="cuda")
    h_t = h_s + noise * torch.randn(n, d, generator=g, device="cuda")
    w = torch.randn(v, d, generator=g, device="cuda") * (2.0 / d**0.5)
    return h_s.to(dtype), h_t.to(dtype), w.to(dtype)


def loss_and_grad(h_s, h_t, w, impl, alpha):
    h = h_s.detach().requires_grad_()
    loss = self_distill_loss(h, h_t, w, alpha=alpha, reduction="sum", impl=impl)
    loss.backward()
    return loss.detach().double(), h.grad.double()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_qwen_shape_bf16_error_budget(alpha):
    h_s, h_t, w = inputs(512, 896, 151936, torch.bfloat16)
    oracle = loss_and_grad(h_s.double(), h_t.double(), w.double(), "reference", alpha)
    same_dtype = loss_and_grad(h_s, h_t, w, "reference", alpha)
    ours = loss_and_grad(h_s, h_t, w, "triton", alpha)
    for name, o, r, x in zip(("loss", "d_student"), oracle, same_dtype, ours):
        err_ours = (x - o).abs().max().item()
        err_ref = (r - o).abs().max().item()
        assert err_ours <= err_ref + 2e-3 * o.abs().max().item(), (
            f"{name}: ours {err_ours:.3e}, bf16 reference {err_ref:.3e}"
        )


def test_int64_offsets_beyond_2_pow_31():
    n, d, v = 16384, 64, 152064  # N * V = 2.49e9 > 2**31
    assert n * v > 2**31
    h_s, h_t, w = inputs(n, d, v, torch.bfloat16, seed=1)
    ours = loss_and_grad(h_s, h_t, w, "triton", 0.0)
    twin = loss_and_grad(h_s, h_t, w, "torch", 0.0)
    assert torch.allclose(ours[0], twin[0], rtol=1e-3)
    # the last rows are the ones whose offsets overflow int32
    tail = slice(n - 512, n)
    assert torch.allclose(ours[1][tail], twin[1][tail], rtol=2e-2, atol=2e-3 * twin[1].abs().max().item())
