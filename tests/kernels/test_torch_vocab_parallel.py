"""Vocabulary-parallel loss on 2 gloo ranks (forked CPU processes) vs the unsharded twin and the
float64 oracle: loss, dh, and each rank's block of dW / dbias, for alpha 0, 0.5, 1."""

import itertools

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from sdft_kernels.reference import reference_token_losses
from sdft_kernels.torch_sdft import torch_token_losses
from sdft_kernels.torch_vocab_parallel import vocab_parallel_token_losses, vocab_range, vocab_shard

from sdft_fast.loss import self_distill_loss

N, D, V = 37, 33, 301  # V odd: the two blocks differ in size; budget below: several row chunks and tiles
BUDGET_MB = 0.05
TEMPERATURE = 1.3
ALPHAS = (0.0, 0.5, 1.0)
CASES = list(itertools.product(ALPHAS, (False, True), ("float64", "float32"), ("independent", "close")))


def make_inputs(regime, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, D, generator=gen, dtype=torch.float64)
    noise = torch.randn(N, D, generator=gen, dtype=torch.float64)
    h_t = h_s + 0.02 * noise if regime == "close" else noise  # close: KL ~ 1e-3
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) / D**0.5 * 2
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    grad_out = torch.rand(N, generator=gen, dtype=torch.float64)
    return h_s, h_t, weight, bias, grad_out


def losses_and_grads(fn, h_s, h_t, weight, bias, grad_out, dtype, head_grad, **kw):
    """(loss, dh, dW, dbias) as float64 for inputs cast to dtype; dW, dbias None for a frozen head."""
    # Fresh leaves (.to() of a float64 tensor to float64 is the tensor itself: grads would add up).
    hs = h_s.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_(head_grad)
    b = bias.to(dtype).clone().requires_grad_(head_grad)
    loss = fn(hs, h_t.to(dtype), w, b, alpha=kw.pop("alpha"), temperature=TEMPERATURE, **kw)
    (loss.double() * grad_out).sum().backward()
    return [t if t is None else t.detach().double() for t in (loss, hs.grad, w.grad, b.grad)]


def on_each_rank(rank, world_size):
    group = dist.group.WORLD
    results = {}
    for alpha, head_grad, dtype, regime in CASES:
        h_s, h_t, weight, bias, grad_out = make_inputs(regime)
        results[(alpha, head_grad, dtype, regime)] = losses_and_grads(
            vocab_parallel_token_losses,
            h_s,
            h_t,
            vocab_shard(weight, group),
            vocab_shard(bias, group),
            grad_out,
            getattr(torch, dtype),
            head_grad,
            alpha=alpha,
            process_group=group,
            memory_budget_mb=BUDGET_MB,
        )
    # The public API: [B, T, D] tokens, a mask, the sequence mean; and an all-masked batch.
    h_s, h_t, weight, bias, _ = make_inputs("independent")
    mask = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.7
    for name, this_mask in (("api", mask), ("api_all_masked", torch.zeros_like(mask))):
        hs = h_s[:36].reshape(4, 9, D).clone().requires_grad_()
        loss = self_distill_loss(
            hs,
            h_t[:36].reshape(4, 9, D),
            vocab_shard(weight, group),
            vocab_shard(bias, group),
            alpha=0.5,
            loss_mask=this_mask[:36].reshape(4, 9),
            process_group=group,
            memory_budget_mb=BUDGET_MB,
        )
        loss.backward()
        results[name] = (loss.detach(), hs.grad)
    # A rank that passes other tokens is named, on every rank, instead of a silently wrong loss.
    try:
        vocab_parallel_token_losses(
            h_s[: N - rank], h_t[: N - rank], vocab_shard(weight, group), process_group=group
        )
        results["mismatch"] = None
    except ValueError as error:
        results["mismatch"] = str(error)
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(on_each_rank, 2, tmp_path_factory.mktemp("vocab_parallel"))


def test_vocab_range_splits_every_row_once():
    for vocab, world in ((301, 2), (7, 3), (1, 2), (152064, 8)):
        ranges = [vocab_range(vocab, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [v1 - v0 for v0, v1 in ranges]
        assert max(sizes) - min(sizes) <= 1


def rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("alpha,head_grad,dtype,regime", CASES)
def test_equals_unsharded_loss_and_gradients(rank_results, alpha, head_grad, dtype, regime):
    h_s, h_t, weight, bias, grad_out = make_inputs(regime)
    torch_dtype = getattr(torch, dtype)
    kw = dict(alpha=alpha)
    rounded = [t.to(torch_dtype).double() for t in (h_s, h_t, weight, bias)]
    oracle = losses_and_grads(reference_token_losses, *rounded, grad_out, torch.float64, head_grad, **kw)
    same_dtype = losses_and_grads(
        reference_token_losses, h_s, h_t, weight, bias, grad_out, torch_dtype, head_grad, **kw
    )
    twin = losses_and_grads(
        torch_token_losses,
        h_s,
        h_t,
        weight,
        bias,
        grad_out,
        torch_dtype,
        head_grad,
        memory_budget_mb=BUDGET_MB,
        **kw,
    )
    per_rank = [r[(alpha, head_grad, dtype, regime)] for r in rank_results]
    # Loss and dh are the whole vocabulary's on every rank, bitwise equal across ranks.
    for name, i in (("loss", 0), ("dh", 1)):
        assert torch.equal(per_rank[0][i], per_rank[1][i]), f"{name} differs between the ranks"
    for rank, (loss, dh, dw, db) in enumerate(per_rank):
        v0, v1 = vocab_range(V, rank, 2)
        pieces = [("loss", loss, 0, None), ("dh", dh, 1, None)]
        if head_grad:
            pieces += [("dW", dw, 2, slice(v0, v1)), ("dbias", db, 3, slice(v0, v1))]
        else:
            assert dw is None and db is None, "a frozen head's block got a gradient"
        for name, ours, i, rows in pieces:
            pick = (lambda t: t) if rows is None else (lambda t, rows=rows: t[rows])
            if dtype == "float64":
                # The goal: the unsharded twin's values to 1e-6 relative (float64 leaves ~1e-15).
                assert rel_err(ours, pick(twin[i])) < 1e-6, f"rank {rank} {name}"
            else:
                # fp32: no further from the float64 oracle than the fp32 full-logit formula, as the
                # twin's own error budget (tests/kernels/test_torch_sdft.py).
                o, r = pick(oracle[i]), pick(same_dtype[i])
                scale = o.abs().max().item() + 1e-12
                ours_err, ref_err = (ours - o).abs().max().item(), (r - o).abs().max().item()
                assert ours_err <= ref_err + 1e-5 * scale, (
                    f"rank {rank} {name}: {ours_err:.3e} vs {ref_err:.3e}"
                )


def test_public_api_splits_the_head_and_reduces_like_the_unsharded_loss(rank_results):
    h_s, h_t, weight, bias, _ = make_inputs("independent")
    mask = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.7
    hs = h_s[:36].reshape(4, 9, D).clone().requires_grad_()
    loss = self_distill_loss(
        hs, h_t[:36].reshape(4, 9, D), weight, bias, alpha=0.5, loss_mask=mask[:36].reshape(4, 9)
    )
    loss.backward()
    for rank in range(2):
        ours_loss, ours_dh = rank_results[rank]["api"]
        assert rel_err(ours_loss, loss.detach()) < 1e-6 and rel_err(ours_dh, hs.grad) < 1e-6
        zero_loss, zero_dh = rank_results[rank]["api_all_masked"]
        assert zero_loss.item() == 0.0 and zero_dh.abs().max().item() == 0.0


def test_ranks_with_different_tokens_get_one_clear_error(rank_results):
    for rank in range(2):
        message = rank_results[rank]["mismatch"]
        assert message is not None, f"rank {rank} accepted different tokens on the ranks"
        assert f"rank 0: N={N}" in message and f"rank 1: N={N - 1}" in message
