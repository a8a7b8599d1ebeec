"""The chunked top-k support against the float64 full-logit oracle: ids, values, log-sum-exps and
gradients (hidden, head, bias), shared or separate teacher head, either support side, ties."""

import pytest
import torch
from sdft_kernels.reference import reference_topk_support
from sdft_kernels.topk_support import topk_divergence
from sdft_kernels.torch_topk import torch_topk_support

TINY_BUDGET = 0.01  # MiB: 2-row chunks and ~160-column tiles, so merges across tiles are exercised


def _inputs(dtype, *, vocab=301, dim=12, teacher_dim=None, tokens=7, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    teacher_dim = teacher_dim or dim
    parts = {
        "student_hidden": rand(tokens, dim),
        "teacher_hidden": rand(tokens, teacher_dim),
        "weight": rand(vocab, dim) * 0.7,
        "bias": rand(vocab) * 0.3 if bias else None,
        "teacher_weight": rand(vocab, teacher_dim) * 0.7 if teacher_dim != dim else None,
    }
    return {name: None if t is None else t.to(dtype).requires_grad_() for name, t in parts.items()}


def _loss(support_out, alpha, tail, probe):
    # A non-trivial function of every output: the divergence plus a probe on the raw values.
    ids, z_s, lse_s, z_t, lse_t = support_out
    loss = topk_divergence(z_s, lse_s if tail else None, z_t, lse_t if tail else None, alpha=alpha, tail=tail)
    return (loss * probe).sum() + 1e-3 * (z_s * z_s).sum()


@pytest.mark.parametrize("support", ["student", "teacher"])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("separate_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_oracle(support, tail, separate_head, dtype):
    x = _inputs(dtype, teacher_dim=9 if separate_head else None)
    k = 11
    probe = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    common = dict(k=k, support=support, temperature=0.8, teacher_weight=x["teacher_weight"])
    ours = torch_topk_support(
        x["student_hidden"],
        x["teacher_hidden"],
        x["weight"],
        x["bias"],
        tail=tail,
        memory_budget_mb=TINY_BUDGET,
        **common,
    )
    oracle_inputs = {n: None if t is None else t.detach().double().requires_grad_() for n, t in x.items()}
    oracle = reference_topk_support(
        oracle_inputs["student_hidden"],
        oracle_inputs["teacher_hidden"],
        oracle_inputs["weight"],
        oracle_inputs["bias"],
        compute_dtype=torch.float64,
        **{**common, "teacher_weight": oracle_inputs["teacher_weight"]},
    )
    assert torch.equal(ours[0], oracle[0])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours[1].double(), oracle[1], **tol)
    torch.testing.assert_close(ours[3].double(), oracle[3], **tol)
    if tail:
        torch.testing.assert_close(ours[2].double(), oracle[2], **tol)
        torch.testing.assert_close(ours[4].double(), oracle[4], **tol)
    else:
        assert ours[2].numel() == 0 and ours[4].numel() == 0
    _loss(ours, 0.5, tail, probe.to(ours[1].dtype)).backward()
    _loss(oracle, 0.5, tail, probe).backward()
    for name in ("student_hidden", "weight", "bias"):
        grad_tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x[name].grad.double(), oracle_inputs[name].grad, **grad_tol, msg=name)
    for name in ("teacher_hidden", "teacher_weight"):
        assert x[name] is None or x[name].grad is None  # the teacher is a constant


def test_frozen_head_tail_gradient_uses_forward_accumulator():
    # Head frozen: d lse_s / dh comes from the expected head row accumulated in the forward sweep.
    x = _inputs(torch.float64, bias=False)
    weight = x["weight"].detach()
    probe = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    ours = torch_topk_support(
        x["student_hidden"], x["teacher_hidden"], weight, k=9, tail=True, memory_budget_mb=TINY_BUDGET
    )
    h = x["student_hidden"].detach().clone().requires_grad_()
    oracle = reference_topk_support(h, x["teacher_hidden"], weight, k=9, compute_dtype=torch.float64)
    _loss(ours, 0.0, True, probe).backward()
    _loss(oracle, 0.0, True, probe).backward()
    torch.testing.assert_close(x["student_hidden"].grad, h.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_go_to_the_lower_id(dtype):
    # Rows 5, 77, 150 and 290 of the head are identical: their logits tie exactly in every row.
    x = _inputs(dtype, bias=False, tokens=5)
    weight = x["weight"].detach().clone()
    weight[[77, 150, 290]] = weight[5].clone()
    z = x["student_hidden"].detach() @ weight.T
    # k cuts through the tied group in every row: take k = (rank of the group) + 2.
    rank = (z > z[:, 5:6]).sum(1)
    for row in range(z.shape[0]):
        k = int(rank[row]) + 2
        ids = torch_topk_support(
            x["student_hidden"][row : row + 1],
            x["teacher_hidden"][row : row + 1],
            weight,
            k=k,
            memory_budget_mb=TINY_BUDGET,
        )[0][0]
        chosen = sorted(set(ids.tolist()) & {5, 77, 150, 290})
        assert chosen == [5, 77], (row, k, ids.tolist())
