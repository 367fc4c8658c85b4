"""The built CUDA extension without a GPU: its functions and custom ops exist, fake kernels give the
right shapes on meta tensors, and the binding rejects bad arguments with messages naming them.

The kernels' numerics are in test_gpu_scans.py (GPU only). The generated-instantiation check runs
even where nvcc is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from compressm_kernels import selective_scan_fn
from compressm_kernels._extensions import load_extension
from compressm_kernels.ops.selective_scan import MAX_DSTATE, ScanInputs, check_scan_inputs
from compressm_kernels.ops.selective_scan import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
_C_cuda, _REASON = load_extension("_C_cuda")
needs_extension = pytest.mark.skipif(_C_cuda is None, reason=f"CUDA extension not built: {_REASON}")


def test_generated_instantiations_are_up_to_date() -> None:
    path = ROOT / "csrc" / "cuda" / "generate_instantiations.py"
    spec = importlib.util.spec_from_file_location("generate_instantiations", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    stale = generator.stale_files()
    assert not stale, f"run `python {path.relative_to(ROOT)}`; stale: {stale}"
    assert len(generator.expected_files()) == 6  # 2 directions x 3 dtypes: runtime flags are not templates


@needs_extension
def test_extension_exposes_kernels_and_constants() -> None:
    assert callable(_C_cuda.fwd) and callable(_C_cuda.bwd)
    assert _C_cuda.CHUNK_SIZE == cuda_backend.CHUNK_SIZE
    assert _C_cuda.MAX_DSTATE == MAX_DSTATE


def test_custom_ops_are_registered() -> None:
    for name in ("selective_scan_fwd_cuda", "selective_scan_bwd_cuda"):
        op = getattr(torch.ops.compressm, name)
        assert "compressm::" + name in str(op.default._schema)


# --------------------------------------------------------------------------------------- fake (meta) kernels

def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize(
    ("seqlen", "b_shape", "with_optionals", "dtype"),
    [
        (1, (2, 16, 1), True, torch.float32),
        (256, (2, 3, 16, 256), False, torch.bfloat16),
        (257, (6, 16), True, torch.float16),
        (2049, (2, 16, 2049), False, torch.float32),
    ],
    ids=["L1-variable", "L256-grouped", "L257-invariant", "L2049-variable"],
)
def test_fake_kernels_give_shapes(seqlen: int, b_shape: tuple, with_optionals: bool, dtype: torch.dtype) -> None:
    batch, dim, dstate = 2, 6, 16
    u = _meta(batch, dim, seqlen, dtype=dtype)
    A = _meta(dim, dstate)
    B = _meta(*b_shape, dtype=torch.float32 if len(b_shape) == 2 else dtype)
    D = _meta(dim) if with_optionals else None
    z = _meta(batch, dim, seqlen, dtype=dtype) if with_optionals else None
    out, carries = torch.ops.compressm.selective_scan_fwd_cuda(u, u, A, B, B, D, z, D, None, None, True)
    n_chunks = -(-seqlen // cuda_backend.CHUNK_SIZE)
    assert out.shape == u.shape and out.dtype == dtype
    assert carries.shape == (batch, dim, n_chunks, dstate) and carries.dtype == torch.float32

    grads = torch.ops.compressm.selective_scan_bwd_cuda(u, u, A, B, B, D, z, D, None, None, carries, out,
                                                        _meta(batch, dim, dstate), True)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = grads
    assert du.shape == ddelta.shape == u.shape and du.dtype == ddelta.dtype == dtype
    assert dA.shape == (dim, dstate) and dB.shape == dC.shape == b_shape
    assert all(g.dtype == torch.float32 for g in (dA, dB, dC, dD, ddelta_bias))
    expected_optional = (dim,) if with_optionals else (0,)
    assert dD.shape == ddelta_bias.shape == expected_optional
    assert dz.shape == (u.shape if with_optionals else (0,)) and dz.dtype == dtype


# ---------------------------------------------------------------------------------------- binding validation

def _cpu_args(dtype: torch.dtype = torch.float32, batch: int = 2, dim: int = 4, seqlen: int = 10,
              dstate: int = 3) -> dict:
    """Valid arguments except that they live on the CPU."""
    return {
        "u": torch.randn(batch, dim, seqlen, dtype=dtype),
        "delta": torch.rand(batch, dim, seqlen, dtype=dtype),
        "A": -torch.rand(dim, dstate),
        "B": torch.randn(batch, dstate, seqlen, dtype=dtype),
        "C": torch.randn(dim, dstate),
        "D": torch.randn(dim),
        "z": torch.randn(batch, dim, seqlen, dtype=dtype),
        "delta_bias": torch.randn(dim),
        "ranks": None,
        "kept": None,
        "delta_softplus": True,
    }


def _bwd_args(**fwd) -> dict:
    u = fwd["u"]
    n_chunks = -(-u.shape[2] // cuda_backend.CHUNK_SIZE)
    return {**fwd, "carries": torch.zeros(u.shape[0], u.shape[1], n_chunks, fwd["A"].shape[1]),
            "dout": torch.randn_like(u), "dlast": None}


def _call(fn_name: str, args: dict):
    return getattr(_C_cuda, fn_name)(**args)


@needs_extension
@pytest.mark.parametrize("fn_name", ["fwd", "bwd"])
def test_cpu_tensors_are_rejected_clearly(fn_name: str) -> None:
    args = _cpu_args() if fn_name == "fwd" else _bwd_args(**_cpu_args())
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"u must be a CUDA tensor, got a tensor on cpu"):
        _call(fn_name, args)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@needs_extension
@pytest.mark.parametrize(
    ("fn_name", "change", "error", "message"),
    [
        ("fwd", {"u": torch.randn(2, 4, 10, dtype=torch.float64)}, TypeError, "u must have dtype float32, float16"),
        ("fwd", {"delta": torch.rand(2, 4, 10, dtype=torch.bfloat16)}, TypeError, "delta must have dtype Float"),
        ("fwd", {"delta": torch.rand(2, 4, 9)}, ValueError, r"delta must have shape \(Bt, D, L\) like u"),
        ("fwd", {"u": torch.randn(2, 10, 4).transpose(1, 2)}, ValueError, "u must be unit-stride along L"),
        ("fwd", {"A": -torch.rand(4, 3, dtype=torch.float64)}, TypeError, "A must have dtype Float"),
        ("fwd", {"A": -torch.rand(4, 300)}, ValueError, r"A must have shape \(D, N\) with D=4 and 1 <= N <= 256"),
        ("fwd", {"A": -torch.rand(3, 4).t()}, ValueError, "A must be contiguous"),
        ("fwd", {"B": torch.randn(2, 4, 10)}, ValueError, r"B \(variable\) must have shape \(Bt, N, L\)"),
        ("fwd", {"B": torch.randn(2, 3, 3, 10)}, ValueError, "B has G=3 groups, which must divide D=4"),
        ("fwd", {"B": torch.randn(2, 3, 10, dtype=torch.float16)}, TypeError, "B must have dtype Float"),
        ("fwd", {"C": torch.randn(4, 3, dtype=torch.bfloat16)}, TypeError, "C must have dtype Float"),
        ("fwd", {"C": torch.randn(4, 4)}, ValueError, r"C must have shape \(D, N\) \(time-invariant\)"),
        ("fwd", {"C": torch.randn(3)}, ValueError, r"C must have 2 \(D, N\), 3 \(Bt, N, L\) or 4"),
        ("fwd", {"D": torch.randn(4, dtype=torch.float64)}, TypeError, "D must have dtype Float"),
        ("fwd", {"D": torch.randn(5)}, ValueError, r"D must have shape \(D,\)"),
        ("fwd", {"z": torch.randn(2, 4, 10, dtype=torch.float16)}, TypeError, "z must have dtype Float"),
        ("fwd", {"delta_bias": torch.randn(4, 1)}, ValueError, r"delta_bias must have shape \(D,\)"),
        ("fwd", {"ranks": torch.ones(4, dtype=torch.int32)}, ValueError, "ranks and kept must be given together"),
        ("fwd", {"ranks": torch.ones(4, dtype=torch.int64), "kept": torch.zeros(4, 3, dtype=torch.int32)},
         TypeError, "ranks must have dtype Int"),
        ("fwd", {"ranks": torch.ones(4, dtype=torch.int32), "kept": torch.zeros(4, 2, dtype=torch.int32)},
         ValueError, r"kept must have shape \(D, N\)"),
        ("fwd", {"ranks": torch.ones(4, dtype=torch.int32), "kept": torch.zeros(3, dtype=torch.int32)},
         ValueError, r"ranks must have shape \(1,\) \(kept states shared by all channels\)"),
        ("bwd", {"carries": torch.zeros(2, 4, 2, 3)}, ValueError, r"carries must have shape \(Bt, D, n_chunks, N\)"),
        ("bwd", {"carries": torch.zeros(2, 4, 1, 3, dtype=torch.float64)}, TypeError, "carries must have dtype Float"),
        ("bwd", {"dout": torch.randn(2, 4, 10, dtype=torch.bfloat16)}, TypeError, "dout must have dtype Float"),
        ("bwd", {"dlast": torch.randn(2, 4, 4)}, ValueError, r"dlast must have shape \(Bt, D, N\)"),
    ],
)
def test_binding_rejects_bad_arguments(fn_name: str, change: dict, error: type, message: str) -> None:
    base = _cpu_args() if fn_name == "fwd" else _bwd_args(**_cpu_args())
    args = {**base, **change}
    with pytest.raises(error, match=message):
        _call(fn_name, args)


# ------------------------------------------------------------------------------------------- backend module

def test_backend_declines_cpu_tensors_with_reason() -> None:
    args = {k: v for k, v in _cpu_args().items() if k not in ("ranks", "kept")}
    x = check_scan_inputs(**args)
    assert "needs CUDA tensors" in cuda_backend.unavailable_reason(x)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run these inputs: the cuda backend needs CUDA"):
        selective_scan_fn(**args, backend="cuda")


@pytest.mark.parametrize(
    ("b_shape", "mask_shape", "dtype"),
    [((2, 16, 300), None, torch.float32), ((4, 16), (16,), torch.bfloat16), ((2, 2, 16, 300), (4, 16), torch.float16)],
    ids=["variable-nomask", "invariant-shared-bf16", "grouped-perchannel-fp16"],
)
def test_autograd_path_runs_on_meta_tensors(b_shape: tuple, mask_shape: tuple | None, dtype: torch.dtype) -> None:
    """scan -> SelectiveScanCuda -> custom ops (fake kernels) -> backward: every gradient has its input's
    shape and dtype, with nothing executed (meta tensors carry no data)."""
    act = {"device": "meta", "dtype": dtype}
    inputs = {
        "u": torch.empty(2, 4, 300, **act), "delta": torch.empty(2, 4, 300, **act),
        "A": torch.empty(4, 16, device="meta"),
        "B": torch.empty(*b_shape, device="meta", dtype=torch.float32 if len(b_shape) == 2 else dtype),
        "C": torch.empty(2, 16, 300, **act), "D": torch.empty(4, device="meta"),
        "z": torch.empty(2, 4, 300, **act), "delta_bias": torch.empty(4, device="meta"),
    }
    for t in inputs.values():
        t.requires_grad_(True)
    mask = torch.ones(mask_shape, device="meta", dtype=torch.bool) if mask_shape else None
    x = ScanInputs(**inputs, delta_softplus=True, return_last_state=True, state_mask=mask)  # no value checks on meta
    out, last_state = cuda_backend.scan(x)
    assert out.shape == (2, 4, 300) and out.dtype == dtype
    assert last_state.shape == (2, 4, 16) and last_state.dtype == torch.float32
    grads = torch.autograd.grad(out.float().sum() + last_state.sum(), list(inputs.values()))
    for (name, t), g in zip(inputs.items(), grads, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, f"d{name}: {tuple(g.shape)} {g.dtype}"
