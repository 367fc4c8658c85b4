"""The C++ CPU decode step's own paths: channel blocks and vector tails, states sharing one A, strided states on
the fast path, its refusals, its exp and softplus. What every decode kernel must do is in
test_state_update_kernels.py."""

from __future__ import annotations

import math

import pytest
import torch

from compressm_kernels import selective_state_update, selective_state_update_ref
from compressm_kernels.ops.selective_scan import cpu
from scan_cases import assert_close, step_inputs

pytestmark = pytest.mark.skipif(cpu.load_extension("_C")[0] is None, reason="compressm_kernels._C is not built")

F32, BF16 = torch.float32, torch.bfloat16


def test_auto_uses_the_kernel_and_falls_back_for_float64() -> None:
    inputs = step_inputs(dstate=4)
    wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref = selective_state_update_ref(**dict(wide, state=wide["state"].clone()))
    assert_close(selective_state_update(**dict(wide, state=wide["state"].clone())), ref, torch.float64, "out")
    with pytest.raises(RuntimeError, match="backend='cpu' cannot run"):
        selective_state_update(**wide, backend="cpu")
    assert cpu.state_update_unavailable_reason({k: v for k, v in inputs.items() if k != "dt_softplus"}) is None


def test_bad_decode_inputs_change_nothing() -> None:
    inputs = step_inputs(dstate=5)
    before = inputs["state"].clone()
    with pytest.raises(ValueError, match="backend must be"):
        selective_state_update(**inputs, backend="gpu")
    with pytest.raises(ValueError, match="B must have shape"):  # the kernel's own check
        cpu.selective_state_update_cpu(inputs["state"], inputs["x"], inputs["dt"], inputs["A"], inputs["B"][:, :3],
                                       inputs["C"], None, None, None, None, None, False)
    assert torch.equal(inputs["state"], before)


def test_decode_op_passes_opcheck() -> None:
    inputs = step_inputs(dstate=5)
    args = (*(inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")), None, None, True)
    torch.library.opcheck(cpu.selective_state_update_cpu, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(("dim", "dstate", "groups"), [
    (273, 13, 7), (130, 16, 0), (64, 8, 2), (9, 256, 3),  # partial blocks, groups changing inside a block
    (40, 7, 0), (70, 9, 5), (96, 15, 3), (33, 20, 3), (64, 32, 4), (50, 60, 2), (128, 64, 2),  # tails, 1-8 vectors
    (24, 100, 0),  # any vector count
    (45, 3, 5), (390, 1, 2),  # N < 8: the block's states as one flat array, groups inside it
], ids=str)
def test_channel_blocks_and_tails_match_reference(dim: int, dstate: int, groups: int) -> None:
    # The kernel works on blocks of 128 channels, advances states eight at a time (a tail as an overlapping
    # last vector; fewer than eight states: all the block's states as one flat array) and sums C·h eight
    # channels at a time: partial blocks, groups, vectors and groups of eight must come out right.
    inputs = step_inputs(dim=dim, dstate=dstate, groups=groups)
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    state = inputs["state"].clone()
    out = selective_state_update(**dict(inputs, state=state), backend="cpu")
    assert_close(out, ref, F32, "out")
    assert_close(state, ref_state, F32, "state")


@pytest.mark.parametrize("mask", ["none", "shared", "per_channel"])
@pytest.mark.parametrize(("dim", "dstate", "groups", "layout"), [
    (140, 3, 2, "contiguous"), (140, 13, 0, "contiguous"), (70, 64, 5, "contiguous"), (9, 256, 3, "contiguous"),
    (40, 12, 0, "transposed"), (40, 12, 4, "bf16"),  # rows gathered one state at a time
], ids=str)
def test_states_sharing_one_A_match_reference(dim: int, dstate: int, groups: int, layout: str, mask: str) -> None:
    # Mamba-2 passes A expanded along N (one value per channel); the kernel then takes one decay per channel
    # on every path: the flat N < 8 array, rows in place, masked states gathered, strided states gathered.
    inputs = step_inputs(dim=dim, dstate=dstate, groups=groups)
    inputs["A"] = inputs["A"][:, :1].expand(dim, dstate)
    state_mask = None
    if mask != "none":
        state_mask = torch.rand((dim, dstate) if mask == "per_channel" else (dstate,),
                                generator=torch.Generator().manual_seed(1)) > 0.5
        state_mask[..., 0] = True
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state), state_mask=state_mask)
    if layout == "transposed":
        state = inputs["state"].transpose(1, 2).contiguous().transpose(1, 2)
    else:
        state = inputs["state"].to(BF16 if layout == "bf16" else F32)
    out = selective_state_update(**dict(inputs, state=state), state_mask=state_mask, backend="cpu")
    dtype = BF16 if layout == "bf16" else F32
    assert_close(out, ref, dtype, "out")
    assert_close(state.float(), ref_state, dtype, "state")


@pytest.mark.parametrize("layout", ["channel_stride", "transposed", "bf16_state_stride"])
def test_fast_path_updates_strided_states_in_place(layout: str) -> None:
    inputs = step_inputs(dim=70, dstate=12)
    # x / dt / z as non-contiguous views too: (D, Bt) buffers transposed.
    for name in ("x", "dt", "z"):
        inputs[name] = inputs[name].t().contiguous().t()
    if layout == "channel_stride":
        cache = torch.zeros(2, 140, 12)
        state = cache[:, ::2]
    elif layout == "transposed":
        cache = torch.zeros(2, 12, 70)
        state = cache.transpose(1, 2)
    else:
        cache = torch.zeros(2, 70, 24, dtype=BF16)
        state = cache[..., ::2]
    state.copy_(inputs["state"])
    before = cache.clone()
    ptr = state.data_ptr()
    ref_state = state.float().clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    out = selective_state_update(**dict(inputs, state=state))
    dtype = BF16 if layout == "bf16_state_stride" else F32
    assert state.data_ptr() == ptr
    assert_close(out, ref, F32 if dtype == F32 else BF16, "out")
    assert_close(state.float(), ref_state, dtype, "state")
    if layout == "channel_stride":
        assert torch.equal(cache[:, 1::2], before[:, 1::2])
    elif layout == "bf16_state_stride":
        assert torch.equal(cache[..., 1::2], before[..., 1::2])


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
@pytest.mark.parametrize(("change", "error", "message"), [
    ({"x": torch.randn(2, 5)}, ValueError, r"x must have shape \(Bt, D\)"),
    ({"dt": torch.randn(3, 6)}, ValueError, r"dt must have shape \(Bt, D\)"),
    ({"z": torch.randn(2, 6).int()}, TypeError, "z must be fp32/fp16/bf16/fp64"),
    ({"A": torch.randn(6, 4)}, ValueError, r"A must have shape \(D, N\)"),
    ({"B": torch.randn(2, 4, 5)}, ValueError, r"B must have shape \(Bt, N\)"),
    ({"C": torch.randn(2, 4)}, ValueError, r"C must have shape \(Bt, N\)"),
    ({"B": torch.randint(0, 3, (2, 5))}, TypeError, "B must be fp32/fp16/bf16/fp64, got torch.int64"),
    ({"C": torch.randint(0, 3, (2, 5))}, TypeError, "C must be fp32/fp16/bf16/fp64, got torch.int64"),
    ({"D": torch.randn(5)}, ValueError, r"D must have shape \(D,\)"),
    ({"D": torch.ones(6, dtype=torch.int32)}, TypeError, "D must be fp32/fp16/bf16/fp64, got torch.int32"),
    ({"dt_bias": torch.ones(6, dtype=torch.bool)}, TypeError, "dt_bias must be fp32/fp16/bf16/fp64, got torch.bool"),
    ({"dt_bias": torch.randn(6, 1)}, ValueError, r"dt_bias must have shape \(D,\)"),
    ({"x": torch.randn(2, 6, device="meta")}, ValueError, "x is on meta but state is on cpu"),
    ({"B": "B"}, TypeError, "B must be a torch.Tensor"),
    ({"state": torch.randn(2, 6)}, ValueError, r"state must have shape \(Bt, D, N\)"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_fast_path_rejects_bad_inputs_and_changes_nothing(backend: str, change: dict, error: type,
                                                          message: str) -> None:
    # The eager fast path lets the kernel check first; a refusal must still give the full path's error.
    inputs = step_inputs(dstate=5)
    state = inputs["state"]
    before = state.clone()
    with pytest.raises(error, match=message):
        selective_state_update(**dict(inputs, **change), backend=backend)
    assert torch.equal(state, before)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_expanded_state_is_refused_and_left_alone(backend: str) -> None:
    # An expand()ed state (the batch axis at stride 0) would have both batch rows written to the same memory.
    inputs = step_inputs(dstate=5)
    base = inputs["state"][:1].clone()
    before = base.clone()
    message = (r"state is updated in place but has overlapping memory \(an expand\(\)ed tensor\?\), "
               r"strides \[0, 5, 1\]; pass a clone\(\)")
    with pytest.raises(ValueError, match=message):
        selective_state_update(**dict(inputs, state=base.expand(2, 6, 5)), backend=backend)
    with pytest.raises(ValueError, match=message):  # the kernel's own check
        cpu.selective_state_update_cpu(base.expand(2, 6, 5), *(inputs[k] for k in ("x", "dt", "A", "B", "C")),
                                       None, None, None, None, None, False)
    assert torch.equal(base, before)


@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=str)
def test_half_precision_skip_and_bias_run_on_the_kernel(dtype: torch.dtype) -> None:
    # A model kept in fp16/bf16 passes D and dt_bias in its dtype, as mamba_ssm's step allows; the kernel reads
    # them as fp32, an exact upcast, so the step equals the one given their fp32 values.
    inputs = step_inputs(dim=70, dstate=12)
    half = dict(inputs, D=inputs["D"].to(dtype), dt_bias=inputs["dt_bias"].to(dtype))
    exact = dict(inputs, D=half["D"].float(), dt_bias=half["dt_bias"].float())
    state, exact_state = inputs["state"].clone(), inputs["state"].clone()
    out = selective_state_update(**dict(half, state=state), backend="cpu")
    expected = selective_state_update(**dict(exact, state=exact_state), backend="cpu")
    assert torch.equal(out, expected)
    assert torch.equal(state, exact_state)


def test_fast_path_refusal_falls_back_to_the_reference_for_auto() -> None:
    # float64 A: the kernel refuses it, "auto" takes the reference, "cpu" says why it cannot run.
    inputs = step_inputs(dstate=5)
    inputs["A"] = inputs["A"].double()
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state))
    state = inputs["state"].clone()
    assert_close(selective_state_update(**dict(inputs, state=state)), ref, F32, "out")
    assert_close(state, ref_state, F32, "state")
    before = state.clone()
    with pytest.raises(RuntimeError, match="A is float64"):
        selective_state_update(**dict(inputs, state=state), backend="cpu")
    assert torch.equal(state, before)


def test_channel_with_every_state_masked_outputs_the_skip_only() -> None:
    inputs = step_inputs(dim=77, dstate=13)
    state_mask = torch.rand(77, 13, generator=torch.Generator().manual_seed(3)) > 0.5
    state_mask[5] = False  # rank 0: C·h is exactly 0, the state row is zeroed
    ref_state = inputs["state"].clone()
    ref = selective_state_update_ref(**dict(inputs, state=ref_state), state_mask=state_mask)
    state = inputs["state"].clone()
    out = selective_state_update(**dict(inputs, state=state), state_mask=state_mask, backend="cpu")
    assert_close(out, ref, F32, "out")
    assert_close(state, ref_state, F32, "state")
    assert torch.all(state[:, 5] == 0)


# The decay is exp_eighths(y) with y = (Δ·8/ln2)·A rounded to fp32 (scan_recurrence.h): 8/ln2 folded into Δ
# once per channel. With Δ = 1, h = 1 and x = 0 the new state is exactly that decay of A.
EIGHTHS_PER_NAT = torch.tensor(11.5415601730, dtype=torch.float32)


def decay_of_A(A: torch.Tensor) -> torch.Tensor:
    dim, dstate = A.shape
    state = torch.ones(1, dim, dstate)
    zeros = torch.zeros(1, dstate)
    selective_state_update(state, torch.zeros(1, dim), torch.ones(1, dim), A, zeros, zeros, backend="cpu")
    return state[0]


@pytest.mark.parametrize("dstate", [5, 24, 29], ids=str)  # the compiler's loop; full 8-lane vectors; a tail
def test_decay_exp_matches_torch_over_its_range(dstate: int) -> None:
    # exp(A) to fp32 rounding plus the folded constant's two roundings (8/ln2 itself and y, |A|·2^-24 each) from
    # deep underflow (exactly 0) to where 2^k tops out (88.37), NaN kept. Above that it stays finite to 1e-5 until
    # exp overflows to inf (88.72), as expf does.
    dim = 40
    A = torch.linspace(-100.0, 88.3, dim * dstate).reshape(dim, dstate)
    A[3, 1] = float("nan")
    A[4, :4] = torch.tensor([88.7, 88.8, 1e30, float("inf")])
    top = torch.zeros(dim, dstate, dtype=torch.bool)
    top[4, :4] = True
    decay = decay_of_A(A)
    expected = torch.exp(A.double())
    assert torch.isnan(decay[3, 1])
    assert decay[4, 0].item() == pytest.approx(expected[4, 0].item(), rel=1e-5)
    assert torch.all(decay[4, 1:4] == math.inf)
    assert torch.all(decay[A < -88.0] == 0)
    rest = ~torch.isnan(A) & ~top & (expected > 1.2e-38)  # normal results
    tolerance = 3e-7 + 2 * A.double().abs() * 2.0**-24
    excess = ((decay.double() - expected).abs() / expected - tolerance)[rest]
    assert excess.max().item() <= 0, f"relative error above the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("dstate", [5, 24, 29], ids=str)
def test_decay_exp_where_exp_is_subnormal(dstate: int) -> None:
    # From A = -87.99 down the decay is exactly 0; up to -87.33, where expf's result is subnormal, the decay is
    # off by at most 2^-127·2^(1/16) (T's error times the polynomial's factor: see exp_eighths), and from there on
    # a normal float (the test above).
    A = torch.linspace(-88.2, -87.2, 40 * dstate).reshape(40, dstate)
    decay = decay_of_A(A).double()
    expected = torch.exp(A.double())
    assert torch.all(decay[A < -87.99] == 0)
    assert torch.all(decay[A > -87.98] > 0)
    assert ((decay - expected).abs().max().item()) <= 2.0**-127 * 2.0 ** (1 / 16)


@pytest.mark.parametrize("dstate", [5, 64], ids=str)  # the scalar loop; eight-lane vectors
def test_decay_exp_within_its_ulp_bound(dstate: int) -> None:
    # exp_eighths promises 1.15 ulp against exp(y·ln2/8) for its fp32 argument y wherever the result is a
    # normal float (1.35 on the baseline loops, without FMA: T + T·r·q rounds twice): 327,680 points of A from
    # -87.3 to 88.6, y = fl(fl(8/ln2)·A), checked in units in the last place against float64. A wrong table entry,
    # a wrong k or a wrong coefficient is off by far more.
    bound = 1.15 if cpu.load_extension("_C")[0].cpu_isa() == "avx2+fma" else 1.35
    A = torch.linspace(-87.3, 88.6, 320 * 1024).reshape(-1, dstate)
    y = (EIGHTHS_PER_NAT * A).double()
    exact = torch.exp(y * (math.log(2.0) / 8))
    ulp = (torch.nextafter(exact.float(), torch.tensor(math.inf)) - exact.float()).double()
    assert ((decay_of_A(A).double() - exact).abs() / ulp).max().item() <= bound


def test_softplus_of_dt_matches_float64_over_its_range() -> None:
    # With h = 0, x = 1, B = 1 and A = 0 the new state is Δ = softplus(dt) itself: within 3 fp32 ulp of the
    # float64 value from underflow to past torch's threshold (x above 20), NaN kept, -inf to 0 (+inf would
    # make Δ·A = inf·0 NaN).
    dt = torch.cat([torch.linspace(-87.0, 30.0, 100_003), torch.tensor([float("nan"), -float("inf")])])
    dim = dt.numel()
    state = torch.zeros(1, dim, 1)
    selective_state_update(state, torch.ones(1, dim), dt[None], torch.zeros(dim, 1), torch.ones(1, 1),
                           torch.zeros(1, 1), dt_softplus=True, backend="cpu")
    expected = torch.nn.functional.softplus(dt.double()).float()
    torch.testing.assert_close(state[0, :, 0], expected, rtol=3 * 2.0**-23, atol=0.0, equal_nan=True)
