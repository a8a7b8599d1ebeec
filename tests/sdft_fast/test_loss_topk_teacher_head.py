"""The loss API's TRL modes: ``topk`` (TRL's topk_logits, with and without the tail bucket) and a
teacher head of its own (``teacher_weight``), against TRL's own full-logit functions; ties; errors."""

import os

import pytest
import torch

from sdft_fast import self_distill_loss

loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")

IMPLS = ["torch", "reference"]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    IMPLS.append(pytest.param("triton", marks=pytest.mark.triton))


def _batch(teacher_dim=None, seed=0, batch=2, steps=5, dim=12, vocab=97):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    teacher_dim = teacher_dim or dim
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[0, :2] = False  # skipped first tokens
    mask[1, 4:] = False  # padding
    return dict(
        h_s=rand(batch, steps, dim),
        h_t=rand(batch, steps, teacher_dim),
        weight=rand(vocab, dim) * 0.8,
        bias=rand(vocab) * 0.2,
        teacher_weight=rand(vocab, teacher_dim) * 0.8 if teacher_dim != dim else None,
        mask=mask,
    )


def _trl_loss(x, per_token_fn, temperature):
    # TRL's per-token function on full logits / temperature, then its sequence-mean normalisation.
    teacher_weight = x["weight"] if x["teacher_weight"] is None else x["teacher_weight"]
    teacher_bias = x["bias"] if x["teacher_weight"] is None else None
    z_s = torch.nn.functional.linear(x["h_s"], x["weight"], x["bias"]) / temperature
    with torch.no_grad():
        z_t = torch.nn.functional.linear(x["h_t"], teacher_weight, teacher_bias) / temperature
    per_token = per_token_fn(z_s, z_t)
    mask = x["mask"].to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_equals_trl(impl, tail, alpha):
    x = _batch()
    dtype = torch.float32 if impl == "triton" else torch.float64
    leaves = {n: x[n].to(dtype).requires_grad_() for n in ("h_s", "weight", "bias")}
    ours = self_distill_loss(
        leaves["h_s"],
        x["h_t"].to(dtype),
        leaves["weight"],
        leaves["bias"],
        alpha=alpha,
        temperature=0.7,
        loss_mask=x["mask"],
        topk=9,
        topk_tail=tail,
        impl=impl,
    )

    def spec(spec_dtype):  # TRL's function on full logits in spec_dtype: (loss, grads)
        spec_leaves = {n: x[n].to(spec_dtype).requires_grad_() for n in ("h_s", "weight", "bias")}
        cast = {
            n: t.to(spec_dtype) if torch.is_floating_point(t) else t for n, t in x.items() if t is not None
        }
        loss = _trl_loss(
            {**x, **cast, **spec_leaves},
            lambda s, t: loss_utils.compute_topk_self_distillation_loss(
                s, t, distillation_topk=9, distillation_alpha=alpha, distillation_add_tail=tail
            ),
            0.7,
        )
        return [loss.double()] + [g.double() for g in _grads(loss, *spec_leaves.values())]

    exact = spec(torch.float64)
    # Error budget per tensor: float64 matches to rounding; fp32 may be off the float64 spec by at
    # most 8x TRL's own fp32 error (the tail bucket's log(1 - P_topk) amplifies logit rounding
    # alike in both, at different elements) plus a few ulps of the largest value.
    same_dtype = exact if dtype == torch.float64 else spec(torch.float32)
    for got, want, rounded in zip([ours] + list(_grads(ours, *leaves.values())), exact, same_dtype):
        scale = want.abs().max()
        budget = 8 * (rounded - want).abs().max() + 1e-12 * scale
        if dtype != torch.float64:
            budget = budget + 4 * torch.finfo(torch.float32).eps * scale
        assert float((got.detach().double() - want).abs().max()) <= float(budget)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_teacher_head_of_its_own_equals_trl_full_logits(impl, alpha):
    x = _batch(teacher_dim=7)
    leaves = {n: x[n].clone().requires_grad_() for n in ("h_s", "weight", "bias")}
    ours = self_distill_loss(
        leaves["h_s"],
        x["h_t"],
        leaves["weight"],
        leaves["bias"],
        teacher_weight=x["teacher_weight"],
        alpha=alpha,
        temperature=1.3,
        loss_mask=x["mask"],
        impl=impl,
        memory_budget_mb=0.01,
    )
    spec_leaves = {n: x[n].clone().requires_grad_() for n in ("h_s", "weight", "bias")}
    spec = _trl_loss(
        {**x, **spec_leaves},
        lambda s, t: loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha),
        1.3,
    )
    torch.testing.assert_close(ours, spec, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(ours, *leaves.values()), _grads(spec, *spec_leaves.values())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_teacher_head_with_topk_and_auto_impl():
    x = _batch(teacher_dim=7)
    kwargs = dict(loss_mask=x["mask"], topk=5, topk_tail=True)
    names = ("h_s", "h_t", "weight", "teacher_weight")
    exact = self_distill_loss(*(x[n] for n in names[:3]), teacher_weight=x["teacher_weight"], **kwargs)
    fp32 = [x[n].float() for n in names]
    auto = self_distill_loss(*fp32[:3], teacher_weight=fp32[3], **kwargs)
    rounded = self_distill_loss(*fp32[:3], teacher_weight=fp32[3], impl="reference", **kwargs)
    budget = 8 * abs(float(rounded) - float(exact)) + 4 * torch.finfo(torch.float32).eps * float(exact)
    assert abs(float(auto) - float(exact)) <= budget


def test_same_head_passed_as_teacher_weight_takes_the_shared_head_path():
    x = _batch()
    shared = self_distill_loss(x["h_s"], x["h_t"], x["weight"], loss_mask=x["mask"], alpha=0.5)
    same = self_distill_loss(
        x["h_s"], x["h_t"], x["weight"], teacher_weight=x["weight"], loss_mask=x["mask"], alpha=0.5
    )
    torch.testing.assert_close(shared, same, rtol=0, atol=0)


@pytest.mark.parametrize("tail", [False, True])
def test_tied_logits_at_the_boundary_do_not_change_the_loss(tail):
    # Head rows 3, 40, 41, 60 identical: every row's logits tie there, and k cuts through the
    # group. TRL's torch.topk keeps tied ids in an implementation-defined order (not always the
    # lower ones: counted below); with a shared head every choice gives our loss, because the tied
    # ids carry identical student and teacher values.
    x = _batch(vocab=64)
    weight = x["weight"].clone()
    weight[[40, 41, 60]] = weight[3].clone()
    bias = x["bias"].clone()
    bias[[40, 41, 60]] = bias[3].item()
    h_s, h_t = x["h_s"].reshape(-1, 12), x["h_t"].reshape(-1, 12)
    z = h_s @ weight.T + bias
    ranks = (z > z[:, 3:4]).sum(1)
    disagreements = 0
    for row in range(h_s.shape[0]):
        k = int(ranks[row]) + 2  # two of the four tied ids get in; ours: 3 and 40
        disagreements += set(torch.topk(z[row], k).indices.tolist()) & {3, 40, 41, 60} != {3, 40}
        one = {"h_s": h_s[row : row + 1, None], "h_t": h_t[row : row + 1, None]}
        ours = self_distill_loss(one["h_s"], one["h_t"], weight, bias, alpha=0.5, topk=k, topk_tail=tail)
        spec = _trl_loss(
            {**x, **one, "weight": weight, "bias": bias, "mask": torch.ones(1, 1, dtype=torch.bool)},
            lambda s, t, k=k: loss_utils.compute_topk_self_distillation_loss(
                s, t, distillation_topk=k, distillation_alpha=0.5, distillation_add_tail=tail
            ),
            1.0,
        )
        torch.testing.assert_close(ours, spec, rtol=1e-12, atol=1e-14)
    assert disagreements > 0  # the rows did exercise a different choice of tied ids


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(topk=0), "topk must be an integer in [1, V=97]"),
        (dict(topk=98), "topk must be an integer in [1, V=97]"),
        (dict(topk_tail=True), "topk_tail=True needs topk"),
        (dict(topk=3, topk_support="both"), "topk_support must be one of"),
        (dict(teacher_bias=torch.zeros(97, dtype=torch.float64)), "teacher_bias needs teacher_weight"),
        (
            dict(teacher_weight=torch.zeros(90, 12, dtype=torch.float64)),
            "the teacher must share the student's vocabulary",
        ),
        (dict(teacher_weight=torch.zeros(97, 5, dtype=torch.float64)), "the hidden size of teacher_weight"),
        (
            dict(teacher_weight=torch.zeros(97, 12, dtype=torch.float64), impl="triton"),
            "impl='triton' has no kernel",
        ),
    ],
)
def test_bad_options_raise_value_error_naming_them(change, message):
    x = _batch()
    with pytest.raises(ValueError) as error:
        self_distill_loss(x["h_s"], x["h_t"], x["weight"], **change)
    assert message in str(error.value)
