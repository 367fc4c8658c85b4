"""GPU kernels (CUDA and Triton backends) against the reference on the GPU: every output, every gradient
and the last state, with all flags, B/C forms, masks (masked == compacted) and awkward sizes.

Skipped without a CUDA device; collecting this module does not touch the device.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from compressm_kernels import compact_scan_args, mask_to_ranks, selective_scan_fn, selective_scan_ref
from compressm_kernels.ops.selective_scan import cuda as cuda_backend
from scan_cases import Case, assert_close, make_inputs, run_with_grads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = ("cuda", "triton")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _backend_or_skip(backend: str) -> None:
    """Skip if the backend's module is not part of this tree (the Triton backend comes from its own
    branch); a backend that exists but cannot run on this GPU fails in the test instead."""
    try:
        importlib.import_module(f"compressm_kernels.ops.selective_scan.{backend}")
    except ModuleNotFoundError as err:
        if err.name == f"compressm_kernels.ops.selective_scan.{backend}":
            pytest.skip(f"the {backend!r} backend is not in this tree")
        raise


def _poison_allocator(*shapes: tuple[int, ...]) -> None:
    """Leave NaN-filled blocks of these sizes in the caching allocator, so outputs a kernel allocates
    with torch.empty start as NaN and an unwritten element fails the finiteness check."""
    blocks = [torch.full(s, math.nan, device="cuda") for s in shapes for _ in range(2)]
    del blocks


def _poison_for(inputs: dict) -> None:
    u, A = inputs["u"], inputs["A"]
    batch, dim, seqlen = u.shape
    n_chunks = -(-seqlen // cuda_backend.CHUNK_SIZE)
    _poison_allocator((batch, dim, seqlen), (batch, dim, n_chunks, A.shape[1]), (batch, dim, A.shape[1]))


def _compare(found: dict, expected: dict, dtype: torch.dtype) -> None:
    assert found.keys() == expected.keys()
    for name in expected:
        assert found[name].dtype == expected[name].dtype, f"{name}: {found[name].dtype} != {expected[name].dtype}"
        assert_close(found[name], expected[name], dtype, name)


CASES = [
    Case(batch=2, dim=4, seqlen=63, dstate=1),
    Case(batch=2, dim=5, seqlen=200, dstate=12, b_form="invariant"),
    Case(batch=1, dim=6, seqlen=1, dstate=13, groups=2, b_form="grouped", c_form="grouped"),
    Case(batch=2, dim=8, seqlen=2049, dstate=16),
    Case(batch=2, dim=4, seqlen=300, dstate=64, has_D=False, has_z=False, has_delta_bias=False,
         delta_softplus=False),
    Case(batch=2, dim=8, seqlen=257, dstate=128, groups=4, b_form="grouped", c_form="invariant"),
    Case(batch=1, dim=3, seqlen=600, dstate=256, return_last_state=False),
    Case(batch=3, dim=12, seqlen=512, dstate=16, groups=3, b_form="grouped", c_form="grouped", has_z=False),
    Case(batch=2, dim=4, seqlen=100, dstate=8, b_form="invariant", c_form="invariant", delta_softplus=False),
]
DTYPE_CASES = [(c, dt) for c in CASES for dt in (F32, BF16)] + [(Case(dim=8, seqlen=333, dstate=16), F16)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("case", "dtype"), DTYPE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference(backend: str, case: Case, dtype: torch.dtype) -> None:
    _backend_or_skip(backend)
    case = Case(**{**case.__dict__, "dtype": dtype})
    inputs = make_inputs(case, seed=3, device="cuda")
    expected = run_with_grads(selective_scan_ref, inputs)
    _poison_for(inputs)
    found = run_with_grads(selective_scan_fn, inputs, backend=backend)
    _compare(found, expected, dtype)


MASK_CASES = [
    (Case(batch=2, dim=4, seqlen=200, dstate=13), "shared"),
    (Case(batch=2, dim=6, seqlen=600, dstate=64, groups=3, b_form="grouped", c_form="grouped"), "shared"),
    (Case(batch=2, dim=8, seqlen=257, dstate=16, b_form="invariant"), "per_channel"),
    (Case(batch=2, dim=8, seqlen=2049, dstate=128), "per_channel"),
    (Case(batch=1, dim=5, seqlen=63, dstate=12, groups=5, b_form="grouped", c_form="invariant"), "per_channel"),
]


def _random_mask(case: Case, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.dstate,) if kind == "shared" else (case.dim, case.dstate)
    mask = torch.rand(shape, generator=gen) < 0.4
    mask[..., 0] = True  # every channel keeps at least one state
    if kind == "per_channel":
        mask[1, :] = True  # one channel keeps everything, so ranks differ across channels
    return mask.cuda()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("case", "kind"), MASK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_masked_matches_reference_and_zeroes_dropped_states(backend: str, case: Case, kind: str,
                                                            dtype: torch.dtype) -> None:
    _backend_or_skip(backend)
    case = Case(**{**case.__dict__, "dtype": dtype})
    inputs = make_inputs(case, seed=5, device="cuda")
    mask = _random_mask(case, kind, seed=6)
    expected = run_with_grads(selective_scan_ref, inputs, state_mask=mask)
    _poison_for(inputs)
    found = run_with_grads(selective_scan_fn, inputs, state_mask=mask, backend=backend)
    _compare(found, expected, dtype)
    dropped = ~mask.expand(case.dim, case.dstate)
    assert (found["last_state"][:, dropped] == 0).all()
    assert (found["dA"][dropped] == 0).all()
    for name in ("dB", "dC"):
        grad = found[name]
        if grad.dim() == 2:
            assert (grad[dropped] == 0).all(), name
        elif kind == "shared":
            assert (grad.index_select(grad.dim() - 2, (~mask).nonzero().flatten()) == 0).all(), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", [c for c, kind in MASK_CASES if kind == "shared"], ids=str)
def test_shared_mask_equals_compacted(backend: str, case: Case) -> None:
    _backend_or_skip(backend)
    inputs = make_inputs(case, seed=7, device="cuda")
    mask = _random_mask(case, "shared", seed=8)
    keep = mask.nonzero().flatten()
    gen = torch.Generator().manual_seed(9)
    cot_out = torch.randn(inputs["u"].shape, generator=gen).cuda()
    cot_last = torch.randn(case.batch, case.dim, case.dstate, generator=gen).cuda()
    masked = run_with_grads(selective_scan_fn, inputs, cotangents=(cot_out, cot_last), state_mask=mask,
                            backend=backend)

    A_c, B_c, C_c = compact_scan_args(inputs["A"].detach(), inputs["B"].detach(), inputs["C"].detach(), mask)
    compact = {**inputs, "A": A_c.requires_grad_(), "B": B_c.requires_grad_(), "C": C_c.requires_grad_()}
    compacted = run_with_grads(selective_scan_fn, compact, cotangents=(cot_out, cot_last[..., keep]),
                               backend=backend)
    for name in ("out", "du", "ddelta", "dD", "dz", "ddelta_bias"):
        assert_close(masked[name], compacted[name], torch.float32, name)
    assert_close(masked["last_state"][..., keep], compacted["last_state"], torch.float32, "last_state")
    assert_close(masked["dA"][:, keep], compacted["dA"], torch.float32, "dA")
    for name in ("dB", "dC"):
        assert_close(masked[name].index_select(masked[name].dim() - 2, keep), compacted[name], torch.float32, name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_strided_and_unaligned_inputs(backend: str) -> None:
    """Channel-major layouts and rows that start off a 16-byte boundary (the kernels' scalar path)."""
    _backend_or_skip(backend)
    case = Case(batch=2, dim=8, seqlen=301, dstate=16, dtype=BF16)
    inputs = make_inputs(case, seed=11, device="cuda")
    shifted = {}
    for name in ("u", "delta", "z", "B", "C"):
        t = inputs[name].detach()
        wider = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, device="cuda", dtype=t.dtype)
        wider[..., 1:] = t
        shifted[name] = wider[..., 1:].requires_grad_()  # unit-stride along L, misaligned rows
    transposed = inputs["u"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    for variant in ({**inputs, **shifted}, {**inputs, "u": transposed}):
        expected = run_with_grads(selective_scan_ref, variant)
        found = run_with_grads(selective_scan_fn, variant, backend=backend)
        _compare(found, expected, BF16)


def test_cuda_backend_traces_under_torch_compile() -> None:
    case = Case(batch=2, dim=4, seqlen=100, dstate=16)
    inputs = make_inputs(case, seed=12, device="cuda")
    mask = _random_mask(case, "per_channel", seed=13)

    def fn(**kw):
        return selective_scan_fn(**kw, state_mask=mask, backend="cuda")

    expected = run_with_grads(fn, inputs)
    found = run_with_grads(torch.compile(fn, fullgraph=False), inputs)
    _compare(found, expected, F32)


def test_binding_rejects_mixed_devices() -> None:
    args = make_inputs(Case(batch=1, dim=4, seqlen=8, dstate=4), device="cuda")
    args = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    module = cuda_backend._extension()
    with pytest.raises(ValueError, match="delta must be a CUDA tensor, got a tensor on cpu"):
        module.fwd(args["u"], args["delta"].cpu(), args["A"], args["B"], args["C"], args["D"], args["z"],
                   args["delta_bias"], None, None, True)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_custom_ops_pass_opcheck(dtype: torch.dtype) -> None:
    """Schema, fake kernels and real kernels agree (torch.library.opcheck)."""
    case = Case(batch=2, dim=4, seqlen=300, dstate=12, dtype=dtype)
    x = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in make_inputs(case, device="cuda").items()}
    mask = _random_mask(case, "per_channel", seed=14)
    ranks, kept = mask_to_ranks(mask, case.dim)
    fwd_args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], ranks, kept, True)
    torch.library.opcheck(torch.ops.compressm.selective_scan_fwd_cuda, fwd_args)
    out, carries = torch.ops.compressm.selective_scan_fwd_cuda(*fwd_args)
    dlast = torch.randn(case.batch, case.dim, case.dstate, device="cuda")
    bwd_args = (*fwd_args[:10], carries, torch.randn_like(out), dlast, True)
    torch.library.opcheck(torch.ops.compressm.selective_scan_bwd_cuda, bwd_args)
