"""Every bad argument raises a clear error naming it, and nothing is mutated."""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_scan_fn
from compressm_kernels.ops.selective_scan import check_scan_inputs
from scan_cases import Case, make_inputs


def _good() -> dict:
    inputs = make_inputs(Case(batch=2, dim=4, seqlen=8, dstate=3))
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


BAD = [
    ("u-rank", {"u": torch.randn(2, 4)}, ValueError, "u must have shape (Bt, D, L)"),
    ("u-dtype", {"u": torch.ones(2, 4, 8, dtype=torch.int32)}, TypeError, "u must have dtype"),
    ("u-notensor", {"u": [1.0]}, TypeError, "u must be a torch.Tensor"),
    ("u-empty", {"u": torch.randn(2, 4, 0)}, ValueError, "non-empty"),
    ("delta-shape", {"delta": torch.randn(2, 4, 7)}, ValueError, "delta must have the shape of u"),
    ("A-shape", {"A": -torch.rand(5, 3)}, ValueError, "A must have shape (D, N) with D=4"),
    ("A-dtype", {"A": -torch.rand(4, 3).half()}, TypeError, "A must have dtype"),
    ("A-complex", {"A": torch.randn(4, 3, dtype=torch.complex64)}, TypeError, "A must be real"),
    ("A-too-many-states", {"A": -torch.rand(4, 257)}, ValueError, "N <= 256"),
    ("B-shape", {"B": torch.randn(2, 4, 8)}, ValueError, "B (variable) must have shape (Bt, N, L) = (2, 3, 8)"),
    ("B-groups", {"B": torch.randn(2, 3, 3, 8)}, ValueError, "divisible by G"),
    ("B-rank", {"B": torch.randn(8)}, ValueError, "B must have 2 (D, N)"),
    ("C-invariant", {"C": torch.randn(3, 3)}, ValueError, "C (time-invariant) must have shape (D, N) = (4, 3)"),
    ("C-dtype", {"C": torch.ones(2, 3, 8, dtype=torch.int64)}, TypeError, "C must have dtype"),
    ("D-shape", {"D": torch.randn(3)}, ValueError, "D must have shape (D,) = (4,)"),
    ("D-dtype", {"D": torch.randn(4).bfloat16()}, TypeError, "D must have dtype"),
    ("z-shape", {"z": torch.randn(2, 4, 9)}, ValueError, "z must have the shape of u"),
    ("delta_bias-shape", {"delta_bias": torch.randn(4, 1)}, ValueError, "delta_bias must have shape (D,)"),
    ("softplus-type", {"delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
    ("mask-dtype", {"state_mask": torch.ones(3)}, TypeError, "state_mask must have dtype bool"),
    ("mask-shape", {"state_mask": torch.ones(4, 2, dtype=torch.bool)}, ValueError, "state_mask must have shape (N,)"),
    ("mask-empty", {"state_mask": torch.zeros(4, 3, dtype=torch.bool)}, ValueError, "keeps no state"),
    ("device", {"D": torch.randn(4, device="meta")}, ValueError, "D is on meta but u is on cpu"),
]


@pytest.mark.parametrize(("change", "error", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_and_mutates_nothing(change: dict, error: type, message: str) -> None:
    inputs = {**_good(), **change}
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(error) as info:
        selective_scan_fn(**inputs, backend="reference")
    assert message in str(info.value)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), f"{k} was modified"


def test_kernel_level_check_demands_unit_stride_along_L() -> None:
    inputs = _good()
    u_strided = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    check_scan_inputs(**{**inputs, "u": u_strided})
    with pytest.raises(ValueError, match="u must be unit-stride along L"):
        check_scan_inputs(**{**inputs, "u": u_strided}, require_unit_stride=True)


def test_public_function_copies_non_unit_stride_inputs() -> None:
    inputs = _good()
    strided = {k: inputs[k].transpose(-1, -2).contiguous().transpose(-1, -2) for k in ("u", "delta", "B", "C", "z")}
    expected = selective_scan_fn(**inputs, backend="reference")
    found = selective_scan_fn(**{**inputs, **strided}, backend="reference")
    torch.testing.assert_close(found[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(found[1], expected[1], rtol=0, atol=0)
