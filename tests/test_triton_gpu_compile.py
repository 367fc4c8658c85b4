"""The Triton kernels compile for A100s (sm_80) and H100/H200s (sm_90) on this machine, which has no GPU.

The other Triton tests run the kernels in Triton's interpreter, which accepts code that the GPU compiler
rejects (types it would not promote, pointers it cannot load); this runs Triton's real pipeline down to a
cubin (ptxas included) for each kernel in several configurations. It runs in a subprocess because this test
session imported triton with ``TRITON_INTERPRET=1`` (tests/conftest.py), which replaces the compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

COMPILE = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from compressm_kernels.ops.selective_scan import triton_kernels as K

    INT_POINTERS = {"kept_ptr": "*i32", "rank_ptr": "*i32", "mask_ptr": "*i1"}

    def compile_for(arch, kernel, constexprs, warps=4, activations="*fp32"):
        jit = kernel.fn  # the JITFunction under the heuristics
        names = jit.arg_names
        def kind(n):
            if n in constexprs:
                return "constexpr"
            if n in INT_POINTERS:
                return INT_POINTERS[n]
            if n in ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "u_ptr", "delta_ptr"):
                return activations
            return "*fp32" if n.endswith("_ptr") else "i32"
        src = ASTSource(fn=jit, signature={n: kind(n) for n in names},
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        assert len(binary.asm["cubin"]) > 0, (jit.__name__, arch)
        return jit.__name__

    flags = dict(SOFTPLUS=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True)
    done = []
    for mask in (0, 1, 2):
        for var in (True, False):
            scan = dict(flags, MASK_MODE=mask, B_VAR=var, C_VAR=True, BLOCK_D=2, BLOCK_N=16, CHUNK=256)
            done.append(compile_for(90, K.scan_fwd_kernel, dict(scan, STORE_Y=True, STORE_CARRIES=True)))
            done.append(compile_for(90, K.scan_bwd_kernel, dict(scan, HAS_DLAST=True)))
    for block_d, block_n, warps, masked, dtype in ((32, 16, 4, False, "*fp32"), (4, 256, 8, True, "*bf16"),
                                                    (8, 64, 4, True, "*fp16")):
        step = dict(flags, HAS_MASK=masked, BLOCK_D=block_d, BLOCK_N=block_n)
        done.append(compile_for(90, K.state_update_kernel, step, warps, dtype))
    # sm_80: one configuration of each, bf16 included.
    scan = dict(flags, MASK_MODE=2, B_VAR=True, C_VAR=True, BLOCK_D=2, BLOCK_N=64, CHUNK=256)
    done.append(compile_for(80, K.scan_fwd_kernel, dict(scan, STORE_Y=True, STORE_CARRIES=True), 4, "*bf16"))
    done.append(compile_for(80, K.scan_bwd_kernel, dict(scan, HAS_DLAST=True), 4, "*bf16"))
    done.append(compile_for(80, K.state_update_kernel, dict(flags, HAS_MASK=True, BLOCK_D=8, BLOCK_N=64), 4, "*bf16"))
    print(len(done), "compiled")
''')


def test_kernels_compile_for_sm80_and_sm90() -> None:
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("18 compiled"), run.stdout
