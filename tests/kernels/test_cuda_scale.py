"""Realistic-scale checks of the Triton paths on a CUDA GPU (skipped without one).

Run by bench/gpu_check.sh as its correctness step: model-sized heads in bf16 against a float64
oracle, for both designs (the 3-GEMM path and the fused kernels, forced by the memory budget)
in three regimes — independent student and teacher, student ~ teacher (KL ~ 1e-3) and peaked
logits (W x 6) — for alpha 0 / 0.5 / 1; a 7B-shaped head through the 3-GEMM path (aligned
shapes: cuBLAS with fp32 results, 16-byte loads, the row kernel's full blocks and its ragged last
one); and a problem with N * V > 2**31 that only passes with int64 offsets.
"""

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.triton]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sdft_kernels import gemm_sdft  # noqa: E402

from sdft_fast.loss import self_distill_loss  # noqa: E402

# memory_budget_mb forcing each design at N = 512: 3-GEMM chunks of 192 rows (192, 192, 128) /
# the fused kernels
BUDGETS = {"gemm": 230.0, "fused": 1.0}
REGIMES = {"independent": (None, 2.0), "close": (0.02, 2.0), "peaked": (0.5, 12.0)}  # noise, logit std


def inputs(n, d, v, dtype, regime, seed=0):
    noise, logit_scale = REGIMES[regime]
    g = torch.Generator(device="cuda").manual_seed(seed)
    h_s = torch.randn(n, d, generator=g, device="cuda")
    if noise is None:
        h_t = torch.randn(n, d, generator=g, device="cuda")
    else:
        h_t = h_s + noise * torch.randn(n, d, generator=g, device="cuda")
    w = torch.randn(v, d, generator=g, device="cuda") * (logit_scale / d**0.5)
    return h_s.to(dtype), h_t.to(dtype), w.to(dtype)


def loss_and_grad(h_s, h_t, w, impl, alpha, memory_budget_mb=None):
    h = h_s.detach().requires_grad_()
    grad_out = torch.rand(h.shape[0], generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
    loss = self_distill_loss(
        h, h_t, w, alpha=alpha, reduction="none", impl=impl, memory_budget_mb=memory_budget_mb
    )
    (grad,) = torch.autograd.grad(loss, h, grad_out.to(loss.dtype))
    return loss.detach().double(), grad.double()


def assert_bf16_budget(h_s, h_t, w, alpha, budget):
    oracle = loss_and_grad(h_s.double(), h_t.double(), w.double(), "reference", alpha)
    same_dtype = loss_and_grad(h_s, h_t, w, "reference", alpha)
    ours = loss_and_grad(h_s, h_t, w, "triton", alpha, budget)
    for name, o, r, x in zip(("loss", "d_student"), oracle, same_dtype, ours):
        err_ours = (x - o).abs().max().item()
        err_ref = (r - o).abs().max().item()
        assert err_ours <= err_ref + 2e-3 * o.abs().max().item(), (
            f"{name}: ours {err_ours:.3e}, bf16 reference {err_ref:.3e}"
        )
    return oracle


@pytest.mark.parametrize("design", list(BUDGETS))
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_qwen_head_bf16_error_budget(design, regime, alpha):
    h_s, h_t, w = inputs(512, 896, 151936, torch.bfloat16, regime)
    rows = gemm_sdft.select_chunk_rows(512, 896, 151936, BUDGETS[design], h_s.device, h_s.dtype)
    assert rows == (192 if design == "gemm" else 0)
    oracle = assert_bf16_budget(h_s, h_t, w, alpha, BUDGETS[design])
    if regime == "close":
        assert 1e-4 < oracle[0].mean().item() < 1e-2


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_7b_head_gemm_path(alpha):
    """N = 300 in chunks of 144 and 12 rows at the 7B head (the default budget's chunk height)."""
    h_s, h_t, w = inputs(300, 3584, 152064, torch.bfloat16, "independent", seed=2)
    budget = (8 * 144 * 152064 + 4 * 300 * 3584) / 2**20 + 0.5
    assert gemm_sdft.select_chunk_rows(300, 3584, 152064, budget, h_s.device, h_s.dtype) == 144
    assert_bf16_budget(h_s, h_t, w, alpha, budget)


def test_int64_offsets_beyond_2_pow_31():
    n, d, v = 16384, 64, 152064  # N * V = 2.49e9 > 2**31
    assert n * v > 2**31
    h_s, h_t, w = inputs(n, d, v, torch.bfloat16, "close", seed=1)
    ours = loss_and_grad(h_s, h_t, w, "triton", 0.0, BUDGETS["fused"])
    twin = loss_and_grad(h_s, h_t, w, "torch", 0.0)
    assert torch.allclose(ours[0], twin[0], rtol=1e-3, atol=1e-5)
    # the last rows are the ones whose offsets overflow int32
    tail = slice(n - 512, n)
    assert torch.allclose(ours[1][tail], twin[1][tail], rtol=2e-2, atol=2e-3 * twin[1].abs().max().item())
