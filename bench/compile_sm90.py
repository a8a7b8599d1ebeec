"""Offline sm_90 compile of the Triton kernels, no GPU needed: registers, spills, shared memory.

Every kernel variant the CUDA launchers can pick (each config of each phase, the modes and
dtypes that change the code) is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90,
32)`` (H100/H200) on aligned shapes (pointers, D and the strides divisible by 16, as at model
sizes), and the cubin's resource usage is read with the cuobjdump that ships with Triton. A
variant that fails to compile, spills registers (LOCAL > 0) or needs more than the 227 KiB of
shared memory an H100/H200 SM offers is what ``triton_configs.with_config`` would fall through
at run time: the first config of each phase should do none of these.

    python bench/compile_sm90.py                 # every kernel
    python bench/compile_sm90.py --only rows     # names containing "rows"

This checks compilation, not speed or correctness on a GPU (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    import sdft_kernels  # noqa: F401
except ImportError:  # a checkout without the package installed: kernels/ is sdft_kernels
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sdft_kernels", Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdft_kernels"] = module
    spec.loader.exec_module(module)

from sdft_kernels import triton_backward, triton_configs, triton_forward, triton_rows  # noqa: E402
from sdft_kernels.triton_tiles import MODE_FORWARD_KL, MODE_JSD, MODE_REVERSE_KL  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory per block on sm_90
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INPUT_POINTERS = {"student_ptr", "teacher_ptr", "weight_ptr", "bias_ptr", "stage_ptr", "grad_ptr"}
INT_ARGS = {"N", "V", "D", "n_rows", "columns_per_split", "splits", "group_rows"}


def signature(kernel, dtype, constants):
    """Triton signature of ``kernel`` for inputs of ``dtype``, and the divisibility hints."""
    sig, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name == "grad_exp_ptr":
                sig[name] = "*i32"
            elif name in INPUT_POINTERS:
                sig[name] = "*" + DTYPE_NAMES[dtype]
            else:
                sig[name] = "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in INT_ARGS or name.startswith("stride"):
            sig[name] = "i32"
            if name == "D" or name.startswith("stride_h") or name == "stride_w_v":
                attrs[(index,)] = [["tt.divisibility", 16]]  # aligned model shapes
        else:
            sig[name] = "fp32"
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constants]
    assert not missing, f"{kernel.fn.__name__}: no value for constexpr {missing}"
    return sig, attrs


def ptxas_path() -> str:
    """The ptxas Triton compiles sm_90 with (Triton >= 3.5 ships two; older ones one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def compile_variant(kernel, dtype, constants, num_warps, num_stages, workdir):
    sig, attrs = signature(kernel, dtype, constants)
    for name in list(sig):
        if name == "stride_w_d":  # unit column stride: a constant 1, as Triton specializes it
            sig[name] = "constexpr"
            constants = {**constants, name: 1}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    start = time.perf_counter()
    compiled = triton.compile(src, target=TARGET, options=options)
    seconds = time.perf_counter() - start
    # Registers and spills as ptxas reports them (-v) for the kernel's PTX: the same ptxas
    # Triton ships and compiled it with.
    ptx = Path(workdir) / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run(
        [ptxas_path(), "-v", "--gpu-name=sm_90a", str(ptx),
         "-o", str(Path(workdir) / "kernel.cubin")],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return dict(regs=regs, local=spilled, shared=compiled.metadata.shared, seconds=seconds)


def variants():
    """(name, kernel, dtype, constexprs, num_warps, num_stages) of every variant to compile."""
    dot = dict(DOT_PRECISION="tf32", DOT_IN_FP32=False)
    for dtype in (torch.bfloat16,):
        for mode in (MODE_FORWARD_KL, MODE_REVERSE_KL, MODE_JSD):
            for index, cfg in enumerate(triton_configs.CUDA_CONFIGS["forward"]):
                blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
                yield (
                    f"forward stats mode={mode} cfg{index} {blocks}",
                    triton_forward._sdft_stats_kernel, dtype,
                    dict(MODE=mode, HAS_BIAS=False, **blocks, **dot), cfg["num_warps"], cfg["num_stages"],
                )  # fmt: skip
                if mode == MODE_JSD:
                    yield (
                        f"forward jsd loss cfg{index} {blocks}",
                        triton_forward._sdft_jsd_loss_kernel, dtype,
                        dict(HAS_BIAS=False, **blocks, **dot), cfg["num_warps"], cfg["num_stages"],
                    )  # fmt: skip
            split = mode in triton_configs.SPLIT_G_MODES
            for index, cfg in enumerate(triton_configs.CUDA_CONFIGS["grad_hidden"]):
                blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
                flags = dict(MODE=mode, HAS_BIAS=False, SPLIT_G=split, **blocks, **dot)
                if "STAGE_V" in cfg:
                    kernel = triton_backward._sdft_grad_hidden_staged_kernel
                    flags.update(STAGE_V=cfg["STAGE_V"], BLOCK_DH=cfg["BLOCK_DH"])
                    name = f"dh staged mode={mode} cfg{index} {blocks} STAGE_V={cfg['STAGE_V']}"
                else:
                    kernel, name = (
                        triton_backward._sdft_grad_hidden_kernel,
                        f"dh direct mode={mode} cfg{index} {blocks}",
                    )
                yield name, kernel, dtype, flags, cfg["num_warps"], cfg["num_stages"]
            cfg = triton_configs.CUDA_CONFIGS["grad_weight"][0]
            blocks = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
            yield (
                f"dW mode={mode} cfg0 {blocks}",
                triton_backward._sdft_grad_weight_kernel, dtype,
                dict(MODE=mode, HAS_BIAS=False, GRAD_WEIGHT=True, GRAD_BIAS=True, SPLIT_G=split, **blocks, **dot),
                cfg["num_warps"], cfg["num_stages"],
            )  # fmt: skip
    for dtype, split, prescale in (
        (torch.float32, False, False),
        (torch.bfloat16, False, False),
        (torch.bfloat16, True, False),
        (torch.float16, True, True),
    ):
        for mode in (MODE_FORWARD_KL, MODE_REVERSE_KL, MODE_JSD):
            for phase in (triton_rows.PHASE_LOSS, triton_rows.PHASE_GRAD_MAX, triton_rows.PHASE_WRITE_G):
                if phase == triton_rows.PHASE_GRAD_MAX and not prescale:
                    continue
                for index, cfg in enumerate(triton_configs.ROW_CONFIGS):
                    flags = dict(
                        MODE=mode, PHASE=phase, HAS_BIAS=False, TEACHER_IS_DIFF=dtype == torch.float32,
                        HAS_ROW_WEIGHT=False, G_LOWP=dtype != torch.float32, SPLIT_G=split,
                        PRESCALE=prescale, BLOCK_V=cfg["BLOCK_V"],
                    )  # fmt: skip
                    yield (
                        f"rows {DTYPE_NAMES[dtype]} split={split} mode={mode} phase={phase} cfg{index}",
                        triton_rows._sdft_rows_kernel, dtype, flags, cfg["num_warps"], 1,
                    )  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="compile the variants whose name contains this")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target {TARGET}")
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        for name, kernel, dtype, constants, num_warps, num_stages in variants():
            if args.only not in name:
                continue
            try:
                r = compile_variant(kernel, dtype, constants, num_warps, num_stages, workdir)
            except Exception as error:  # report and go on: the launcher would fall through
                failures += 1
                print(f"FAIL  {name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                continue
            flag = "ok  " if r["local"] == 0 and r["shared"] <= SHARED_LIMIT else "WARN"
            print(
                f"{flag}  {name}: {r['regs']} regs, {r['local']} B spill traffic, "
                f"{r['shared'] / 1024:.0f} KiB shared, warps={num_warps} stages={num_stages}, {r['seconds']:.1f} s"
            )
    print(f"{failures} failed to compile")


if __name__ == "__main__":
    main()
