"""The decode step, token by token, reproduces the full scan (and its last state)."""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_scan_ref, selective_state_update
from scan_cases import Case, assert_close, make_inputs

CASES = [
    Case(batch=2, dim=4, seqlen=9, dstate=12),
    Case(batch=1, dim=4, seqlen=7, dstate=13, groups=2, b_form="grouped", c_form="grouped", has_z=False),
    Case(batch=2, dim=3, seqlen=5, dstate=1, has_D=False, has_delta_bias=False, delta_softplus=False),
]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_steps_match_full_scan(case: Case, masked: bool) -> None:
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(case).items()}
    mask = None
    if masked:
        mask = torch.rand(case.dim, case.dstate, generator=torch.Generator().manual_seed(2)) > 0.5
        mask[:, 0] = True
    out, last = selective_scan_ref(**inputs, state_mask=mask)
    state = torch.zeros(case.batch, case.dim, case.dstate)
    steps = []
    for t in range(case.seqlen):
        step = {k: inputs[k][..., t] if inputs[k] is not None else None for k in ("u", "delta", "z", "B", "C")}
        steps.append(selective_state_update(state, step["u"], step["delta"], inputs["A"], step["B"], step["C"],
                                            inputs["D"], step["z"], inputs["delta_bias"], case.delta_softplus,
                                            state_mask=mask))
    assert_close(torch.stack(steps, dim=-1), out, case.dtype, "out")
    assert_close(state, last, torch.float32, "state")


def test_bad_decode_input_changes_nothing() -> None:
    state = torch.randn(2, 4, 3)
    before = state.clone()
    with pytest.raises(ValueError, match="B must have shape"):
        selective_state_update(state, torch.randn(2, 4), torch.randn(2, 4), -torch.rand(4, 3), torch.randn(2, 5),
                               torch.randn(2, 3))
    assert torch.equal(state, before)
