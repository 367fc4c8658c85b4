"""The Triton decode step against the reference step, token by token against the full scan, in place.

Without a GPU it runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA tensors, where ``backend="auto"`` picks it.
"""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_scan_ref, selective_state_update, selective_state_update_ref
from compressm_kernels.ops.selective_scan import triton as triton_backend
from scan_cases import Case, assert_close, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, BF16 = torch.float32, torch.bfloat16

pytestmark = pytest.mark.skipif(
    triton_backend.state_update_unavailable_reason({"state": torch.ones(1, 1, 1, device=DEVICE)}) is not None,
    reason="triton cannot run here (not importable, or no GPU and no interpreter)",
)


@pytest.fixture
def nan_outputs(monkeypatch: pytest.MonkeyPatch):
    """The step's output starts as NaN, so an element the kernel does not write is caught."""
    original = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


def _step_inputs(batch=2, dim=6, dstate=13, groups=0, dtype=F32, seed=0, flags=True):
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, groups, dstate) if groups else (batch, dstate)
    inputs = {
        "state": torch.randn(batch, dim, dstate, generator=gen),
        "x": torch.randn(batch, dim, generator=gen).to(dtype),
        "dt": (0.5 * torch.randn(batch, dim, generator=gen) - 1).to(dtype),
        "A": -torch.exp(0.5 * torch.randn(dim, dstate, generator=gen)),
        "B": torch.randn(bc_shape, generator=gen).to(dtype),
        "C": torch.randn(bc_shape, generator=gen).to(dtype),
        "D": torch.randn(dim, generator=gen).to(dtype) if flags else None,
        "z": torch.randn(batch, dim, generator=gen).to(dtype) if flags else None,
        "dt_bias": 0.3 * torch.randn(dim, generator=gen) if flags else None,
    }
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()} | {"dt_softplus": flags}


def _mask(kind: str, dim: int, dstate: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.rand((dim, dstate) if kind == "per_channel" else (dstate,),
                      generator=torch.Generator().manual_seed(1)) > 0.5
    mask[..., 0] = True
    return mask.to(DEVICE)


@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("mask", ["none", "shared", "per_channel"])
@pytest.mark.parametrize(("dim", "dstate", "groups", "dtype", "flags"), [
    (6, 13, 0, F32, True), (6, 1, 0, F32, False), (6, 16, 2, F32, True), (6, 12, 3, BF16, True),
    (70, 64, 5, F32, True),  # three programs along D, the last one partial, groups inside a program
    (20, 256, 0, F32, True),
], ids=str)
def test_step_matches_reference(dim: int, dstate: int, groups: int, dtype: torch.dtype, flags: bool,
                                 mask: str) -> None:
    inputs = _step_inputs(dim=dim, dstate=dstate, groups=groups, dtype=dtype, flags=flags)
    state_mask = _mask(mask, dim, dstate)
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state), state_mask=state_mask)
    state = inputs["state"].clone()
    out = selective_state_update(**dict(inputs, state=state), state_mask=state_mask, backend="triton")
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    assert_close(state, ref_state, F32, "state")
    if state_mask is not None:
        assert torch.all(state[:, ~state_mask.expand(dim, dstate)] == 0)


def test_low_precision_state_in_place() -> None:
    inputs = _step_inputs(dstate=16, dtype=BF16)
    ref_state = inputs["state"].to(BF16)
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    state = inputs["state"].to(BF16)
    out = selective_state_update(**dict(inputs, state=state), backend="triton")
    assert_close(out, ref, BF16, "out")
    assert_close(state, ref_state, BF16, "state")


def test_strided_state_is_updated_in_place() -> None:
    inputs = _step_inputs(dstate=12)
    cache = torch.randn(2, 6, 20, device=DEVICE)
    cache[..., 4:16] = inputs["state"]
    untouched = cache[..., :4].clone(), cache[..., 16:].clone()
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    x = torch.randn(6, 2, device=DEVICE).t()  # strided (Bt, D) inputs too
    x.copy_(inputs["x"])
    out = selective_state_update(**dict(inputs, state=cache[..., 4:16], x=x), backend="triton")
    assert_close(out, ref, F32, "out")
    assert_close(cache[..., 4:16], ref_state, F32, "state")
    assert torch.equal(cache[..., :4], untouched[0]) and torch.equal(cache[..., 16:], untouched[1])


@pytest.mark.parametrize("mask", ["none", "per_channel"])
def test_decode_token_by_token_equals_full_scan(mask: str) -> None:
    case = Case(batch=2, dim=4, seqlen=9, dstate=13, groups=2, b_form="grouped", c_form="grouped")
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
              for k, v in make_inputs(case, device=DEVICE).items()}
    state_mask = _mask(mask, case.dim, case.dstate)
    out, last = selective_scan_ref(**inputs, state_mask=state_mask)
    state = torch.zeros(case.batch, case.dim, case.dstate, device=DEVICE)
    steps = []
    for t in range(case.seqlen):
        tok = {k: (inputs[k][..., t] if inputs[k] is not None else None) for k in ("u", "delta", "z", "B", "C")}
        steps.append(selective_state_update(state, tok["u"], tok["delta"], inputs["A"], tok["B"], tok["C"],
                                            inputs["D"], tok["z"], inputs["delta_bias"], case.delta_softplus,
                                            state_mask=state_mask, backend="triton"))
    assert_close(torch.stack(steps, dim=-1), out, case.dtype, "out")
    assert_close(state, last, F32, "state")


def test_auto_picks_triton_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    launch = triton_backend.state_update
    monkeypatch.setattr(triton_backend, "state_update", lambda *a: calls.append(1) or launch(*a))
    inputs = _step_inputs(dstate=4)
    ref = selective_state_update_ref(**dict(inputs, state=inputs["state"].clone()))
    out = selective_state_update(**dict(inputs, state=inputs["state"].clone()), state_mask=_mask("shared", 6, 4))
    assert_close(out, selective_state_update_ref(**dict(inputs, state=inputs["state"].clone()),
                                                 state_mask=_mask("shared", 6, 4)), F32, "out")
    assert_close(selective_state_update(**dict(inputs, state=inputs["state"].clone())), ref, F32, "out")
    # On a CPU auto runs the C++ kernel (or the reference), never Triton's interpreter.
    assert len(calls) == (2 if DEVICE == "cuda" else 0)


def test_float64_is_refused_with_the_reason() -> None:
    inputs = _step_inputs(dstate=4)
    wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    before = wide["state"].clone()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run these inputs: float64"):
        selective_state_update(**wide, backend="triton")
    assert torch.equal(wide["state"], before)


def test_bad_decode_inputs_change_nothing() -> None:
    inputs = _step_inputs(dstate=5)
    before = inputs["state"].clone()
    with pytest.raises(ValueError, match="C must have shape"):
        selective_state_update(**dict(inputs, C=torch.randn(2, 4, device=DEVICE)), backend="triton")
    with pytest.raises(ValueError, match="state_mask must have shape"):
        selective_state_update(**inputs, state_mask=torch.ones(4, dtype=torch.bool, device=DEVICE),
                               backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        selective_state_update(**inputs, backend="gpu")
    assert torch.equal(inputs["state"], before)


def test_decode_op_passes_opcheck() -> None:
    inputs = _step_inputs(dstate=5)
    args = (*(inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")), _mask("per_channel", 6, 5),
            True)
    torch.library.opcheck(triton_backend.selective_state_update_triton, args,
                          test_utils=("test_schema", "test_faketensor"))
