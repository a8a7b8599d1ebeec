"""Row chunks, vocabulary tiles and the second sweep shared by the PyTorch twins (float64)."""

import torch
from sdft_kernels.torch_tiles import (
    logit_tile,
    online_softmax_update,
    recompute_grads,
    spans,
    tile_sizes,
)


def test_tile_sizes_respect_the_budget():
    for n, v, budget in [(8192, 151936, 32), (3, 10, 32), (100000, 65536, 4)]:
        rows, vocab_tile = tile_sizes(n, v, budget)
        assert 1 <= rows <= n and 1 <= vocab_tile <= v
        assert rows * vocab_tile * 4 * 8 <= budget * 2**20 or vocab_tile <= 128


def test_spans_cover_the_range_once():
    assert list(spans(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(spans(0, 4)) == []


def inputs(num_tokens=9, hidden=7, vocab=23):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    return h, weight, bias


def test_online_softmax_over_ragged_tiles_is_the_logsumexp():
    h, weight, bias = inputs()
    z_full = (h @ weight.T + bias) / 1.3
    running_max = torch.full((h.shape[0],), -torch.inf, dtype=torch.float64)
    running_sum = torch.zeros_like(running_max)
    for v0, v1 in spans(weight.shape[0], 5):  # 23 columns: four tiles of 5 and one of 3
        z, w_tile = logit_tile(h, weight, bias, v0, v1, 1 / 1.3)
        assert torch.equal(w_tile, weight[v0:v1])
        torch.testing.assert_close(z, z_full[:, v0:v1], rtol=1e-14, atol=1e-14)
        running_max, rescale, exp_tile, running_sum = online_softmax_update(running_max, running_sum, z)
        torch.testing.assert_close(exp_tile, torch.exp(z - running_max[:, None]), rtol=0, atol=0)
    lse = running_max + torch.log(running_sum)
    torch.testing.assert_close(lse, torch.logsumexp(z_full, dim=1), rtol=1e-14, atol=1e-14)


def test_recompute_grads_is_the_autograd_gradient():
    """With g = softmax(z) per tile, (dh, dW, dbias) are the gradients of sum_n r_n lse(z_n)."""
    h, weight, bias = inputs()
    grad_loss = torch.rand(h.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inv_tau = 1 / 1.3
    lse = torch.logsumexp((h @ weight.T + bias) * inv_tau, dim=1)

    def tile_grads(r0, r1, h_chunk):
        for v0, v1 in spans(weight.shape[0], 5):
            z, w_tile = logit_tile(h_chunk, weight, bias, v0, v1, inv_tau)
            yield v0, v1, torch.exp(z - lse[r0:r1, None]), w_tile

    ours = recompute_grads(h, weight, bias, grad_loss, inv_tau, 4, (True, True, True), tile_grads)
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    hh, ww, bb = leaves
    (torch.logsumexp((hh @ ww.T + bb) * inv_tau, dim=1) * grad_loss).sum().backward()
    for mine, leaf in zip(ours, leaves):
        assert mine.dtype == leaf.dtype
        torch.testing.assert_close(mine, leaf.grad, rtol=1e-12, atol=1e-12)
    only_dw = recompute_grads(h, weight, bias, grad_loss, inv_tau, 4, (False, True, False), tile_grads)
    assert only_dw[0] is None and only_dw[2] is None
    torch.testing.assert_close(only_dw[1], ours[1], rtol=0, atol=0)
