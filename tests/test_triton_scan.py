"""The Triton backend against the reference: every output and gradient, flags, B/C forms, masks.

Without a GPU this runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow, so shapes are tiny and the tiles are forced small (chunk 16, 2-4 channels per program) so that
every case spans several chunks along L and several programs along D.
"""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import compact_scan_args, selective_scan_fn, selective_scan_ref
from compressm_kernels.ops.selective_scan import triton as triton_backend
from compressm_kernels.ops.selective_scan.inputs import check_scan_inputs
from scan_cases import Case, assert_close, make_inputs, run_with_grads

pytestmark = pytest.mark.skipif(
    triton_backend.unavailable_reason(check_scan_inputs(*(torch.ones(1, 1, 1),) * 2, -torch.ones(1, 1),
                                                        torch.ones(1, 1), torch.ones(1, 1))) is not None
    and not torch.cuda.is_available(),
    reason="triton is not importable",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = triton_backend.LaunchConfig(block_d=4, chunk=16)


@pytest.fixture(autouse=True)
def small_tiles():
    with triton_backend.forced_config(SMALL):
        yield


@pytest.fixture
def nan_outputs(monkeypatch: pytest.MonkeyPatch):
    """Fresh tensors start as NaN, so an output element the kernels do not write is caught."""
    def poisoned(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            if t.is_floating_point():
                t.detach().fill_(float("nan"))  # detach: a factory called with requires_grad=True
            return t
        return make

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


def _triton(**kw):
    return selective_scan_fn(**kw, backend="triton")


def _check(case: Case, state_mask: torch.Tensor | None = None) -> None:
    inputs = make_inputs(case, device=DEVICE)
    if state_mask is not None:
        state_mask = state_mask.to(DEVICE)
    ours = run_with_grads(_triton, inputs, state_mask=state_mask)
    expected = run_with_grads(selective_scan_ref, inputs, state_mask=state_mask)
    assert ours.keys() == expected.keys()
    for name in expected:
        # Low-precision outputs/cotangents round every gradient to that precision: judge all in it.
        assert_close(ours[name], expected[name], case.dtype, name)


CASES = [
    Case(batch=2, dim=4, seqlen=40, dstate=4),
    Case(batch=1, dim=4, seqlen=33, dstate=1, has_D=False, has_z=False, has_delta_bias=False,
         delta_softplus=False, return_last_state=False),
    Case(batch=1, dim=4, seqlen=64, dstate=12, groups=2, b_form="grouped", c_form="grouped"),
    Case(batch=1, dim=6, seqlen=24, dstate=16, b_form="invariant", c_form="variable", has_z=False),
    Case(batch=2, dim=4, seqlen=20, dstate=13, b_form="variable", c_form="invariant", delta_softplus=False),
    Case(batch=1, dim=4, seqlen=17, dstate=4, b_form="invariant", c_form="invariant", has_D=False),
    Case(batch=2, dim=8, seqlen=18, dstate=4, groups=4, b_form="grouped", c_form="variable", has_delta_bias=False),
    Case(batch=1, dim=4, seqlen=1, dstate=4),
    Case(batch=1, dim=4, seqlen=40, dstate=4, dtype=torch.bfloat16),
    Case(batch=1, dim=4, seqlen=24, dstate=12, groups=2, b_form="grouped", c_form="grouped", dtype=torch.bfloat16),
    Case(batch=1, dim=4, seqlen=24, dstate=4, b_form="invariant", dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case) -> None:
    _check(case)


def _per_channel_mask(dim: int, dstate: int, seed: int) -> torch.Tensor:
    mask = torch.rand(dim, dstate, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask[:, seed % dstate] = True
    mask[1, :] = False  # one channel keeps a single state, another (below) keeps all
    mask[1, -1] = True
    mask[2, :] = True
    return mask


MASK_CASES = [
    Case(batch=2, dim=4, seqlen=37, dstate=12),
    Case(batch=1, dim=4, seqlen=20, dstate=16, groups=2, b_form="grouped", c_form="grouped", has_z=False),
    Case(batch=1, dim=6, seqlen=17, dstate=4, b_form="invariant", c_form="variable"),
    Case(batch=1, dim=4, seqlen=20, dstate=12, b_form="variable", c_form="invariant", dtype=torch.bfloat16),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_per_channel_mask_matches_reference(case: Case) -> None:
    _check(case, _per_channel_mask(case.dim, case.dstate, seed=3))


@pytest.mark.parametrize("case", MASK_CASES[:3], ids=str)
def test_shared_mask_matches_reference(case: Case) -> None:
    mask = torch.rand(case.dstate, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[0] = True
    _check(case, mask)


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per-channel"])
def test_masked_equals_compacted(per_channel: bool) -> None:
    """Masked Triton run == Triton run on the physically compacted inputs (N 12 -> 5), with the same
    mask given shared or as identical per-channel rows."""
    case = Case(batch=1, dim=4, seqlen=33, dstate=12, groups=2, b_form="grouped", c_form="invariant")
    inputs = make_inputs(case, device=DEVICE)
    mask = torch.zeros(case.dstate, dtype=torch.bool, device=DEVICE)
    mask[[0, 3, 4, 8, 11]] = True
    keep = mask.nonzero().flatten()
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(case.batch, case.dim, case.seqlen, generator=gen).to(DEVICE)
    g_last = torch.randn(case.batch, case.dim, case.dstate, generator=gen).to(DEVICE)
    state_mask = mask.expand(case.dim, -1).contiguous() if per_channel else mask
    masked = run_with_grads(_triton, inputs, cotangents=(g_out, g_last), state_mask=state_mask)

    A_c, B_c, C_c = (t.detach().requires_grad_(True) for t in compact_scan_args(inputs["A"], inputs["B"],
                                                                              inputs["C"], mask))
    compact = run_with_grads(_triton, {**inputs, "A": A_c, "B": B_c, "C": C_c}, cotangents=(g_out, g_last[..., keep]))

    assert_close(masked["out"], compact["out"], case.dtype, "out")
    assert_close(masked["last_state"][..., keep], compact["last_state"], torch.float32, "last_state kept")
    assert (masked["last_state"][..., ~mask] == 0).all(), "masked states must end at 0"
    for name in ("du", "ddelta", "dD", "dz", "ddelta_bias"):
        assert_close(masked[name], compact[name], case.dtype, name)
    for name in ("dA", "dB", "dC"):
        axis = 1 if masked[name].dim() == 2 else masked[name].dim() - 2
        assert_close(masked[name].index_select(axis, keep), compact[name], torch.float32, name + " kept")
        assert (masked[name].index_select(axis, (~mask).nonzero().flatten()) == 0).all(), name + " masked"


@pytest.mark.parametrize(
    "case, mask",
    [
        (Case(batch=1, dim=6, seqlen=33, dstate=12, groups=3, b_form="grouped", c_form="grouped"), "per-channel"),
        (Case(batch=2, dim=4, seqlen=20, dstate=4, b_form="invariant", c_form="variable"), "shared"),
        (Case(batch=1, dim=4, seqlen=20, dstate=4, dtype=torch.bfloat16), None),
    ],
    ids=str,
)
def test_every_output_is_written(case: Case, mask: str | None, nan_outputs) -> None:
    """With fresh tensors poisoned with NaN, outputs and gradients still match the reference."""
    state_mask = {"per-channel": _per_channel_mask(case.dim, case.dstate, seed=4),
                  "shared": torch.tensor([False, True, True, False]), None: None}[mask]
    state_mask = None if state_mask is None else state_mask.to(DEVICE)
    inputs = make_inputs(case, device=DEVICE)
    ours = run_with_grads(_triton, inputs, state_mask=state_mask)
    for name, t in ours.items():
        assert torch.isfinite(t).all(), f"{name}: unwritten (NaN) elements"
    expected = run_with_grads(selective_scan_ref, inputs, state_mask=state_mask)
    for name in expected:
        assert_close(ours[name], expected[name], case.dtype, name)


def test_broadcast_cotangents_and_unused_outputs() -> None:
    """Gradients of .sum() arrive as stride-0 views; a loss on last_state alone sends no gradient for out."""
    case = Case(batch=1, dim=4, seqlen=20, dstate=4)
    inputs = make_inputs(case, device=DEVICE)
    leaves = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    for loss_of in (lambda o, s: o.sum() + s.sum(), lambda o, s: s.sum()):
        ours = torch.autograd.grad(loss_of(*_triton(**inputs)), leaves, allow_unused=True)
        expected = torch.autograd.grad(loss_of(*selective_scan_ref(**inputs)), leaves, allow_unused=True)
        for g, e, leaf in zip(ours, expected, leaves, strict=True):
            zero = torch.zeros_like(leaf)
            assert_close(zero if g is None else g, zero if e is None else e, torch.float32, "grad")


def test_saves_only_chunk_carries() -> None:
    """Nothing of size (Bt, D, L, N) is kept for backward: the largest saved tensors are the (Bt, D, L)
    inputs and the (Bt, D, n_chunks, N) carries."""
    case = Case(batch=1, dim=4, seqlen=64, dstate=16)
    inputs = make_inputs(case, device=DEVICE)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        _triton(**inputs)
    assert (1, 4, 64 // SMALL.chunk, 16) in saved
    assert all(s.numel() < case.batch * case.dim * case.seqlen * case.dstate for s in saved)


def test_torch_compile_traces_without_graph_breaks() -> None:
    case = Case(batch=1, dim=4, seqlen=20, dstate=4)
    inputs = make_inputs(case, device=DEVICE)
    mask = torch.tensor([True, False, True, True], device=DEVICE)

    def loss(u, delta, A, B, C, D, z, delta_bias):
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, True, state_mask=mask,
                                      backend="triton")
        return (out * out).sum() + last.sum()

    leaves = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    found = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(loss(*leaves), leaves)
    for g, e in zip(found, expected, strict=True):
        assert_close(g, e, torch.float32, "grad")


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    def inputs(dtype: torch.dtype):
        ones = {"dtype": dtype, "device": DEVICE}
        return check_scan_inputs(*(torch.ones(1, 2, 3, **ones),) * 2, -torch.ones(2, 4, **ones),
                                 torch.ones(1, 4, 3, **ones), torch.ones(1, 4, 3, **ones))

    assert "backend='reference'" in triton_backend.unavailable_reason(inputs(torch.float64))
    x = inputs(torch.float32)
    assert triton_backend.unavailable_reason(x) is None
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_backend._kernels, "INTERPRETED", False)
        assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason(x)
    monkeypatch.setattr(triton_backend, "_kernels", None)
    assert "pip install triton" in triton_backend.unavailable_reason(x)
