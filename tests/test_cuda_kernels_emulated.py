"""The CUDA kernels' own source (csrc/cuda/scan_{fwd,bwd}_kernel.cuh), compiled with g++ against the
stand-in CUDA headers in tests/cuda_emulation (a thread per CUDA thread, shuffles and barriers as
rendezvous) and checked against the reference: every output, gradient and the last state.

This checks the kernels' indexing, lane/warp decomposition, chunk carries, reverse scan, masks/ranks,
block-level dB/dC reduction and tail handling where no GPU exists. It does not check GPU timing, the
GPU memory model or nvcc's code generation (test_gpu_scans.py does, on a GPU); it uses the host
exp of scan_recurrence.h instead of the device's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from compressm_kernels import mask_to_ranks, selective_scan_ref
from compressm_kernels.ops.selective_scan import cuda as cuda_backend
from scan_cases import Case, assert_close, make_inputs, run_with_grads

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
SOURCES = sorted([*(ROOT / "csrc" / "cuda").glob("*.cuh"), *(ROOT / "csrc" / "cuda").glob("*.h"),
                  *(ROOT / "csrc" / "include" / "compressm").glob("*"), *EMULATION.glob("*")])
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def _library() -> ctypes.CDLL:
    """Build (once per source version, cached in the temp folder) and load the emulation library."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: cannot build the CPU emulation of the CUDA kernels")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES if p.is_file())).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"compressm_cuda_emulation_{digest}.so"
    if not target.exists():
        partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent test processes do not collide
        subprocess.run(
            [compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", f"-I{EMULATION}",
             f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{ROOT / 'csrc' / 'include'}",
             str(EMULATION / "emulate_kernels.cpp"), "-o", str(partial)],
            check=True, capture_output=True,
        )
        partial.replace(target)
    lib = ctypes.CDLL(str(target))
    lib.emulate_scan.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _nan_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full_like(t, math.nan, dtype=dtype)


def emulate(inputs: dict, state_mask: torch.Tensor | None, dout: torch.Tensor, dlast: torch.Tensor | None) -> dict:
    """Forward + backward through the emulated kernels, arranged as cuda.py arranges them."""
    x = {k: (v.detach().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    u, A, B, C = x["u"], x["A"], x["B"], x["C"]
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    ranks = kept = None
    if state_mask is not None:
        shared = state_mask.dim() == 1
        ranks, kept = mask_to_ranks(state_mask, 1 if shared else dim)
        kept = kept[0].contiguous() if shared else kept

    def groups(t: torch.Tensor) -> int:
        return 0 if t.dim() == 2 else (1 if t.dim() == 3 else t.shape[1])

    n_chunks = -(-seqlen // cuda_backend.CHUNK_SIZE)
    out, du, ddelta = _nan_like(u), _nan_like(u), _nan_like(u)
    dz = _nan_like(u) if x["z"] is not None else None
    carries = torch.full((batch, dim, n_chunks, dstate), math.nan)
    dA, dB, dC = torch.zeros_like(A), torch.zeros(B.shape), torch.zeros(C.shape)
    dD = torch.zeros(dim) if x["D"] is not None else None
    ddelta_bias = torch.zeros(dim) if x["delta_bias"] is not None else None
    dout = dout.contiguous()
    ins = [u, x["delta"], x["z"], A, B, C, x["D"], x["delta_bias"], ranks, kept, dout, dlast]
    outs = [out, carries, du, ddelta, dz, dA, dB, dC, dD, ddelta_bias]
    sizes = (ctypes.c_int * 4)(batch, dim, seqlen, dstate)
    rc = _library().emulate_scan(
        DTYPE_CODES[u.dtype], sizes, (ctypes.c_void_p * len(ins))(*map(_ptr, ins)),
        (ctypes.c_void_p * len(outs))(*map(_ptr, outs)), groups(B), groups(C),
        int(kept is not None and kept.dim() == 2), int(x["delta_softplus"]),
    )
    assert rc == 0, f"emulate_scan returned {rc}"
    found = {"out": out}
    if x["return_last_state"]:
        found["last_state"] = carries[:, :, -1]
    found.update({"du": du, "ddelta": ddelta, "dA": dA, "dB": dB.to(B.dtype), "dC": dC.to(C.dtype)})
    optional = {"dD": dD, "dz": dz, "ddelta_bias": ddelta_bias}
    found.update({name: grad for name, grad in optional.items() if grad is not None})
    return found


def _random_mask(case: Case, kind: str | None) -> torch.Tensor | None:
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(21)
    mask = torch.rand((case.dstate,) if kind == "shared" else (case.dim, case.dstate), generator=gen) < 0.5
    mask[..., 0] = True
    if kind == "per_channel":
        mask[-1] = True  # ranks differ across channels
    return mask


CASES = [
    (Case(batch=2, dim=4, seqlen=300, dstate=5), None),  # 2 chunks, 4 channels per block: block-level dB/dC sums
    (Case(batch=1, dim=6, seqlen=61, dstate=3, groups=3, b_form="grouped", c_form="invariant"), "shared"),
    (Case(batch=1, dim=3, seqlen=520, dstate=4, b_form="invariant", delta_softplus=False), "per_channel"),
    (Case(batch=2, dim=4, seqlen=1, dstate=1, has_z=False, has_D=False, has_delta_bias=False), None),
    (Case(batch=1, dim=4, seqlen=264, dstate=13, groups=2, b_form="grouped", c_form="grouped", dtype=torch.bfloat16),
     "per_channel"),
    (Case(batch=1, dim=2, seqlen=40, dstate=6, return_last_state=False, dtype=torch.float16), "shared"),
    (Case(batch=1, dim=4, seqlen=20, dstate=256), "shared"),  # the largest N: shared memory at its maximum
]


@pytest.mark.parametrize(("case", "mask_kind"), CASES, ids=lambda v: str(v))
def test_emulated_kernels_match_reference(case: Case, mask_kind: str | None) -> None:
    inputs = make_inputs(case, seed=17)
    mask = _random_mask(case, mask_kind)
    gen = torch.Generator().manual_seed(18)
    dout = torch.randn(inputs["u"].shape, generator=gen).to(case.dtype)
    dlast = torch.randn(case.batch, case.dim, case.dstate, generator=gen) if case.return_last_state else None
    cotangents = (dout, dlast) if dlast is not None else (dout,)
    expected = run_with_grads(selective_scan_ref, inputs, cotangents=cotangents, state_mask=mask)
    found = emulate(inputs, mask, dout, dlast)
    assert found.keys() == expected.keys()
    for name in expected:
        assert_close(found[name], expected[name], case.dtype, name)
    if mask is not None:
        dropped = ~mask.expand(case.dim, case.dstate)
        assert (found["dA"][dropped] == 0).all()
        if "last_state" in found:
            assert (found["last_state"][:, dropped] == 0).all()
