"""Chunked PyTorch twin vs the float64 oracle: error budgets, shapes, modes, memory bound."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from sdft_kernels.reference import reference_token_losses
from sdft_kernels.torch_sdft import torch_token_losses

SHAPES = [(7, 41, 41), (423, 167, 1423), (37, 33, 301)]  # (N, D, V): V a multiple of no block


def make_inputs(n, d, v, *, seed=0, closeness=None, bias=False):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if closeness is None:
        h_t = torch.randn(n, d, generator=gen, dtype=torch.float64)
    else:
        h_t = h_s + closeness * torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5 * 2
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    grad_out = torch.rand(n, generator=gen, dtype=torch.float64)
    grad_out[::5] = 0.0  # masked-out tokens reach the kernel with zero gradient in practice
    return h_s, h_t, weight, b, grad_out


def run(fn, h_s, h_t, weight, bias, grad_out, dtype, weight_grad, **kw):
    """Loss and grads (as float64) of fn on inputs cast to dtype."""
    hs = h_s.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_(weight_grad)
    b = None if bias is None else bias.to(dtype).requires_grad_(weight_grad)
    loss = fn(hs, h_t.to(dtype), w, b, **kw)
    (loss.double() * grad_out).sum().backward()
    grads = [hs.grad, w.grad, None if b is None else b.grad]
    return [loss.detach().double()] + [None if g is None else g.double() for g in grads]


def max_err(a, b):
    return (a - b).abs().max().item()


CASES = list(itertools.product([0.0, 0.3, 0.5, 1.0], [1.0, 1.7], SHAPES, [False, True], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha,temperature,shape,bias,weight_grad", CASES)
def test_error_budget_against_float64_oracle(alpha, temperature, shape, bias, weight_grad, dtype):
    """Our error vs the float64 oracle <= the same-dtype full-logit reference's error + tol."""
    if shape[0] > 100 and (
        bias or temperature != 1.0 or (dtype == torch.bfloat16 and alpha not in (0.0, 1.0))
    ):
        # CPU bf16 GEMMs of the same-dtype reference are slow: the large shape runs once per
        # alpha/weight_grad in fp32, and for the two KL modes in bf16.
        pytest.skip("large shape: reduced sweep to keep CI short")
    h_s, h_t, weight, b, grad_out = make_inputs(*shape, bias=bias)
    kw = dict(alpha=alpha, temperature=temperature)
    # The oracle sees exactly the rounded inputs the others see.
    rounded = [t if t is None else t.to(dtype).double() for t in (h_s, h_t, weight, b)]
    oracle = run(reference_token_losses, *rounded, grad_out, torch.float64, weight_grad, **kw)
    same_dtype = run(reference_token_losses, h_s, h_t, weight, b, grad_out, dtype, weight_grad, **kw)
    ours = run(
        torch_token_losses, h_s, h_t, weight, b, grad_out, dtype, weight_grad, memory_budget_mb=0.05, **kw
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, o, r, x in zip(["loss", "d_student", "d_weight", "d_bias"], oracle, same_dtype, ours):
        if o is None:
            assert x is None, f"{name}: gradient returned although not requested"
            continue
        assert x is not None, f"{name}: gradient missing"
        scale = o.abs().max().item() + 1e-12
        assert max_err(x, o) <= max_err(r, o) + tol * scale, (
            f"{name}: ours {max_err(x, o):.3e} vs same-dtype reference {max_err(r, o):.3e}"
        )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_float64_is_exact_and_gradcheck(alpha):
    # gradcheck w.r.t. the student only: the teacher's logits also use W, but the teacher is a
    # constant by definition, so a finite difference in W would disagree with the loss's gradient
    # (W's gradient is checked against the detached-teacher reference in the budget test).
    h_s, h_t, weight, b, _ = make_inputs(5, 6, 37, bias=True)
    fn = lambda hs: torch_token_losses(
        hs, h_t, weight, b, alpha=alpha, temperature=1.3, memory_budget_mb=0.001
    )
    assert torch.autograd.gradcheck(fn, (h_s.requires_grad_(),), eps=1e-6, atol=1e-8)
    ref = reference_token_losses(h_s, h_t, weight, b, alpha=alpha, temperature=1.3)
    assert max_err(fn(h_s), ref) < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_student_equals_teacher_and_close_to_teacher(alpha, dtype):
    h_s, _, weight, _, grad_out = make_inputs(64, 48, 997)
    same = run(torch_token_losses, h_s, h_s, weight, None, grad_out, dtype, False, alpha=alpha)
    assert same[0].abs().max() < 1e-5 and same[1].abs().max() < 1e-5
    # Close to the teacher (KL ~ 1e-3): where low-precision errors are relatively worst.
    h_s, h_t, weight, _, grad_out = make_inputs(64, 48, 997, closeness=0.02)
    rounded = [t.to(dtype).double() for t in (h_s, h_t, weight)]
    oracle = run(reference_token_losses, *rounded, None, grad_out, torch.float64, False, alpha=alpha)
    assert 1e-5 < oracle[0].mean().item() < 1e-1
    same_dtype = run(reference_token_losses, h_s, h_t, weight, None, grad_out, dtype, False, alpha=alpha)
    ours = run(
        torch_token_losses, h_s, h_t, weight, None, grad_out, dtype, False, alpha=alpha, memory_budget_mb=0.05
    )
    for o, r, x in zip(oracle[:2], same_dtype[:2], ours[:2]):
        assert max_err(x, o) <= max_err(r, o) + 1e-6
    # fp32 statistics make ours far better than the bf16 full-logit formula near KL=0.
    if dtype == torch.float32:
        assert max_err(ours[0], oracle[0]) < 1e-6


def test_no_grad_does_no_gradient_work():
    h_s, h_t, weight, _, _ = make_inputs(9, 8, 50)
    h = h_s.float().requires_grad_()
    with torch.no_grad():
        loss = torch_token_losses(h, h_t.float(), weight.float())
    assert loss.grad_fn is None and loss.shape == (9,)
    # The teacher never receives a gradient even when it requires one.
    t = h_t.float().requires_grad_()
    torch_token_losses(h, t, weight.float()).sum().backward()
    assert t.grad is None and h.grad is not None


MEMORY_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, torch
    from sdft_kernels.torch_sdft import torch_token_losses
    from sdft_kernels.reference import reference_token_losses
    torch.set_num_threads(2)
    n, v, d = int(sys.argv[2]), 65536, 64
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, d, generator=g).requires_grad_()
    h_t = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / 8
    fn = torch_token_losses if sys.argv[1] == "torch" else reference_token_losses
    def status(key):  # kB figures of /proc/self/status
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.ones(1).sum()  # settle lazy allocations before the baseline
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    loss = fn(h_s, h_t, w, None, alpha=0.0)
    loss.sum().backward()
    assert torch.isfinite(h_s.grad).all()
    print(status("VmHWM:") - base)
    """
)


@pytest.mark.slow
def test_peak_memory_is_bounded_independent_of_vocab():
    """N=8192, V=65536, D=64 fp32: the torch path adds < N*V*4/4 bytes to peak RSS."""
    n, v = 8192, 65536
    probe = lambda impl, tokens: subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, impl, str(tokens)], capture_output=True, text=True, check=True
    )
    extra = int(probe("torch", n).stdout.split()[-1])
    assert extra < n * v * 4 / 4, f"torch path added {extra / 2**20:.0f} MiB to peak RSS"
    # The probe does see a full-logit peak: the reference adds several times N*V*4 (checked at
    # N=1024 to keep the test light).
    extra_ref = int(probe("reference", 1024).stdout.split()[-1])
    assert extra_ref > 1024 * v * 4, "the memory probe failed to see the reference's logits"
