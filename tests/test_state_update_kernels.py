"""Every decode-step kernel against the reference step, in place, and token by token against the full scan:
the C++ step on CPU tensors, the Triton step on CUDA tensors (in Triton's interpreter on CPU tensors without a
GPU, tests/conftest.py). Each kernel's own paths and refusals are in test_cpu_state_update.py and
test_triton_state_update.py.
"""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_scan_ref, selective_state_update, selective_state_update_ref
from compressm_kernels.ops.selective_scan import cpu, triton
from scan_cases import Case, assert_close, make_inputs, step_inputs, step_mask

F32, BF16 = torch.float32, torch.bfloat16
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = {"cpu": ("cpu", cpu), "triton": (TRITON_DEVICE, triton)}


@pytest.fixture(params=list(KERNELS))
def kernel(request: pytest.FixtureRequest) -> tuple[str, str]:
    """``(backend, device)`` of a decode kernel that can run here (skipped, with the reason, if it cannot)."""
    device, module = KERNELS[request.param]
    reason = module.state_update_unavailable_reason({"state": torch.ones(1, 1, 1, device=device)})
    if reason is not None:
        pytest.skip(reason)
    return request.param, device


@pytest.fixture
def nan_outputs(monkeypatch: pytest.MonkeyPatch):
    """Outputs allocated in Python start as NaN, so an element a kernel does not write is caught."""
    original = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


@pytest.mark.usefixtures("nan_outputs")
@pytest.mark.parametrize("mask", ["none", "shared", "per_channel"])
@pytest.mark.parametrize(("dim", "dstate", "groups", "dtype", "flags"), [
    (6, 13, 0, F32, True), (6, 1, 0, F32, False), (6, 16, 2, F32, True), (6, 64, 3, BF16, True),
    (6, 256, 0, F32, True),
    (70, 64, 5, F32, True),  # Triton: three programs along D, the last partial, groups inside a program
], ids=str)
def test_step_matches_reference(kernel: tuple[str, str], dim: int, dstate: int, groups: int, dtype: torch.dtype,
                                flags: bool, mask: str) -> None:
    backend, device = kernel
    inputs = step_inputs(dim=dim, dstate=dstate, groups=groups, dtype=dtype, flags=flags, device=device)
    state_mask = step_mask(mask, dim, dstate, device)
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state), state_mask=state_mask)
    state = inputs["state"].clone()
    out = selective_state_update(**dict(inputs, state=state), state_mask=state_mask, backend=backend)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    assert_close(state, ref_state, F32, "state")
    if state_mask is not None:
        assert torch.all(state[:, ~state_mask.expand(dim, dstate)] == 0)


@pytest.mark.parametrize("mask", ["none", "per_channel"])
def test_states_sharing_one_A_match_reference(kernel: tuple[str, str], mask: str) -> None:
    # Mamba-2 passes A expanded along N (stride 0: one value per channel).
    backend, device = kernel
    inputs = step_inputs(dim=40, dstate=12, groups=4, device=device)
    inputs["A"] = inputs["A"][:, :1].expand(40, 12)
    state_mask = step_mask(mask, 40, 12, device)
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state), state_mask=state_mask)
    state = inputs["state"].clone()
    out = selective_state_update(**dict(inputs, state=state), state_mask=state_mask, backend=backend)
    assert_close(out, ref, F32, "out")
    assert_close(state, ref_state, F32, "state")


def test_low_precision_state_in_place(kernel: tuple[str, str]) -> None:
    backend, device = kernel
    inputs = step_inputs(dstate=16, dtype=BF16, device=device)
    ref_state = inputs["state"].to(BF16)
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    state = inputs["state"].to(BF16)
    out = selective_state_update(**dict(inputs, state=state), backend=backend)
    assert_close(out, ref, BF16, "out")
    assert_close(state, ref_state, BF16, "state")


def test_strided_state_is_updated_in_place(kernel: tuple[str, str]) -> None:
    backend, device = kernel
    inputs = step_inputs(dstate=12, device=device)
    cache = torch.randn(2, 6, 20, device=device)
    cache[..., 4:16] = inputs["state"]
    untouched = cache[..., :4].clone(), cache[..., 16:].clone()
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    x = torch.empty(6, 2, device=device).t()  # a strided (Bt, D) input too
    x.copy_(inputs["x"])
    out = selective_state_update(**dict(inputs, state=cache[..., 4:16], x=x), backend=backend)
    assert_close(out, ref, F32, "out")
    assert_close(cache[..., 4:16], ref_state, F32, "state")
    assert torch.equal(cache[..., :4], untouched[0]) and torch.equal(cache[..., 16:], untouched[1])


@pytest.mark.parametrize("mask", ["none", "shared", "per_channel"])
@pytest.mark.parametrize("case", [Case(batch=2, dim=4, seqlen=70, dstate=13),
                                  Case(batch=1, dim=4, seqlen=9, dstate=16, groups=2, b_form="grouped",
                                       c_form="grouped", has_z=False, dtype=BF16)], ids=str)
def test_decode_token_by_token_equals_full_scan(kernel: tuple[str, str], case: Case, mask: str) -> None:
    backend, device = kernel
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
              for k, v in make_inputs(case, device=device).items()}
    state_mask = step_mask(mask, case.dim, case.dstate, device)
    out, last = selective_scan_ref(**inputs, state_mask=state_mask)
    state = torch.zeros(case.batch, case.dim, case.dstate, device=device)
    steps = []
    for t in range(case.seqlen):
        tok = {k: (inputs[k][..., t] if inputs[k] is not None else None) for k in ("u", "delta", "z", "B", "C")}
        steps.append(selective_state_update(state, tok["u"], tok["delta"], inputs["A"], tok["B"], tok["C"],
                                            inputs["D"], tok["z"], inputs["delta_bias"], case.delta_softplus,
                                            state_mask=state_mask, backend=backend))
    assert_close(torch.stack(steps, dim=-1), out, case.dtype, "out")
    assert_close(state, last, F32, "state")


def test_bad_decode_inputs_change_nothing(kernel: tuple[str, str]) -> None:
    backend, device = kernel
    inputs = step_inputs(dstate=5, device=device)
    before = inputs["state"].clone()
    with pytest.raises(ValueError, match="C must have shape"):
        selective_state_update(**dict(inputs, C=torch.randn(2, 4, device=device)), backend=backend)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        selective_state_update(**dict(inputs, x=[1.0]), backend=backend)
    with pytest.raises(ValueError, match="state_mask must have shape"):
        selective_state_update(**inputs, state_mask=torch.ones(4, dtype=torch.bool, device=device), backend=backend)
    assert torch.equal(inputs["state"], before)
