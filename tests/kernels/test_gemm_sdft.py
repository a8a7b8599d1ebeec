"""The 3-GEMM path (chunk GEMMs + Triton row kernel + g @ W) against the float64 oracle.

Runs on CPU under ``TRITON_INTERPRET=1`` (the GEMMs are torch ops, the row kernel runs in the
interpreter) or on CUDA. Error budgets as in test_triton_sdft: our error against float64 may
not exceed the same-dtype full-logit reference's plus the dtype's tolerance. Three regimes —
independent student and teacher, student ~ teacher (KL ~ 1e-3) and peaked logits (W x 6) — and
N not a multiple of the chunk height.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from sdft_kernels import gemm_sdft, triton_configs  # noqa: E402
from sdft_kernels.reference import reference_token_losses  # noqa: E402
from sdft_kernels.triton_sdft import triton_token_losses  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# Allowed excess relative error over the same-dtype reference (relative to the oracle's max).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
REGIMES = {  # teacher noise around the student, logit scale (std of the logits)
    "independent": (None, 3.0),
    "close": (0.02, 3.0),
    "peaked": (0.7, 18.0),  # W x 6
}


def make_inputs(num_tokens, hidden, vocab, dtype, regime, *, bias=False, seed=0):
    noise, logit_scale = REGIMES[regime]
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(num_tokens, hidden, generator=gen)
    if noise is None:
        teacher = torch.randn(num_tokens, hidden, generator=gen)
    else:
        teacher = student + noise * torch.randn(num_tokens, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * (logit_scale / hidden**0.5)
    bias_t = torch.randn(vocab, generator=gen) if bias else None
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)
    return cast(student), cast(teacher), cast(weight), cast(bias_t)


def losses_and_grads(fn, student, teacher, weight, bias, grad_out, *, head, **kw):
    """fn forward + backward on fresh leaves: (loss, [d student, (d weight, d bias)])."""
    student = student.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(head)
    bias = None if bias is None else bias.detach().requires_grad_(head)
    loss = fn(student, teacher, weight, bias, **kw)
    wrt = [student] + ([weight] + ([bias] if bias is not None else []) if head else [])
    return loss.detach(), list(torch.autograd.grad(loss, wrt, grad_out.to(loss.dtype)))


def relative_error(value, exact):
    return ((value.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def assert_within_budget(student, teacher, weight, bias, grad_out, *, alpha, head=False, **ours_kw):
    kw = dict(alpha=alpha, temperature=1.3, head=head)
    ours = losses_and_grads(triton_token_losses, student, teacher, weight, bias, grad_out, **kw, **ours_kw)
    same = losses_and_grads(reference_token_losses, student, teacher, weight, bias, grad_out, **kw)
    as64 = [None if t is None else t.double() for t in (student, teacher, weight, bias)]
    exact = losses_and_grads(
        reference_token_losses, *as64, grad_out.double(), compute_dtype=torch.float64, **kw
    )
    tol = TOLERANCE[student.dtype]
    names = ["loss", "d_student", "d_weight", "d_bias"]
    for name, mine, theirs, truth in zip(
        names, [ours[0], *ours[1]], [same[0], *same[1]], [exact[0], *exact[1]]
    ):
        assert mine.shape == truth.shape and torch.isfinite(mine).all(), name
        err, ref_err = relative_error(mine, truth), relative_error(theirs, truth)
        assert err <= ref_err + tol, f"{name}: error {err:.3g} > same-dtype reference {ref_err:.3g} + {tol:g}"
    return exact


def incoming_gradient(num_tokens, seed=1):
    """Non-uniform, with exact zeros (tokens a caller's reduction masks)."""
    grad_out = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed)) + 0.25
    grad_out[::4] = 0.0
    return grad_out.to(DEVICE)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_regimes_error_budget(regime, alpha, dtype):
    """N = 21 in chunks of 8 (the last one short), V = 150 over several row-kernel blocks."""
    student, teacher, weight, _ = make_inputs(21, 24, 150, dtype, regime, seed=7)
    exact = assert_within_budget(
        student, teacher, weight, None, incoming_gradient(21), alpha=alpha, chunk_rows=8
    )
    if regime == "close":  # the regime is what it claims to be
        assert 1e-4 < exact[0].mean().item() < 1e-2


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fp16_close_regime(alpha):
    student, teacher, weight, bias = make_inputs(13, 24, 150, torch.float16, "close", bias=True, seed=2)
    assert_within_budget(student, teacher, weight, bias, incoming_gradient(13), alpha=alpha, chunk_rows=5)


@pytest.mark.parametrize(
    "dtype,alpha,proportional",
    [
        (torch.float32, 0.0, True),
        (torch.float32, 0.5, False),
        (torch.bfloat16, 1.0, True),
        (torch.bfloat16, 0.5, False),
        (torch.float16, 0.0, True),
    ],
)
def test_full_fine_tuning_dw_and_dbias(dtype, alpha, proportional):
    """With grad_weights the forward sums dW and dbias. The backward must scale them when the
    incoming gradient is proportional to grad_weights, and sweep again when it is not."""
    student, teacher, weight, bias = make_inputs(19, 20, 130, dtype, "independent", bias=True, seed=5)
    grad_out = incoming_gradient(19, seed=3)
    expected = grad_out * 0.5 if proportional else torch.rand(19, generator=torch.Generator().manual_seed(8))
    assert_within_budget(
        student, teacher, weight, bias, grad_out, alpha=alpha, head=True, chunk_rows=8,
        grad_weights=expected.to(DEVICE),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proportional", [True, False])
def test_frozen_head_with_grad_weights(dtype, proportional):
    """With grad_weights the forward stores the weighted dh in the input dtype; the backward
    scales it by s (here 2, a power of two: exact) or sweeps again for another gradient."""
    student, teacher, weight, _ = make_inputs(19, 20, 130, dtype, "close", seed=6)
    grad_out = incoming_gradient(19, seed=4)
    expected = grad_out * 0.5 if proportional else torch.rand(19, generator=torch.Generator().manual_seed(9))
    assert_within_budget(
        student, teacher, weight, None, grad_out, alpha=0.5, chunk_rows=8, grad_weights=expected.to(DEVICE)
    )


def test_head_gradients_without_grad_weights():
    """No expected gradient (reduction="none"): dW and dbias come from the backward's sweep."""
    student, teacher, weight, bias = make_inputs(11, 20, 100, torch.float32, "close", bias=True, seed=9)
    assert_within_budget(
        student, teacher, weight, bias, incoming_gradient(11), alpha=1.0, head=True, chunk_rows=4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_ragged_vocabulary(monkeypatch, dtype):
    """V = 151937 (a Qwen vocabulary + 1: ragged for every block), cheap N and D."""
    monkeypatch.setattr(triton_configs, "INTERPRETER_ROW_CONFIG", dict(BLOCK_V=8192, num_warps=1))
    student, teacher, weight, _ = make_inputs(3, 8, 151937, dtype, "independent", seed=4)
    assert_within_budget(student, teacher, weight, None, incoming_gradient(3), alpha=0.5, chunk_rows=2)


def test_no_grad_computes_only_the_loss(monkeypatch):
    student, teacher, weight, bias = make_inputs(9, 16, 70, torch.float32, "independent", bias=True)
    steps = []
    real = gemm_sdft.chunked_sweep
    monkeypatch.setattr(gemm_sdft, "chunked_sweep", lambda *a, **k: steps.append(k) or real(*a, **k))
    student.requires_grad_(True)
    with torch.no_grad():
        out = triton_token_losses(student, teacher, weight, bias, alpha=0.5, chunk_rows=4)
    assert out.grad_fn is None and steps == [dict(want_dh=False)]
    with_grad = triton_token_losses(student, teacher, weight, bias, alpha=0.5, chunk_rows=4)
    torch.testing.assert_close(out, with_grad.detach(), rtol=0, atol=0)


def test_student_equal_to_teacher_gives_zero_loss_and_gradient():
    student, _, weight, bias = make_inputs(9, 16, 70, torch.float32, "independent", bias=True)
    for alpha in (0.0, 0.5, 1.0):
        loss, (grad,) = losses_and_grads(
            triton_token_losses, student, student.clone(), weight, bias, torch.ones(9, device=DEVICE),
            head=False, alpha=alpha, chunk_rows=4,
        )  # fmt: skip
        assert loss.abs().max().item() < 1e-6 and grad.abs().max().item() < 1e-6


def test_default_budget_picks_the_path():
    """The default budget (a quarter of the inputs in bf16) holds >= 128-row chunks at the 7B
    head and N = 8192, not at the 0.5B head; tiny problems run as one chunk."""
    cpu = torch.device("cpu")
    rows_7b = gemm_sdft.select_chunk_rows(8192, 3584, 152064, None, cpu, torch.bfloat16)
    assert 128 <= rows_7b < 8192 and rows_7b % gemm_sdft.CHUNK_ROW_MULTIPLE == 0
    used = 8 * rows_7b * 152064 + 4 * 8192 * 3584
    assert used <= gemm_sdft.default_memory_budget_mb(8192, 3584, 152064) * 2**20
    assert gemm_sdft.select_chunk_rows(8192, 896, 151936, None, cpu, torch.bfloat16) == 0
    assert gemm_sdft.select_chunk_rows(37, 33, 201, None, cpu, torch.float32) == 37
    assert gemm_sdft.select_chunk_rows(8192, 896, 151936, 10_000, cpu, torch.bfloat16) == 8192
    assert gemm_sdft.chunk_rows_for_budget(100, 10, 1000, 0.001) == 0


def test_proportional_factor():
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0])
    assert gemm_sdft.proportional_factor(weights * 3.0, weights) == pytest.approx(3.0)
    assert gemm_sdft.proportional_factor(weights + 0.1, weights) is None
    assert gemm_sdft.proportional_factor(torch.zeros(4), torch.zeros(4)) == 0.0
    assert gemm_sdft.proportional_factor(torch.ones(4), torch.zeros(4)) is None
