"""A masked scan equals the scan on the compacted (sliced) inputs: outputs, last state and gradients."""

from __future__ import annotations

import pytest
import torch

from compressm_kernels import compact_scan_args, mask_to_ranks, selective_scan_ref
from scan_cases import Case, assert_close, make_inputs, run_with_grads

MASK_CASES = [
    Case(batch=2, dim=4, seqlen=37, dstate=12),
    Case(batch=1, dim=4, seqlen=20, dstate=13, groups=2, b_form="grouped", c_form="grouped"),
    Case(batch=2, dim=3, seqlen=17, dstate=16, b_form="invariant", c_form="variable", has_z=False),
    Case(batch=1, dim=2, seqlen=9, dstate=5, b_form="variable", c_form="invariant", delta_softplus=False),
]


def _shared_mask(n: int, seed: int = 0) -> torch.Tensor:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    mask[n // 2] = True
    return mask


def _state_axis(t: torch.Tensor) -> int:
    return 1 if t.dim() == 2 else t.dim() - 2


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_shared_mask_equals_compacted(case: Case) -> None:
    inputs = make_inputs(case)
    mask = _shared_mask(case.dstate)
    keep = mask.nonzero().flatten()
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(case.batch, case.dim, case.seqlen, generator=gen)
    g_last = torch.randn(case.batch, case.dim, case.dstate, generator=gen)
    masked = run_with_grads(selective_scan_ref, inputs, cotangents=(g_out, g_last), state_mask=mask)

    A_c, B_c, C_c = (t.detach().requires_grad_(True) for t in compact_scan_args(inputs["A"], inputs["B"],
                                                                              inputs["C"], mask))
    compact_inputs = {**inputs, "A": A_c, "B": B_c, "C": C_c}
    compact = run_with_grads(selective_scan_ref, compact_inputs, cotangents=(g_out, g_last[..., keep]))

    assert_close(masked["out"], compact["out"], case.dtype, "out")
    assert_close(masked["last_state"][..., keep], compact["last_state"], torch.float32, "last_state kept")
    assert (masked["last_state"][..., ~mask] == 0).all(), "masked states must end at 0"
    for name in ("du", "ddelta", "dD", "dz", "ddelta_bias"):
        if name in masked:
            assert_close(masked[name], compact[name], case.dtype, name)
    for name in ("dA", "dB", "dC"):
        axis = _state_axis(masked[name])
        assert_close(masked[name].index_select(axis, keep), compact[name], torch.float32, name + " kept")
        dropped = masked[name].index_select(axis, (~mask).nonzero().flatten())
        assert (dropped == 0).all(), f"{name}: masked states must get zero gradient"


def _channel_inputs(inputs: dict, d: int, keep: torch.Tensor, dim: int) -> dict:
    """Channel d alone, with only its kept states: the per-channel "compacted" scan."""
    def bc(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2:
            return t[d : d + 1][:, keep]
        if t.dim() == 4:  # the channel's group, as a variable (Bt, N, L) B/C
            t = t[:, d // (dim // t.shape[1])]
        return t[:, keep]

    out = dict(inputs)
    for name in ("u", "delta", "z"):
        if inputs[name] is not None:
            out[name] = inputs[name][:, d : d + 1]
    for name in ("D", "delta_bias"):
        if inputs[name] is not None:
            out[name] = inputs[name][d : d + 1]
    out["A"] = inputs["A"][d : d + 1][:, keep]
    out["B"], out["C"] = bc(inputs["B"]), bc(inputs["C"])
    return out


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_per_channel_mask_equals_per_channel_compacted(case: Case) -> None:
    inputs = make_inputs(case)
    mask = torch.rand(case.dim, case.dstate, generator=torch.Generator().manual_seed(5)) > 0.5
    mask[:, 0] = True
    with torch.no_grad():
        out, last = selective_scan_ref(**inputs, state_mask=mask)
        expected_out, expected_last = torch.zeros_like(out), torch.zeros_like(last)
        for d in range(case.dim):
            keep = mask[d].nonzero().flatten()
            o, lst = selective_scan_ref(**_channel_inputs(inputs, d, keep, case.dim))
            expected_out[:, d], expected_last[:, d, keep] = o[:, 0], lst[:, 0]
    assert_close(out, expected_out, case.dtype, "out")
    assert_close(last, expected_last, torch.float32, "last_state")
    assert (last[:, ~mask] == 0).all(), "masked states must end at 0"


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
def test_per_channel_mask_gradients(case: Case) -> None:
    """Gradients of a per-channel masked scan equal the sum of per-channel compacted scans' gradients
    under the same cotangent."""
    inputs = make_inputs(case)
    mask = torch.rand(case.dim, case.dstate, generator=torch.Generator().manual_seed(7)) > 0.5
    mask[:, -1] = True
    gen = torch.Generator().manual_seed(11)
    g_out = torch.randn(case.batch, case.dim, case.seqlen, generator=gen)
    g_last = torch.randn(case.batch, case.dim, case.dstate, generator=gen)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    out, last = selective_scan_ref(**inputs, state_mask=mask)
    masked = dict(zip(leaves, torch.autograd.grad((out.float() * g_out).sum() + (last * g_last).sum(),
                                                  list(leaves.values())), strict=True))
    total = 0
    for d in range(case.dim):
        keep = mask[d].nonzero().flatten()
        part = _channel_inputs(inputs, d, keep, case.dim)
        o, lst = selective_scan_ref(**part)
        total = total + (o.float() * g_out[:, d : d + 1]).sum() + (lst * g_last[:, d : d + 1][..., keep]).sum()
    per_channel = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values())), strict=True))
    for name in leaves:
        dtype = case.dtype if name in ("u", "delta", "z") else torch.float32
        assert_close(masked[name], per_channel[name], dtype, "d" + name)
    dropped = ~mask
    assert (masked["A"][dropped] == 0).all(), "dA of masked states must be 0"


def test_mask_to_ranks() -> None:
    mask = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    ranks, kept = mask_to_ranks(mask, 3)
    assert ranks.tolist() == [2, 1, 4]
    assert kept.dtype == torch.int32
    assert kept[0, :2].tolist() == [0, 2] and kept[1, :1].tolist() == [3] and kept[2].tolist() == [0, 1, 2, 3]
    assert sorted(kept[0].tolist()) == [0, 1, 2, 3], "each row is a permutation of the states"
    shared_ranks, shared_kept = mask_to_ranks(torch.tensor([False, True, True]), 2)
    assert shared_ranks.tolist() == [2, 2] and shared_kept[:, :2].tolist() == [[1, 2], [1, 2]]


def test_mask_to_ranks_reuses_results_while_the_mask_is_unchanged() -> None:
    # A decode step passes the same mask every token: its ranks are computed once, again after an in-place
    # change, and forgotten with the mask.
    from compressm_kernels.ops.selective_scan import masks

    mask = torch.tensor([[True, False, True], [False, True, True]])
    first = mask_to_ranks(mask, 2)
    assert all(a is b for a, b in zip(mask_to_ranks(mask, 2), first, strict=True))
    mask[0, 1] = True  # in place: the version counter moves
    ranks, kept = mask_to_ranks(mask, 2)
    assert ranks.tolist() == [3, 2] and kept[0].tolist() == [0, 1, 2] and first[0].tolist() == [2, 2]
    with torch.inference_mode():  # no version counter to trust: computed every time
        frozen = torch.tensor([True, False])
        assert mask_to_ranks(frozen, 1)[0] is not mask_to_ranks(frozen, 1)[0]
    key = id(mask)
    assert key in masks._RANKS
    del mask
    assert key not in masks._RANKS
