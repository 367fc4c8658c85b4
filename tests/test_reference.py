"""The in-package reference against mamba_ssm's selective_scan_ref and float64 gradcheck."""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import selective_scan_ref
from scan_cases import TENSOR_ARGS, Case, assert_close, make_inputs, mamba_selective_scan_ref, run_with_grads

ORACLE_CASES = [
    Case(batch=2, dim=4, seqlen=16, dstate=4),
    Case(batch=1, dim=3, seqlen=1, dstate=1),
    Case(batch=2, dim=4, seqlen=63, dstate=12, has_z=False),
    Case(batch=1, dim=6, seqlen=200, dstate=13, has_D=False, has_delta_bias=False),
    Case(batch=2, dim=4, seqlen=63, dstate=16, groups=2, b_form="grouped", c_form="grouped"),
    Case(batch=2, dim=4, seqlen=33, dstate=12, b_form="invariant", c_form="variable", delta_softplus=False),
    Case(batch=1, dim=4, seqlen=40, dstate=13, b_form="variable", c_form="invariant", return_last_state=False),
    Case(batch=2, dim=4, seqlen=20, dstate=16, groups=1, b_form="grouped", c_form="invariant"),
    Case(batch=2, dim=4, seqlen=63, dstate=12, dtype=torch.bfloat16),
    Case(batch=2, dim=4, seqlen=63, dstate=13, groups=2, b_form="grouped", c_form="grouped", dtype=torch.float16),
]


@pytest.mark.oracle
@pytest.mark.parametrize("case", ORACLE_CASES, ids=str)
def test_reference_matches_mamba_ssm(case: Case) -> None:
    oracle = mamba_selective_scan_ref()
    inputs = make_inputs(case)
    ours = run_with_grads(selective_scan_ref, inputs)
    theirs = run_with_grads(oracle, inputs)
    assert ours.keys() == theirs.keys()
    for name in ours:
        # With low-precision inputs the cotangent of out is rounded to that precision (and mamba_ssm
        # computes silu(z) in it), so every gradient carries that rounding: judge all in that dtype.
        assert_close(ours[name], theirs[name], case.dtype, name)


def test_reference_long_sequence_spans_chunks() -> None:
    """L above the reference's chunk length, so carries between checkpointed chunks are exercised."""
    case = Case(batch=1, dim=2, seqlen=300, dstate=3)
    inputs = make_inputs(case)
    ours = run_with_grads(selective_scan_ref, inputs)
    theirs = run_with_grads(mamba_selective_scan_ref(), inputs)
    for name in ours:
        assert_close(ours[name], theirs[name], torch.float32, name)


GRADCHECK_CASES = [
    Case(batch=1, dim=2, seqlen=5, dstate=3, dtype=torch.float64),
    Case(batch=2, dim=4, seqlen=4, dstate=2, groups=2, b_form="grouped", c_form="grouped", dtype=torch.float64),
    Case(batch=1, dim=2, seqlen=4, dstate=3, b_form="invariant", c_form="invariant", delta_softplus=False,
         dtype=torch.float64),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_reference_gradcheck(case: Case, masked: bool) -> None:
    inputs = make_inputs(case)
    names = [k for k in TENSOR_ARGS if inputs[k] is not None]
    mask = torch.rand(case.dim, case.dstate, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, 0] = True

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        out, last = selective_scan_ref(**kw, delta_softplus=case.delta_softplus, return_last_state=True,
                                       state_mask=mask if masked else None)
        return out, last

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_float32_accumulation_for_low_precision() -> None:
    """bf16 inputs are computed in fp32: the result equals the fp32 run on the same (rounded) values,
    rounded once to bf16."""
    case = Case(batch=1, dim=4, seqlen=50, dstate=8, dtype=torch.bfloat16)
    inputs = make_inputs(case)
    out_bf16, last_bf16 = selective_scan_ref(**inputs)
    as_fp32 = {
        k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()
    }
    out_fp32, last_fp32 = selective_scan_ref(**as_fp32)
    assert out_bf16.dtype == torch.bfloat16 and last_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, out_fp32.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(last_bf16, last_fp32, rtol=0, atol=0)
