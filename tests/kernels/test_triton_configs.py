"""Launch choices of the Triton kernels: config fallback and cache, per-call launch arguments.

Pure launcher logic (the kernels are replaced by stubs), so it runs wherever triton imports,
with or without a GPU or the interpreter.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

pytest.importorskip("triton")

import triton.runtime.errors  # noqa: E402
from sdft_kernels import triton_configs, triton_tiles  # noqa: E402


def test_cuda_config_fallback_and_cache(monkeypatch):
    """A block config that fails to compile/launch falls through to the next; the working one
    is cached. (Pure launcher logic: the kernels are replaced by a stub, so this runs anywhere.)"""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setitem(
        triton_configs.CUDA_CONFIGS, "grad_hidden", ({"BLOCK_V": 256}, {"BLOCK_V": 128}, {"BLOCK_V": 64})
    )
    monkeypatch.setattr(triton_configs, "_WORKING_CONFIG", {})
    tried = []

    def run(config):
        tried.append(config["BLOCK_V"])
        if config["BLOCK_V"] == 256:
            raise triton.runtime.errors.OutOfResources(232448, 227328, "shared memory")
        return config["BLOCK_V"]

    fake_cuda = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="retrying with the next config"):
        assert triton_configs.with_config(("grad_hidden", torch.bfloat16, 0), fake_cuda, run) == 128
    assert triton_configs.with_config(("grad_hidden", torch.bfloat16, 0), fake_cuda, run) == 128
    assert tried == [256, 128, 128]  # the second call starts from the cached config

    def always_fails(config):
        raise triton.runtime.errors.OutOfResources(10**6, 227328, f"shared memory {config}")

    with pytest.warns(RuntimeWarning), pytest.raises(triton.runtime.errors.OutOfResources):
        triton_configs.with_config(("grad_hidden", torch.float16, 0), fake_cuda, always_fails)


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("wrong arguments"),
    ],
)
def test_cuda_errors_and_out_of_memory_are_not_swallowed(monkeypatch, error):
    """Only compile / out-of-resources errors move on to the next config: an out-of-memory or a
    CUDA error raises at once, from the first config, with no retry that would hide it."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setitem(triton_configs.CUDA_CONFIGS, "grad_hidden", ({"BLOCK_V": 256}, {"BLOCK_V": 128}))
    monkeypatch.setattr(triton_configs, "_WORKING_CONFIG", {})
    tried = []

    def run(config):
        tried.append(config["BLOCK_V"])
        raise error

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "retrying with the next config" warning would fail
        with pytest.raises(type(error)):
            triton_configs.with_config(("grad_hidden", torch.bfloat16, 0), torch.device("cuda", 0), run)
    assert tried == [256]


def test_cuda_config_cache_is_per_config_list(monkeypatch):
    """A config cached from one list must not short-cut a different list that also contains it.

    The GPU run of test_both_grad_hidden_kernels[...-staged] failed this way: the direct variant
    cached DIRECT_GRAD_HIDDEN_CONFIGS[0] for (bf16, JSD, bias); the staged list ends with the
    direct configs, so the staged variant started from the cached direct one and the staged
    kernel never ran. (Launcher logic only: the kernels are replaced by a stub.)"""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(triton_configs, "_WORKING_CONFIG", {})
    fake_cuda = torch.device("cuda", 0)
    key = ("grad_hidden", torch.bfloat16, triton_tiles.MODE_JSD, True)
    tried = []
    run = lambda config: tried.append(config) or config  # noqa: E731
    monkeypatch.setitem(triton_configs.CUDA_CONFIGS, "grad_hidden", triton_configs.DIRECT_GRAD_HIDDEN_CONFIGS)
    assert triton_configs.with_config(key, fake_cuda, run) == triton_configs.DIRECT_GRAD_HIDDEN_CONFIGS[0]
    monkeypatch.setitem(triton_configs.CUDA_CONFIGS, "grad_hidden", triton_configs.STAGED_GRAD_HIDDEN_CONFIGS)
    assert triton_configs.DIRECT_GRAD_HIDDEN_CONFIGS[0] in triton_configs.STAGED_GRAD_HIDDEN_CONFIGS
    first_staged = triton_configs.STAGED_GRAD_HIDDEN_CONFIGS[0]
    assert "STAGE_V" in first_staged
    assert triton_configs.with_config(key, fake_cuda, run) == first_staged
    assert triton_configs.with_config(key, fake_cuda, run) == first_staged


@pytest.mark.parametrize(
    "dtype,alpha,mode,split_g",
    [
        (torch.bfloat16, 0.0, triton_tiles.MODE_FORWARD_KL, False),
        (torch.bfloat16, 1.0, triton_tiles.MODE_REVERSE_KL, False),
        (torch.bfloat16, 0.5, triton_tiles.MODE_JSD, True),
        (torch.float16, 0.3, triton_tiles.MODE_JSD, True),
        (torch.float32, 0.5, triton_tiles.MODE_JSD, False),  # fp32 never rounds g
    ],
)
def test_launch_args(dtype, alpha, mode, split_g):
    student = torch.zeros(6, 8, dtype=dtype)
    weight = torch.zeros(20, 8, dtype=dtype)
    args = triton_configs.launch_args(student, weight, None, alpha, 2.0)
    assert (args.mode, args.split_g, args.has_bias) == (mode, split_g, False)
    assert args.bias_arg is weight and args.inv_temperature == 0.5
    assert args.shapes == (6, 20, 8, 8, 8, 1)  # N, V, D, then the strides of h and W
    if mode == triton_tiles.MODE_JSD:
        assert args.log_one_minus_alpha == pytest.approx(torch.log1p(torch.tensor(-alpha)).item())
        assert args.log_alpha == pytest.approx(torch.log(torch.tensor(alpha)).item())
    else:
        assert args.log_one_minus_alpha == args.log_alpha == 0.0
    assert args.dot == dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_IN_FP32=True)
