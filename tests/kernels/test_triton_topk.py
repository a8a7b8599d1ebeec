"""The Triton top-k kernel (TRITON_INTERPRET=1 on the CPU) against the PyTorch twin and the
float64 oracle: the same ids (ties to the lower id), log-sum-exps, and gradients through the twin."""

import os

import pytest
import torch

pytestmark = pytest.mark.triton

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from sdft_kernels.reference import reference_topk_support  # noqa: E402
from sdft_kernels.torch_topk import torch_topk_support  # noqa: E402
from sdft_kernels.triton_topk import triton_topk_support  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(vocab, dim, teacher_dim, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    return dict(
        student_hidden=rand(tokens, dim).to(DEVICE),
        teacher_hidden=rand(tokens, teacher_dim).to(DEVICE),
        weight=(rand(vocab, dim) * 0.7).to(DEVICE),
        bias=(rand(vocab) * 0.3).to(DEVICE),
        teacher_weight=(rand(vocab, teacher_dim) * 0.7).to(DEVICE) if teacher_dim != dim else None,
    )


@pytest.mark.parametrize(
    "support,tail,teacher_dim,k",
    [("student", False, 24, 20), ("student", True, 40, 7), ("teacher", True, 24, 33)],
)
def test_same_ids_and_statistics_as_oracle(support, tail, teacher_dim, k):
    # V = 203: the last tile is partial; 19 tokens: the last row block is partial.
    x = _inputs(203, 24, teacher_dim, 19)
    common = dict(k=k, support=support, tail=tail, temperature=0.9, teacher_weight=x["teacher_weight"])
    ours = triton_topk_support(x["student_hidden"], x["teacher_hidden"], x["weight"], x["bias"], **common)
    oracle = reference_topk_support(
        *(x[n].double() for n in ("student_hidden", "teacher_hidden", "weight", "bias")),
        k=k,
        support=support,
        temperature=0.9,
        compute_dtype=torch.float64,
        teacher_weight=None if x["teacher_weight"] is None else x["teacher_weight"].double(),
    )
    assert torch.equal(ours[0].cpu(), oracle[0].cpu())
    torch.testing.assert_close(ours[1].double(), oracle[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours[3].double(), oracle[3], rtol=2e-5, atol=2e-5)
    if tail:
        torch.testing.assert_close(ours[2].double(), oracle[2], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(ours[4].double(), oracle[4], rtol=2e-6, atol=2e-6)


def test_ties_and_gradients_match_the_torch_twin():
    x = _inputs(150, 16, 16, 9, seed=1)
    weight = x["weight"].clone()
    weight[[40, 41, 99, 140]] = weight[7].clone()  # four ids whose logits tie in every row
    h = x["student_hidden"].requires_grad_()
    h_twin = x["student_hidden"].detach().clone().requires_grad_()
    ours = triton_topk_support(h, x["teacher_hidden"], weight, x["bias"], k=40, tail=True)
    twin = torch_topk_support(h_twin, x["teacher_hidden"], weight, x["bias"], k=40, tail=True)
    assert torch.equal(ours[0], twin[0])
    probe = torch.linspace(-1.0, 1.0, 40, device=DEVICE)
    ((ours[1] * probe).sum() + ours[2].sum()).backward()
    ((twin[1] * probe).sum() + twin[2].sum()).backward()
    torch.testing.assert_close(h.grad, h_twin.grad, rtol=1e-5, atol=1e-6)
