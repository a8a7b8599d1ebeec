"""The 3-GEMM path's row kernel on its own: loss and g from a given fp32 logit buffer.

Runs on CPU under ``TRITON_INTERPRET=1`` or on CUDA. The buffer holds raw logits as the chunk
GEMM leaves them; the truth is float64 autograd of the full-logit formula on those same fp32
values, and the bound for every g element is the fp32 full-logit reference's own error plus
the rounding of the exact g to the dtype g is stored in (none for fp32; one rounding for bf16 /
fp16 without the split, g_hi + g_lo with it).
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

from sdft_kernels.reference import divergence_from_logits  # noqa: E402
from sdft_kernels.triton_rows import launch_rows, prescale_exponents  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# Relative error of one rounding to the stored dtype: round to nearest on GPUs (bf16 keeps 8
# significant bits, fp16 11); the interpreter converts fp32 to bf16 by truncation (checked: half
# of all values differ from torch's round-to-nearest), a full bf16 ulp.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** (-7 if INTERPRETED else -8), torch.float16: 2.0**-11}
FP32_ULP = 2.0**-24


def fp32_slack(student, teacher, bias, temperature):
    """Per row: a few fp32 roundings of the log-sum-exps, relative. An fp32 lse of size L is off by
    ~L 2^-24 per rounding, and p = exp(z - lse) inherits that as a relative error: our online
    lse and the reference's differ by a few such roundings."""
    lse = [torch.logsumexp((x.double() + bias.double()) / temperature, dim=1) for x in (student, teacher)]
    return 8 * FP32_ULP * (1.0 + torch.maximum(lse[0].abs(), lse[1].abs()))[:, None]


def raw_logits(rows, vocab, *, spread, closeness, seed=0):
    """Raw student and teacher logits [rows, V] (fp32) and a bias."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen) * spread
    teacher = student + closeness * torch.randn(rows, vocab, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    return student, teacher, bias


def exact_loss_and_grad(student, teacher, bias, alpha, temperature, dtype=torch.float64):
    """Per-token loss and g = dLoss/dz_s by autograd of the full-logit formula in ``dtype``, and
    p_s + p_t (the size of the terms g is formed from)."""
    z_s = ((student.to(dtype) + bias.to(dtype)) / temperature).requires_grad_()
    z_t = (teacher.to(dtype) + bias.to(dtype)) / temperature
    loss = divergence_from_logits(z_s, z_t, alpha)
    (grad,) = torch.autograd.grad(loss.sum(), z_s)
    probs = (z_s.detach().softmax(1) + z_t.softmax(1)).double()
    return loss.detach().double(), grad.double(), probs


def stored_grad(buffer, rows, vocab, grad_dtype, exponents, split=False):
    """g as the GEMM will read it: fp32 student rows, or g_hi (+ g_lo) in the input dtype."""
    if grad_dtype == torch.float32:
        return buffer[:rows].double()
    view = buffer.view(grad_dtype)
    grad = view[:rows, :vocab].double()
    if split:
        grad = grad + view[rows : 2 * rows, :vocab].double()
    if exponents is not None:
        grad = grad * torch.exp2(-exponents.double())[:, None].to(grad.device)
    return grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_is_diff", [True, False])
def test_loss_and_gradient_within_bounds(alpha, grad_dtype, teacher_is_diff):
    rows, vocab, temperature = 5, 201, 1.3
    student, teacher, bias = raw_logits(rows, vocab, spread=3.0, closeness=0.5, seed=int(alpha * 10))
    second = teacher - student if teacher_is_diff else teacher
    buffer = torch.cat([student, second]).to(DEVICE)
    original = buffer.clone()
    split = (
        grad_dtype in UNIT_ROUNDOFF and alpha == 0.5
    )  # the split on one mode, plain rounding on the others
    row_weight = torch.linspace(0.5, 2.0, rows)
    loss, exponents = launch_rows(
        buffer, bias.to(DEVICE), alpha, temperature, teacher_is_diff=teacher_is_diff,
        grad_dtype=grad_dtype, split_g=split, row_weight=row_weight.to(DEVICE),
    )  # fmt: skip
    exact_loss, exact_grad, probs = exact_loss_and_grad(student, teacher, bias, alpha, temperature)
    ref_loss, ref_grad, _ = exact_loss_and_grad(student, teacher, bias, alpha, temperature, torch.float32)
    slack = fp32_slack(student, teacher, bias, temperature)  # [rows, 1]
    loss_bound = (
        ref_loss - exact_loss
    ).abs().max().item() + slack.max().item() * exact_loss.abs().max().item()
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    assert (loss.cpu().double() - exact_loss).abs().max().item() <= loss_bound
    assert (exponents is not None) == (grad_dtype == torch.float16)
    if grad_dtype is None:
        assert torch.equal(buffer, original)  # the loss-only pass writes nothing
        return
    exact_grad = exact_grad * row_weight.double()[:, None]
    # Per element: the fp32 reference's error (its row's worst: fp32 noise differs element by
    # element), the fp32 slack of the log-sum-exps on the terms g is formed from (p_s, p_t: they
    # cancel where the student is close to the teacher), one rounding of the exact value to the
    # stored dtype (hi + lo: ~twice the bits), and fp16's subnormal spacing after the prescale.
    ref_error = (ref_grad.double() * row_weight.double()[:, None] - exact_grad).abs().amax(1, keepdim=True)
    unit = UNIT_ROUNDOFF.get(grad_dtype, 0.0)
    unit = 2 * unit * unit if split else unit
    row_max = exact_grad.abs().amax(1, keepdim=True)
    terms = (probs * row_weight.double()[:, None]).amax(1, keepdim=True) + row_max
    bound = ref_error + slack * terms + unit * exact_grad.abs() + 2.0**-38 * row_max
    mine = stored_grad(
        buffer.cpu(), rows, vocab, grad_dtype, None if exponents is None else exponents.cpu(), split
    )
    excess = ((mine - exact_grad).abs() - bound).max().item()
    assert excess <= 0.0, f"g error exceeds its bound by {excess:.3g}"


def test_fp16_prescale_keeps_tiny_gradients():
    """g w_n runs down to ~1e-10 (a reduction's weight 1/M of 1e4 tokens times a g of 1e-6),
    below fp16's normal range (6e-5, smallest subnormal 6e-8): unscaled, the first row below
    would round to zero. The power-of-two prescale must bring every row's largest stored value
    into (2^13, 2^14] and keep each row's relative accuracy at fp16's rounding."""
    rows, vocab = 4, 150
    student, teacher, bias = raw_logits(rows, vocab, spread=2.0, closeness=0.3, seed=3)
    row_weight = torch.tensor([1e-9, 1e-6, 1e-3, 1.0])
    buffer = torch.cat([student, teacher - student]).to(DEVICE)
    _, exponents = launch_rows(
        buffer, bias.to(DEVICE), 0.0, 1.0, teacher_is_diff=True, grad_dtype=torch.float16,
        row_weight=row_weight.to(DEVICE),
    )  # fmt: skip
    exact = exact_loss_and_grad(student, teacher, bias, 0.0, 1.0)[1] * row_weight.double()[:, None]
    row_max = exact.abs().amax(1)
    assert row_max[0] < 6e-8  # would underflow in fp16
    stored_max = buffer.cpu().view(torch.float16)[:rows, :vocab].double().abs().amax(1)
    assert ((stored_max > 2.0**13) & (stored_max <= 2.0**14)).all(), stored_max
    mine = stored_grad(buffer.cpu(), rows, vocab, torch.float16, exponents.cpu())
    relative = (mine - exact).abs().amax(1) / row_max
    ref = (
        exact_loss_and_grad(student, teacher, bias, 0.0, 1.0, torch.float32)[1] * row_weight.double()[:, None]
    )
    ref_relative = (ref - exact).abs().amax(1) / row_max
    slack = fp32_slack(student, teacher, bias, 1.0)[:, 0]
    assert (relative <= ref_relative + UNIT_ROUNDOFF[torch.float16] + slack).all(), (relative, ref_relative)


def test_prescale_exponents():
    grad_max = torch.tensor([0.0, 1.0, 3e-9, 40.0, 2.0**-140])
    k = prescale_exponents(grad_max)
    assert k.dtype == torch.int32 and k[0] == 0
    scaled = grad_max[1:4].double() * torch.exp2(k[1:4].double())
    assert ((scaled > 2.0**13) & (scaled <= 2.0**14)).all()
    assert k[4] == 120  # clamped: 2^k stays finite in fp32
