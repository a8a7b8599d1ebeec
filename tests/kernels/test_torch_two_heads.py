"""The separate-teacher-head twin against the float64 full-logit oracle: values and gradients for
every alpha, frozen or trained student head, a teacher of another hidden size."""

import pytest
import torch
from sdft_kernels.reference import reference_token_losses
from sdft_kernels.torch_two_heads import torch_two_head_token_losses


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_oracle(alpha, train_head, dtype):
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    tokens, vocab, dim, teacher_dim = 6, 257, 10, 14
    h_s, h_t = rand(tokens, dim), rand(tokens, teacher_dim)
    weight, bias = rand(vocab, dim) * 0.6, rand(vocab) * 0.2
    teacher_weight, teacher_bias = rand(vocab, teacher_dim) * 0.6, rand(vocab) * 0.2
    probe = torch.linspace(0.5, 2.0, tokens, dtype=torch.float64)

    def run(fn, cast, **extra):
        hs = h_s.to(cast).requires_grad_()
        w = weight.to(cast).requires_grad_(train_head)
        b = bias.to(cast).requires_grad_(train_head)
        loss = fn(
            hs,
            h_t.to(cast),
            w,
            b,
            teacher_weight=teacher_weight.to(cast),
            teacher_bias=teacher_bias.to(cast),
            alpha=alpha,
            temperature=0.7,
            **extra,
        )
        (loss.double() * probe).sum().backward()
        return loss.double(), hs.grad.double(), None if w.grad is None else w.grad.double(), b.grad

    ours = run(torch_two_head_token_losses, dtype, memory_budget_mb=0.01)
    oracle = run(reference_token_losses, torch.float64, compute_dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[0], oracle[0], **tol)
    torch.testing.assert_close(ours[1], oracle[1], **tol)
    if train_head:
        torch.testing.assert_close(ours[2], oracle[2], **tol)
        torch.testing.assert_close(ours[3].double(), oracle[3].double(), **tol)
    else:
        assert ours[2] is None


def test_no_grad_forward_equals_grad_forward():
    gen = torch.Generator().manual_seed(4)
    h_s, h_t = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    weight, teacher_weight = torch.randn(130, 8, generator=gen), torch.randn(130, 8, generator=gen)
    with_grad = torch_two_head_token_losses(
        h_s.requires_grad_(), h_t, weight, None, teacher_weight, alpha=0.5
    )
    with torch.no_grad():
        without = torch_two_head_token_losses(h_s, h_t, weight, None, teacher_weight, alpha=0.5)
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)
