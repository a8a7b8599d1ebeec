"""Public loss API: TRL-equal values, masks, weights, reductions, dtypes, errors."""

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F
from sdft_kernels.torch_tiles import DEFAULT_MEMORY_BUDGET_MB

from sdft_fast import SelfDistillLoss, linear_cross_entropy, self_distill_loss, token_logprobs
from sdft_fast.loss import REDUCTIONS, reduce_token_losses

IMPLS = ["torch", "reference"]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    IMPLS.append(pytest.param("triton", marks=pytest.mark.triton))


def trl_full_logit_loss(student_logits, teacher_logits, mask, beta, temperature):
    """The full-logit SDFT formula, written out here (not imported from TRL) as the spec:
    per-token generalized JSD over log-softmaxed logits / temperature, masked, summed per
    sequence over its mask count (clamped to 1), then the mean over sequences."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        per = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        per = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    else:
        mix = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        per = beta * F.kl_div(mix, t, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
            mix, s, reduction="none", log_target=True
        ).sum(-1)
    per = per * mask
    return (per.sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def batch(b=3, t=6, d=16, v=61, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, d, generator=g, dtype=dtype)
    h_t = torch.randn(b, t, d, generator=g, dtype=dtype)
    w = torch.randn(v, d, generator=g, dtype=dtype) / 2
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False  # a sequence with no counted token contributes 0
    return h_s, h_t, w, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_equals_trl_full_logit_formula(impl, alpha, temperature):
    dtype = torch.float32 if impl == "triton" else torch.float64
    h_s, h_t, w, mask = batch(dtype=dtype)
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":  # real kernels need CUDA tensors
        h_s, h_t, w, mask = (t.cuda() for t in (h_s, h_t, w, mask))
    expected = trl_full_logit_loss(h_s @ w.T, h_t @ w.T, mask, alpha, temperature)
    got = self_distill_loss(h_s, h_t, w, alpha=alpha, temperature=temperature, loss_mask=mask, impl=impl)
    assert got.dtype == dtype
    assert torch.allclose(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-7)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_reductions_and_token_weights(impl):
    h_s, h_t, w, mask = batch()
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    per = self_distill_loss(h_s, h_t, w, reduction="none", impl="reference")  # [B, T], all counted
    assert per.shape == mask.shape
    wper = per * weights * mask
    kw = dict(loss_mask=mask, token_weights=weights, impl=impl)
    none = self_distill_loss(h_s, h_t, w, reduction="none", **kw)
    assert torch.allclose(none, wper) and (none[~mask] == 0).all()
    assert torch.allclose(self_distill_loss(h_s, h_t, w, reduction="sum", **kw), wper.sum())
    # token weights change values, not how many tokens count
    assert torch.allclose(
        self_distill_loss(h_s, h_t, w, reduction="token_mean", **kw), wper.sum() / mask.sum()
    )
    seq = (wper.sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert torch.allclose(self_distill_loss(h_s, h_t, w, reduction="sequence_mean", **kw), seq)


def ragged_flat_batch():
    """[N, D] tokens of four sequences of lengths 5, 1, 7, 5 with arbitrary labels; the
    one-token sequence is masked out (it counts as a sequence contributing 0)."""
    h_s, h_t, w, mask = batch()
    d = h_s.shape[-1]
    seq = torch.tensor([9] * 5 + [2] + [40] * 7 + [7] * 5)
    mask = mask.reshape(-1).clone()
    mask[5] = False
    return h_s.reshape(-1, d), h_t.reshape(-1, d), w, mask, seq


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["batch", "flat"])
def test_reduce_token_losses_equals_the_loss_reductions(layout, reduction):
    """One unweighted reduction="none" sweep, reduced here with and without token weights,
    gives self_distill_loss's own reductions: values and gradients (float64)."""
    if layout == "batch":
        h_s, h_t, w, mask = batch()
        seq = None
    else:
        h_s, h_t, w, mask, seq = ragged_flat_batch()
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    student = h_s.clone().requires_grad_()
    per = self_distill_loss(student, h_t, w, loss_mask=mask, sequence_ids=seq, reduction="none")
    for token_weights in (None, weights):
        kw = dict(loss_mask=mask, token_weights=token_weights, sequence_ids=seq, reduction=reduction)
        ours = reduce_token_losses(per, **kw)
        student_again = h_s.clone().requires_grad_()
        expected = self_distill_loss(student_again, h_t, w, **kw)
        assert ours.shape == expected.shape and ours.dtype == expected.dtype
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
        (grad_ours,) = torch.autograd.grad(ours.sum(), student, retain_graph=True)
        (grad_expected,) = torch.autograd.grad(expected.sum(), student_again)
        assert grad_ours.abs().max() > 0
        torch.testing.assert_close(grad_ours, grad_expected, rtol=1e-12, atol=1e-15)
        # Masked tokens count for nothing, whatever value they carry.
        noisy = per.detach() + 1e3 * (~mask)
        torch.testing.assert_close(reduce_token_losses(noisy, **kw), ours.detach(), rtol=1e-12, atol=1e-15)


def test_reduce_token_losses_validates_like_the_loss():
    per = torch.rand(3, 6)
    with pytest.raises(ValueError, match="sequence_ids"):
        reduce_token_losses(per.reshape(-1))
    with pytest.raises(ValueError, match=r"loss_mask has shape \(3, 5\)"):
        reduce_token_losses(per, loss_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_weights contains NaN"):
        reduce_token_losses(per, token_weights=torch.full((3, 6), float("nan")))
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_token_losses(per, reduction="mean")
    with pytest.raises(ValueError, match="floating-point"):
        reduce_token_losses(torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"per_token must be a \[B, T\] or \[N\]"):
        reduce_token_losses(per[None])


def test_memory_budget_default_is_the_kernels_one():
    for fn in (self_distill_loss, linear_cross_entropy, token_logprobs, SelfDistillLoss):
        assert inspect.signature(fn).parameters["memory_budget_mb"].default == DEFAULT_MEMORY_BUDGET_MB
    h_s, h_t, w, mask = batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="memory_budget_mb must be None"):
        self_distill_loss(h_s, h_t, w, loss_mask=mask, memory_budget_mb=0)


TRITON_ONLY = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="impl='triton' needs CUDA or TRITON_INTERPRET=1",
)


@TRITON_ONLY
@pytest.mark.triton
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("head", [False, True])
def test_triton_reductions_with_an_incoming_gradient(monkeypatch, reduction, head):
    """impl="triton" (the 3-GEMM path at the default budget) under every reduction, with token
    weights and a mask, and an incoming gradient that is not 1 (a scalar 1.7, or per-token values
    for reduction="none"): loss and gradients within the fp32 error budget of the float64 oracle.
    With a trainable head, the reduced losses let the forward sum dW (grad_weights from the
    reduction), reduction="none" takes the backward's second sweep."""
    device = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
    h_s, h_t, w, mask = (t.to(device) for t in batch(dtype=torch.float64))
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    weights = (
        torch.rand(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    ).to(device)

    def run(dtype, impl):
        leaves = [t.to(dtype).requires_grad_() for t in (h_s, w, b)]
        leaves[1].requires_grad_(head)
        leaves[2].requires_grad_(head)
        loss = self_distill_loss(
            leaves[0], h_t.to(dtype), leaves[1], leaves[2], alpha=0.5, loss_mask=mask,
            token_weights=weights.to(dtype), reduction=reduction, impl=impl,
        )  # fmt: skip
        incoming = torch.full_like(loss, 1.7)
        if reduction == "none":
            incoming = torch.rand(loss.shape, generator=torch.Generator().manual_seed(6), dtype=loss.dtype)
            incoming = incoming.to(device)
        wrt = leaves if head else leaves[:1]
        return [loss.detach().double()] + [g.double() for g in torch.autograd.grad(loss, wrt, incoming)]

    from sdft_kernels import gemm_sdft

    sweeps = []
    real_sweep = gemm_sdft.chunked_sweep
    monkeypatch.setattr(gemm_sdft, "chunked_sweep", lambda *a, **k: sweeps.append(k) or real_sweep(*a, **k))
    ours = run(torch.float32, "triton")
    # one sweep (the forward) unless the head trains with no reduction to expect a gradient from
    assert len(sweeps) == (2 if head and reduction == "none" else 1)
    same, exact = run(torch.float32, "reference"), run(torch.float64, "reference")
    for name, mine, theirs, truth in zip(["loss", "d_student", "d_weight", "d_bias"], ours, same, exact):
        scale = truth.abs().max().item()
        err, ref_err = (mine - truth).abs().max().item(), (theirs - truth).abs().max().item()
        assert err <= ref_err + 2e-5 * scale, f"{name}: {err:.3g} > {ref_err:.3g} + 2e-5 * {scale:.3g}"


def test_flat_inputs_take_sequences_from_sequence_ids():
    h_s, h_t, w, mask = batch()
    expected = self_distill_loss(h_s, h_t, w, loss_mask=mask)
    d = h_s.shape[-1]
    seq_ids = torch.arange(3).repeat_interleave(6) * 7 + 5  # arbitrary labels, mapped densely
    got = self_distill_loss(
        h_s.reshape(-1, d), h_t.reshape(-1, d), w, loss_mask=mask.reshape(-1), sequence_ids=seq_ids
    )
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError, match="sequence_ids"):
        self_distill_loss(h_s.reshape(-1, d), h_t.reshape(-1, d), w)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean", "sum", "none"])
def test_all_masked_gives_zero_loss_and_zero_gradients(reduction):
    h_s, h_t, w, _ = batch(dtype=torch.float32)
    h_s.requires_grad_()
    w.requires_grad_()
    loss = self_distill_loss(h_s, h_t, w, loss_mask=torch.zeros(3, 6, dtype=torch.bool), reduction=reduction)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(h_s.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_fp32_loss_and_input_dtype_gradients(dtype):
    h_s, h_t, w, mask = batch(dtype=dtype)
    h_s.requires_grad_()
    loss = self_distill_loss(h_s, h_t, w, loss_mask=mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert h_s.grad.dtype == dtype
    ref = self_distill_loss(h_s.detach().double(), h_t.double(), w.double(), loss_mask=mask, impl="reference")
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())


def test_gradients_flow_to_student_and_head_only_when_asked():
    h_s, h_t, w, mask = batch(dtype=torch.float32)
    b = torch.zeros(w.shape[0])
    h_s.requires_grad_()
    h_t.requires_grad_()  # a teacher that requires grad is a constant, not an error
    self_distill_loss(h_s, h_t, w, b, loss_mask=mask).backward()
    assert h_s.grad is not None and h_t.grad is None
    w.requires_grad_()
    b.requires_grad_()
    h_s.grad = None
    loss = self_distill_loss(h_s, h_t, w, b, loss_mask=mask)
    loss.backward()
    ref_w = w.detach().clone().requires_grad_()
    ref_b = b.detach().clone().requires_grad_()
    self_distill_loss(h_s.detach(), h_t.detach(), ref_w, ref_b, loss_mask=mask, impl="reference").backward()
    assert torch.allclose(w.grad, ref_w.grad, atol=1e-6) and torch.allclose(b.grad, ref_b.grad, atol=1e-6)


def test_no_grad_builds_no_graph():
    h_s, h_t, w, mask = batch(dtype=torch.float32)
    h_s.requires_grad_()
    with torch.no_grad():
        loss = self_distill_loss(h_s, h_t, w, loss_mask=mask)
    assert loss.grad_fn is None


def test_student_equals_teacher_is_zero():
    h_s, _, w, mask = batch(dtype=torch.float32)
    assert self_distill_loss(h_s, h_s, w, alpha=0.5).abs().item() < 1e-6


def test_module_form():
    h_s, h_t, w, mask = batch()
    module = SelfDistillLoss(alpha=0.3, temperature=1.5, reduction="token_mean")
    assert "alpha=0.3" in repr(module)
    assert torch.allclose(
        module(h_s, h_t, w, loss_mask=mask),
        self_distill_loss(h_s, h_t, w, alpha=0.3, temperature=1.5, loss_mask=mask, reduction="token_mean"),
    )


BAD = [
    (dict(teacher_hidden="short"), "teacher_hidden must have the shape"),
    (dict(lm_head_weight="wrong_d"), r"D=15.*D=16"),
    (dict(lm_head_bias="wrong_v"), r"lm_head_bias must be a \[V\]"),
    (dict(alpha=1.5), "alpha must be a number in"),
    (dict(alpha=-0.1), "alpha must be a number in"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(student_hidden="nan"), "student_hidden .* NaN/inf"),
    (dict(teacher_hidden="inf"), "teacher_hidden .* NaN/inf"),
    (dict(teacher_hidden="f64"), "dtype torch.float64 differs"),
    (dict(loss_mask="float"), "loss_mask must be a bool"),
    (dict(loss_mask="shape"), r"loss_mask has shape \(3, 5\)"),
    (dict(token_weights="nan"), "token_weights contains NaN"),
    (dict(reduction="mean"), "reduction must be one of"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(student_hidden="1d"), r"student_hidden must be a \[B, T, D\]"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_input_raises_value_error_naming_the_problem(change, message):
    h_s, h_t, w, mask = batch(dtype=torch.float32)
    args = dict(student_hidden=h_s, teacher_hidden=h_t, lm_head_weight=w, lm_head_bias=None)
    kw = {}
    for key, value in change.items():
        if key in ("alpha", "temperature", "reduction", "impl"):
            kw[key] = value
        elif value == "short":
            args[key] = h_t[:, :2]
        elif value == "wrong_d":
            args[key] = w[:, :15]
        elif value == "wrong_v":
            args[key] = torch.zeros(w.shape[0] + 1)
        elif value == "nan":
            bad = (args.get(key) if key in args else torch.ones(3, 6)).clone()
            bad[0, 0] = float("nan")
            if key in args:
                args[key] = bad
            else:
                kw[key] = bad
        elif value == "inf":
            bad = args[key].clone()
            bad[1, 1] = float("inf")
            args[key] = bad
        elif value == "f64":
            args[key] = args[key].double()
        elif value == "float":
            kw[key] = mask.float()
        elif value == "shape":
            kw[key] = mask[:, :5]
        elif value == "1d":
            args[key] = h_s[0, 0]
    with pytest.raises(ValueError, match=message):
        self_distill_loss(*args.values(), **kw)


def test_linear_cross_entropy_and_token_logprobs():
    h, _, w, mask = batch()
    targets = torch.randint(0, w.shape[0], mask.shape, generator=torch.Generator().manual_seed(1))
    logits = h @ w.T
    per = F.cross_entropy(logits.reshape(-1, w.shape[0]), targets.reshape(-1), reduction="none").reshape(
        mask.shape
    )
    expected = ((per * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert torch.allclose(linear_cross_entropy(h, w, None, targets, loss_mask=mask), expected)
    lp = token_logprobs(h, w, None, targets)
    assert torch.allclose(lp, -per) and lp.grad_fn is None
    with pytest.raises(ValueError, match="targets must be token ids"):
        linear_cross_entropy(h, w, None, targets + w.shape[0])


def test_auto_impl_choice():
    from sdft_fast.loss import _resolve_impl

    cuda = torch.device("cuda")  # only inspected, never allocated on
    assert _resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert _resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert _resolve_impl("auto", cuda, torch.float64) == "torch"  # the kernels take fp32/bf16/fp16
