"""Block configurations of the Triton self-distillation kernels, and the choices made at launch.

Per phase (forward, dh, dW) a tuple of block configurations is tried in order on CUDA until one
compiles and launches, and the one that worked is cached (``with_config``): a config that runs
out of shared memory or registers on some GPU falls through to the next instead of failing the
call. Also here: the scalars every launch derives from its inputs (``LaunchArgs``), the dot
options per dtype and device, the launch meta-parameters, and how many vocabulary splits the
forward grid uses. Benchmarks and tests may swap the tuples, e.g.

    triton_configs.CUDA_CONFIGS["grad_hidden"] = triton_configs.DIRECT_GRAD_HIDDEN_CONFIGS

How the tables were chosen and compiled, and the figures behind SPLIT_G_MODES:
docs/kernels.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import triton
from sdft_kernels.triton_tiles import MODE_JSD, jsd_logs, kernel_mode

# dh without staging (``_sdft_grad_hidden_kernel``): each [BLOCK_N, BLOCK_V] tile of g goes
# straight into the fp32 read-modify-write of dh, ~ N * V * D * 8 / BLOCK_V bytes of traffic
# (hence 256-wide tiles first). The fallbacks of the staged configs below.
DIRECT_GRAD_HIDDEN_CONFIGS = (
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
)
# Staged dh (``_sdft_grad_hidden_staged_kernel``, the default): g for STAGE_V columns goes
# through a per-program [BLOCK_N, STAGE_V] slab (N * STAGE_V elements in all: 16 MiB at
# N = 8192 in bf16, L2-resident), then one GEMM per stage adds slab @ W[stage] to dh: the dh
# traffic drops to ~ N * V * D * 8 / STAGE_V bytes (8x less than direct 128-wide tiles).
STAGED_GRAD_HIDDEN_CONFIGS = (
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, STAGE_V=1024, BLOCK_DH=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, STAGE_V=1024, BLOCK_DH=64, num_warps=8, num_stages=2),
    *DIRECT_GRAD_HIDDEN_CONFIGS,
)
# bf16/fp16 configurations per phase: the first entries pipeline 2-3 stages and use wgmma on
# sm_90 without register spills; the last ones are small enough to fit any GPU.
CUDA_CONFIGS = {
    "forward": (
        # 128 x 128 tiles: 85 instead of 64 FLOP per loaded byte (h_s, h_t and W tiles), with
        # BLOCK_D = 32 to fit two fp32 [128, 128] accumulators in 255 registers (8 bytes of spill
        # traffic on sm_90, Triton 3.9; BLOCK_D = 64 spills 80). Not yet timed on a GPU: the
        # per-config times of bench/loss_phases.py decide whether it stays first.
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
        dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    ),
    "grad_hidden": STAGED_GRAD_HIDDEN_CONFIGS,
    "grad_weight": (
        dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=2),
        dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    ),
}
# fp32 inputs multiply in exact fp32 ("ieee", CUDA cores, no tensor cores), where the bf16
# tiles above would spill registers and compile slowly: small tiles, every phase. fp32 on a
# GPU is for tests and references, not for speed (its dh is direct, so a GPU test run covers
# both dh kernels: staged in bf16/fp16, direct in fp32).
FP32_CUDA_CONFIGS = (
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=2, num_stages=1),
)
# Under the CPU interpreter every block op is a Python-level numpy call, so time grows with the
# number of tiles: moderate blocks keep the tests fast while the test shapes (N=37, D=33,
# V=301, ...) still span several ragged row, D and vocabulary tiles.
# dh is staged as on GPU (two 64-wide tiles per stage, so stages are also ragged).
INTERPRETER_CONFIG = dict(
    BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, STAGE_V=128, BLOCK_DH=32, num_warps=1, num_stages=1
)
# The row kernel of the 3-GEMM path (``triton_rows``): one program per token sweeps its two fp32
# logit rows in BLOCK_V-wide blocks; wide blocks keep enough loads in flight per program for a
# memory-bound kernel (no tensor cores, so the dtype does not matter).
ROW_CONFIGS = (
    dict(BLOCK_V=4096, num_warps=8),
    dict(BLOCK_V=2048, num_warps=8),
    dict(BLOCK_V=1024, num_warps=4),
)
# Interpreter: narrow blocks, so that the tests' small vocabularies span several of them.
INTERPRETER_ROW_CONFIG = dict(BLOCK_V=64, num_warps=1)
# On CUDA, aim for this many programs per SM in the split (forward) sweeps.
PROGRAMS_PER_SM = 4
# On CPU (interpreter) use a few splits so that the merge path is always exercised.
INTERPRETER_SPLITS = 3
# Row blocks per launch group of the split grids (``triton_tiles.split_program``): None = about
# one wave of resident programs per group, SM count / splits (a group's W tiles are read from
# HBM once and its h rows stay in L2); a number fixes it (row_blocks: plain split-major, the
# order of the 2-D grid before 2026-11-30). The interpreter uses small groups, the last one
# partial, so that the mapping is exercised.
SPLIT_GROUP_ROWS = None
INTERPRETER_GROUP_ROWS = 2
# Vocabulary splits of the dh kernels (``dh_splits``) when N / BLOCK_N row blocks leave SMs idle
# (the H200 run: 16 programs at N = 1024 on 132 SMs): at most MAX_DH_SPLITS, each one an fp32
# [N, D] partial dh (8 x 14 MiB at N = 1024, D = 3584). DH_SPLITS fixes the number (tests,
# benchmarks); the interpreter uses 2 so that the partial sums are exercised.
DH_SPLITS = None
MAX_DH_SPLITS = 8
INTERPRETER_DH_SPLITS = 2

# The dh (and dW) GEMM takes g = dLoss/dz_s as an operand of the input dtype, and rounding g to
# bf16 costs ~1e-3 relative error in the sum. The KL modes stay within the error budget of the
# bf16 full-logit reference that way; the JSD does not, so for the modes listed here g goes in
# as g_hi + g_lo (``triton_tiles.split_operand``): two operands of the input dtype and two
# GEMMs, ~16 significant bits, dh then the correctly rounded exact gradient up to ties. Their
# g @ W costs 2 GEMM-equivalents instead of 1. Add the KL modes to trade speed for accuracy.
SPLIT_G_MODES = (MODE_JSD,)

# Integer arguments Triton should not specialize on (divisible by 16, equal to 1): they only
# bound loops and masks, never align a vectorised load, so specializing them would only
# multiply compiled variants (one per ragged test shape). D and the strides stay specialized:
# their divisibility lets the loads of h and W use 16-byte async copies.
DO_NOT_SPECIALIZE = ["N", "V"]
DO_NOT_SPECIALIZE_SPLIT = ["N", "V", "columns_per_split", "splits", "group_rows"]

# The first config that compiled and launched, per (phase, dtype, mode, flags, device), with the
# config list it was picked from: later calls with the SAME list start from it instead of
# retrying configs known to fail. A different list (a benchmark or test swapping CUDA_CONFIGS
# entries) starts from its own first entry: otherwise a direct-dh config cached from a direct-only
# list, which also ends the staged list, would silently skip the staged kernel forever.
_WORKING_CONFIG: dict[tuple, tuple[list, dict]] = {}


@dataclass(frozen=True)
class LaunchArgs:
    """The scalars and flags every kernel of one call takes, derived once from its inputs."""

    mode: int  # MODE_* of alpha
    alpha: float
    log_one_minus_alpha: float  # mixture weights of the JSD (0.0 for the KL modes)
    log_alpha: float
    inv_temperature: float
    has_bias: bool
    bias_arg: torch.Tensor  # the bias, or any tensor when there is none (never read then)
    dot: dict  # DOT_PRECISION, DOT_IN_FP32
    shapes: tuple  # N, V, D, stride_h_n, stride_w_v, stride_w_d: the kernels' shape arguments
    split_g: bool  # g enters the dh/dW GEMMs as g_hi + g_lo (see SPLIT_G_MODES)


def launch_args(
    student: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    alpha: float,
    temperature: float,
) -> LaunchArgs:
    """The LaunchArgs of one call (student and teacher share shape, strides and dtype)."""
    num_tokens, hidden = student.shape
    mode = kernel_mode(alpha)
    log_one_minus_alpha, log_alpha = jsd_logs(alpha)
    return LaunchArgs(
        mode=mode,
        alpha=alpha,
        log_one_minus_alpha=log_one_minus_alpha,
        log_alpha=log_alpha,
        inv_temperature=1.0 / temperature,
        has_bias=bias is not None,
        bias_arg=bias if bias is not None else weight,
        dot=dot_options(student.dtype, student.device),
        shapes=(num_tokens, weight.shape[0], hidden, student.stride(0), weight.stride(0), weight.stride(1)),
        split_g=mode in SPLIT_G_MODES and student.dtype != torch.float32,  # fp32 never rounds g
    )


def dot_options(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_PRECISION and DOT_IN_FP32 of the kernels for this input dtype and device."""
    # fp32 inputs: exact fp32 products ("ieee"), like torch's default fp32 matmul (TF32 would
    # cost ~1e-3 relative logit error). bf16/fp16 use tensor cores whatever the flag says.
    # On CPU (the interpreter) tl.dot cannot multiply bfloat16: upcast the operands first.
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_IN_FP32=device.type == "cpu",
    )


def launch_meta(config: dict, device: torch.device) -> dict:
    """The block sizes of a config, plus num_warps / num_stages on CUDA."""
    meta = dict(BLOCK_N=config["BLOCK_N"], BLOCK_V=config["BLOCK_V"], BLOCK_D=config["BLOCK_D"])
    if device.type == "cuda":
        meta.update(num_warps=config["num_warps"], num_stages=config["num_stages"])
    return meta


def vocab_splits(num_row_blocks: int, num_vocab_tiles: int, device: torch.device, requested) -> int:
    """How many vocabulary splits the forward grid uses, so that small N still fills the GPU."""
    if requested is not None:
        wanted = int(requested)
    elif device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, num_row_blocks)
    else:
        wanted = INTERPRETER_SPLITS
    return max(1, min(wanted, num_vocab_tiles))


def row_launch_meta(config: dict, device: torch.device) -> dict:
    """BLOCK_V of a row-kernel config, plus num_warps on CUDA."""
    meta = dict(BLOCK_V=config["BLOCK_V"])
    if device.type == "cuda":
        meta.update(num_warps=config["num_warps"])
    return meta


def _triton_error_types() -> tuple[type, ...]:
    # The errors of a config that cannot compile or does not fit the GPU (shared memory,
    # registers): OutOfResources, PTXASError and CompilationError where this Triton has them.
    import triton.compiler.errors
    import triton.runtime.errors

    names = (
        (triton.runtime.errors, "OutOfResources"),
        (triton.runtime.errors, "PTXASError"),
        (triton.compiler.errors, "CompilationError"),
    )
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


# Errors after which the next config is tried. Anything else (CUDA errors, out of memory, wrong
# arguments) is raised at once: retrying would hide it, or run into it again with every config.
RETRYABLE_ERRORS = _triton_error_types()


def dh_splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    """Vocabulary splits of the dh kernels: as many as fit whole into the SMs' first wave (1 when
    the row blocks alone fill it), at most MAX_DH_SPLITS (each split holds an fp32 [N, D] partial)."""
    if DH_SPLITS is not None:
        wanted = DH_SPLITS
    elif device.type != "cuda":
        wanted = INTERPRETER_DH_SPLITS
    else:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = min(MAX_DH_SPLITS, sm_count // row_blocks)  # whole waves: 128 row blocks on 132 SMs stay 1
    return max(1, min(int(wanted), vocab_tiles))


def split_group_rows(row_blocks: int, splits: int, device: torch.device) -> int:
    """Row blocks per launch group of a grid of row_blocks x splits programs (see SPLIT_GROUP_ROWS)."""
    if device.type != "cuda":
        wanted = INTERPRETER_GROUP_ROWS
    elif SPLIT_GROUP_ROWS is not None:
        wanted = SPLIT_GROUP_ROWS
    else:
        wanted = torch.cuda.get_device_properties(device).multi_processor_count // splits
    return max(1, min(int(wanted), row_blocks))


def with_config(phase_key: tuple, device: torch.device, run, configs=None, interpreter_config=None):
    """``run(config)`` with the first block config of the phase that compiles and launches.

    ``phase_key`` starts with the phase (a key of CUDA_CONFIGS) and the input dtype; ``configs``
    replaces the phase's CUDA list (fp32 inputs: FP32_CUDA_CONFIGS). ``run`` allocates its own
    buffers and launches the phase's kernels, so a retry starts from scratch; compile and
    out-of-resources errors (RETRYABLE_ERRORS) happen before a kernel writes anything, and only
    they move on to the next config. CPU tensors (the interpreter) use ``interpreter_config``
    (default INTERPRETER_CONFIG).
    """
    if device.type != "cuda":
        return run(INTERPRETER_CONFIG if interpreter_config is None else interpreter_config)
    phase, dtype = phase_key[0], phase_key[1]
    if configs is None:
        configs = FP32_CUDA_CONFIGS if dtype == torch.float32 else CUDA_CONFIGS[phase]
    configs = list(configs)
    key = (*phase_key, device.index)
    all_configs = list(configs)
    cached = _WORKING_CONFIG.get(key)
    if cached is not None and cached[0] == all_configs and cached[1] in configs:
        configs = configs[configs.index(cached[1]) :]
    for index, config in enumerate(configs):
        try:
            # Triton launches on the current CUDA device: make it the tensors' device.
            with torch.cuda.device(device):
                result = run(config)
        except RETRYABLE_ERRORS as error:
            if index == len(configs) - 1:
                raise
            warnings.warn(
                f"triton_sdft: {phase} kernels failed with block config {config} "
                f"({type(error).__name__}: {error}); retrying with the next config",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        _WORKING_CONFIG[key] = (all_configs, config)
        return result
    raise AssertionError("unreachable: the last config re-raises")
