"""The C++ CPU scan (backend="cpu") against the reference: outputs, every gradient, the last state, masks."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressm_kernels import compact_scan_args, selective_scan_fn
from compressm_kernels.ops.selective_scan import cpu
from compressm_kernels.ops.selective_scan.inputs import check_scan_inputs
from compressm_kernels.ops.selective_scan.interface import resolve_backend
from scan_cases import Case, assert_close, make_inputs, run_with_grads

pytestmark = pytest.mark.skipif(cpu.load_extension("_C")[0] is None, reason="compressm_kernels._C is not built")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NO_FLAGS = {"has_D": False, "has_z": False, "has_delta_bias": False, "delta_softplus": False}

CASES = [
    # awkward N at small D (L = 600 spans ten 64-step chunks, the last one partial); states are padded
    # to whole 8-lane vectors, 1-4 of them held in registers, more through memory: every kernel size path, with padding
    *(Case(dim=4, seqlen=600, dstate=n) for n in (1, 2, 3, 4, 7, 9, 12, 13, 16, 20, 32, 33, 64)),
    # N <= 4 packs 8 / w channels into a vector (w = N rounded up to a power of two): D not a multiple of the pack
    # (the last one partial), chunks with a ragged tail, every B/C form, groups holding whole packs, and groups
    # that would split a pack (5 channels per group at w = 2: one channel per vector instead)
    Case(dim=19, seqlen=300, dstate=1),
    Case(dim=13, seqlen=77, dstate=2, b_form="invariant", c_form="variable"),
    Case(dim=7, seqlen=70, dstate=3, b_form="variable", c_form="invariant", has_z=False),
    Case(dim=16, seqlen=90, dstate=2, groups=2, b_form="grouped", c_form="grouped"),
    Case(dim=8, seqlen=63, dstate=4, groups=4, b_form="grouped", c_form="variable"),
    Case(dim=10, seqlen=63, dstate=2, groups=2, b_form="grouped", c_form="grouped"),
    Case(dim=9, seqlen=63, dstate=1, b_form="invariant", c_form="invariant", dtype=BF16, **NO_FLAGS),
    Case(dim=6, seqlen=200, dstate=3, dtype=F16),
    Case(batch=1, dim=3, seqlen=63, dstate=256),
    Case(dim=5, seqlen=1, dstate=12),
    Case(dim=5, seqlen=63, dstate=13, **NO_FLAGS),
    Case(dim=4, seqlen=63, dstate=8, has_z=False, return_last_state=False),
    Case(dim=4, seqlen=63, dstate=8, has_D=False, delta_softplus=False),
    # B/C forms
    Case(dim=4, seqlen=130, dstate=13, groups=2, b_form="grouped", c_form="grouped"),
    Case(dim=4, seqlen=130, dstate=12, b_form="invariant", c_form="invariant"),
    Case(dim=6, seqlen=70, dstate=5, groups=2, b_form="invariant", c_form="grouped"),
    Case(dim=4, seqlen=70, dstate=16, b_form="variable", c_form="invariant", has_z=False),
    # N = 8 and 16 run unrolled state loops: with invariant B/C too, and chunks whose length is not a multiple of 8
    Case(dim=4, seqlen=77, dstate=8, b_form="invariant", c_form="variable"),
    Case(dim=4, seqlen=77, dstate=16, groups=2, b_form="grouped", c_form="invariant"),
    # low precision
    Case(dim=4, seqlen=200, dstate=16, dtype=BF16),
    Case(dim=4, seqlen=63, dstate=13, groups=2, b_form="grouped", c_form="grouped", dtype=BF16),
    Case(dim=4, seqlen=200, dstate=16, dtype=F16),
    Case(dim=4, seqlen=63, dstate=12, b_form="invariant", c_form="variable", dtype=F16, **NO_FLAGS),
]


def _detached(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


def _check_all(got: dict, ref: dict) -> None:
    """Every output and gradient, each with the tolerance of its own dtype."""
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == ref[name].dtype, name
        assert_close(got[name], ref[name], ref[name].dtype, name)


@pytest.fixture(autouse=True)
def poison_fresh_memory():
    """Fresh torch.empty memory (the kernels' outputs) is NaN, so an unwritten element fails the test."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def test_poisoning_is_active() -> None:
    assert torch.isnan(torch.empty(64)).all()


@pytest.fixture(params=["chunks", "64-step chunks"])
def chunking(request, monkeypatch) -> None:
    """The scan's own chunk size (up to 1024 steps, so short sequences run as one chunk), and 64-step chunks, so
    that every case also crosses chunk boundaries (the carries between them, the backward's recomputation)."""
    if request.param == "64-step chunks":
        monkeypatch.setattr(cpu, "chunk_size", lambda dstate: max(64, dstate))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case, chunking: None) -> None:
    inputs = make_inputs(case)
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference")
    got = run_with_grads(selective_scan_fn, inputs, backend="cpu")
    _check_all(got, ref)


def test_auto_picks_cpu_for_cpu_tensors() -> None:
    inputs = make_inputs(Case())
    x = check_scan_inputs(*(inputs[k] for k in ("u", "delta", "A", "B", "C")))
    assert resolve_backend(x)[0] == "cpu"


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
@pytest.mark.parametrize("case", [Case(dim=4, seqlen=150, dstate=13),
                                  Case(dim=4, seqlen=70, dstate=12, groups=2, b_form="grouped", c_form="invariant"),
                                  Case(dim=4, seqlen=63, dstate=16, dtype=BF16),
                                  Case(dim=4, seqlen=75, dstate=60)], ids=str)  # per-channel ranks past 32
def test_mask_matches_reference(case: Case, per_channel: bool, chunking: None) -> None:
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand((case.dim, case.dstate) if per_channel else (case.dstate,), generator=gen) > 0.4
    mask[..., 1] = True
    if per_channel:
        mask[0] = False  # a channel with no state left
        mask[:, 2] = False  # a state no channel keeps: its variable dB/dC must be exactly 0
    inputs = make_inputs(case)
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference", state_mask=mask)
    got = run_with_grads(selective_scan_fn, inputs, backend="cpu", state_mask=mask)
    _check_all(got, ref)
    dropped = ~mask.expand(case.dim, case.dstate)
    assert torch.all(got["dA"][dropped] == 0)
    assert torch.all(got["last_state"][:, dropped] == 0)
    for name in ("dB", "dC"):
        if got[name].dim() == 2:
            assert torch.all(got[name][dropped] == 0), name
        elif not per_channel or name == "dB":
            unused = ~mask.any(0) if per_channel else ~mask
            assert torch.all(got[name][..., unused, :] == 0), name


@pytest.mark.parametrize("case", [Case(dim=7, seqlen=90, dstate=13),
                                  Case(dim=7, seqlen=90, dstate=13, b_form="invariant", c_form="variable"),
                                  Case(dim=7, seqlen=90, dstate=13, groups=7, b_form="grouped", c_form="grouped"),
                                  Case(dim=7, seqlen=40, dstate=5, b_form="variable", c_form="invariant")], ids=str)
def test_per_channel_mask_gathers_or_masks_in_place(case: Case, chunking: None) -> None:
    """A channel gathers its kept states when that saves vectors of 8 lanes, else it runs every lane with the
    dropped states masked in place: one call mixing both, channels keeping nothing or everything, and gradients
    through the output and the last state, matches the reference; dropped states stay 0 and get no gradient."""
    ranks = [0, 3, 8, 9, 12, 13, 11] if case.dstate == 13 else [0, 1, 3, 4, 5, 2, 5]  # N = 13: 8 lanes saved up to 8
    gen = torch.Generator().manual_seed(5)
    mask = torch.zeros(case.dim, case.dstate, dtype=torch.bool)
    for d, r in enumerate(ranks):
        mask[d, torch.randperm(case.dstate, generator=gen)[:r]] = True
    inputs = make_inputs(case)
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference", state_mask=mask)
    got = run_with_grads(selective_scan_fn, inputs, backend="cpu", state_mask=mask)
    _check_all(got, ref)
    assert torch.all(got["dA"][~mask] == 0) and torch.all(got["last_state"][:, ~mask] == 0)
    for name in ("dB", "dC"):
        if got[name].dim() == 2:
            assert torch.all(got[name][~mask] == 0), name
        elif got[name].dim() == 4:  # (Bt, G, N, L) with a group per channel: its dropped states' rows are 0
            assert torch.all(got[name][:, ~mask] == 0), name


@pytest.mark.parametrize("mask", ["none", "shared", "per_channel"])
@pytest.mark.parametrize("case", [Case(dim=6, seqlen=300, dstate=13), Case(dim=4, seqlen=77, dstate=64),
                                  Case(batch=1, dim=3, seqlen=70, dstate=128, groups=3, b_form="grouped",
                                       c_form="grouped"),
                                  Case(dim=3, seqlen=63, dstate=200, dtype=BF16),
                                  Case(dim=4, seqlen=63, dstate=12, b_form="invariant", c_form="variable"),
                                  Case(dim=8, seqlen=40, dstate=3)], ids=str)
def test_channels_whose_states_share_A_match_reference(case: Case, mask: str, chunking: None) -> None:
    """Mamba-2's heads: every state of a channel has the same A (the kernel computes one decay per step), and a
    channel where one state differs (one decay per state again)."""
    inputs = make_inputs(case)
    gen = torch.Generator().manual_seed(4)
    A = (-torch.rand(case.dim, 1, generator=gen) - 0.5).expand(case.dim, case.dstate).contiguous()
    A[-1, -1] -= 0.25
    inputs["A"] = A.requires_grad_(True)
    state_mask = None
    if mask != "none":
        state_mask = torch.rand((case.dim, case.dstate) if mask == "per_channel" else (case.dstate,),
                                generator=gen) > 0.3
        state_mask[..., 0] = True
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference", state_mask=state_mask)
    got = run_with_grads(selective_scan_fn, inputs, backend="cpu", state_mask=state_mask)
    _check_all(got, ref)


@pytest.mark.parametrize(("case", "kept"), [
    (Case(dim=4, seqlen=150, dstate=16), (0, 3, 4, 7, 11)),
    (Case(dim=4, seqlen=70, dstate=13, groups=2, b_form="grouped", c_form="invariant"), (0, 3, 4, 7, 11)),
    (Case(dim=11, seqlen=150, dstate=8), (2, 5, 6)),  # the compacted scan packs channels, the masked one cannot
], ids=str)
def test_masked_equals_compacted(case: Case, kept: tuple[int, ...], chunking: None) -> None:
    """A shared mask, as (N,) and broadcast to (D, N) (the per-channel rank path), equals the scan of the
    compacted inputs; dropped states get exactly zero gradient."""
    mask = torch.zeros(case.dstate, dtype=torch.bool)
    mask[torch.tensor(kept)] = True
    keep = mask.nonzero().flatten()
    inputs = make_inputs(case)
    small = _detached(inputs)
    A, B, C = compact_scan_args(small["A"].detach(), small["B"].detach(), small["C"].detach(), mask)
    small.update(A=A.requires_grad_(), B=B.requires_grad_(), C=C.requires_grad_())
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(2, case.dim, case.seqlen, generator=gen)
    dlast = torch.randn(2, case.dim, case.dstate, generator=gen)
    compact = run_with_grads(selective_scan_fn, small, cotangents=(dout, dlast[..., keep]), backend="cpu")
    for form in (mask, mask.expand(case.dim, -1).contiguous()):
        masked = run_with_grads(selective_scan_fn, inputs, cotangents=(dout, dlast), backend="cpu", state_mask=form)
        for name in ("out", "du", "ddelta", "dz", "dD", "ddelta_bias"):
            assert_close(masked[name], compact[name], F32, name)
        assert_close(masked["last_state"][..., keep], compact["last_state"], F32, "last_state")
        assert_close(masked["dA"][:, keep], compact["dA"], F32, "dA")
        for name in ("dB", "dC"):
            axis = 1 if masked[name].dim() == 2 else -2
            assert_close(masked[name].index_select(axis, keep), compact[name], F32, name)
            assert torch.all(masked[name].index_select(axis, (~mask).nonzero().flatten()) == 0), name
        assert torch.all(masked["dA"][:, ~mask] == 0)


@pytest.mark.parametrize("dstate, b_form, per_channel_mask", [
    (12, "variable", False),  # one channel per vector
    (2, "variable", False),  # four channels to a vector
    (12, "invariant", False),  # dB summed per channel, like dA, dD and ddelta_bias
    (13, "variable", True),  # channels that gather their kept states, and channels masked in place
], ids=["N12", "N2-packed", "N12-invariant-B", "N13-per-channel-mask"])
def test_thread_counts_agree_and_runs_repeat_exactly(dstate: int, b_form: str, per_channel_mask: bool) -> None:
    """Channels (or packs) are split over threads and dB/dC summed from per-thread rows: any thread count gives the
    reference's results, and a fixed one the same bits every run (a static assignment, no atomics). The kernel
    gives each thread at least 2^17 state-steps, so this size is what it takes to run three."""
    case = Case(batch=2, dim=97, seqlen=1100, dstate=dstate, b_form=b_form)  # 426,800 state-steps at N = 2
    inputs = make_inputs(case, seed=3)
    mask = None
    if per_channel_mask:
        gen = torch.Generator().manual_seed(4)
        mask = torch.rand(case.dim, dstate, generator=gen) < torch.rand(case.dim, 1, generator=gen)
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference", state_mask=mask)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            first = run_with_grads(selective_scan_fn, inputs, backend="cpu", state_mask=mask)
            again = run_with_grads(selective_scan_fn, inputs, backend="cpu", state_mask=mask)
            for name in ref:
                assert_close(first[name], ref[name], F32, f"{name} ({n} threads)")
                assert torch.equal(first[name], again[name]), f"{name} ({n} threads) differs between runs"
    finally:
        torch.set_num_threads(threads)


def test_gradients_exact_to_fp32_roundoff() -> None:
    """Kernel and reference differ only by float32 rounding (a different exp and summation order): every
    output and gradient agrees in norm to 2e-6 relative (~17 ulps), far below the table's 1e-4."""
    case = Case(batch=2, dim=8, seqlen=300, dstate=16, groups=2, b_form="grouped", c_form="variable")
    inputs = make_inputs(case, seed=7)
    ref = run_with_grads(selective_scan_fn, inputs, backend="reference")
    got = run_with_grads(selective_scan_fn, inputs, backend="cpu")
    for name in ref:
        err = (got[name] - ref[name]).norm() / ref[name].norm()
        assert err < 2e-6, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dstate", [12, 3], ids=str)
def test_gradient_through_last_state_only(dstate: int, chunking: None) -> None:
    case = Case(dim=5, seqlen=100, dstate=dstate)
    inputs = make_inputs(case)
    leaves = [inputs[k] for k in ("u", "delta", "A", "B", "D", "delta_bias")]  # C, z do not reach the last state
    cotangent = torch.randn(2, case.dim, case.dstate, generator=torch.Generator().manual_seed(4))
    grads = {}
    for backend in ("reference", "cpu"):
        last = selective_scan_fn(**inputs, backend=backend)[1]
        grads[backend] = torch.autograd.grad((last * cotangent).sum(), leaves, allow_unused=True)
    names = ("du", "ddelta", "dA", "dB", "dD", "ddelta_bias")
    for name, got, ref in zip(names, grads["cpu"], grads["reference"], strict=True):
        if ref is None:  # D only reaches the output
            assert got is None or torch.all(got == 0), name
        else:
            assert_close(got, ref, F32, name)


@pytest.mark.parametrize("dstate", [12, 2], ids=str)  # one channel per vector; four to a vector
def test_strided_inputs(dstate: int) -> None:
    """Inputs that are views with unit-stride L but other strides (as mamba's projections make them) run
    without copies and match contiguous inputs."""
    case = Case(dim=9, seqlen=90, dstate=dstate)
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(case).items()}
    strided = dict(inputs)
    for name in ("u", "delta", "z"):  # channel slices of a wider tensor
        wide = torch.randn(2, case.dim + 3, case.seqlen)
        wide[:, 1:case.dim + 1] = inputs[name]
        strided[name] = wide[:, 1:case.dim + 1]
    for name in ("B", "C"):  # state slices of a taller tensor
        tall = torch.randn(2, case.dstate + 2, case.seqlen)
        tall[:, 2:] = inputs[name]
        strided[name] = tall[:, 2:]
    assert not strided["u"].is_contiguous() and not strided["B"].is_contiguous()
    ref = selective_scan_fn(**inputs, backend="cpu")
    got = selective_scan_fn(**strided, backend="cpu")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_float64_is_refused_with_the_fix() -> None:
    inputs = make_inputs(Case(dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backend='reference'"):
        selective_scan_fn(**inputs, backend="cpu")


def test_bad_kernel_inputs_name_the_argument() -> None:
    inputs = make_inputs(Case(dim=4, seqlen=16, dstate=4))
    args = {k: inputs[k].detach() for k in ("u", "delta", "A", "B", "C")}
    before = {k: v.clone() for k, v in args.items()}
    base = dict(args, D=None, z=None, delta_bias=None, ranks=None, kept=None, delta_softplus=False, chunk=64)
    with pytest.raises(ValueError, match="B must have shape"):
        cpu.selective_scan_fwd_cpu(**dict(base, B=args["B"][:, :3]))
    with pytest.raises(ValueError, match="u must be unit-stride along L"):
        cpu.selective_scan_fwd_cpu(**dict(base, u=args["u"].transpose(1, 2).contiguous().transpose(1, 2)))
    with pytest.raises(TypeError, match="A must be float32"):
        cpu.selective_scan_fwd_cpu(**dict(base, A=args["A"].double()))
    with pytest.raises(ValueError, match="kept must hold state indices"):
        cpu.selective_scan_fwd_cpu(**dict(base, ranks=torch.full((4,), 2, dtype=torch.int32),
                                          kept=torch.full((4, 4), 9, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"chunk must lie in \[1, 1024\]"):
        cpu.selective_scan_fwd_cpu(**dict(base, chunk=1025))
    for k, v in args.items():
        assert torch.equal(v, before[k]), k


def test_chunk_size_fits_the_kernel_and_the_memory_bound() -> None:
    """Every N gets a chunk the kernel takes (at most 1024 steps) and at least N steps, so the saved carries,
    n_chunks·N per channel, stay within L + N; up to 32 states a chunk's recomputed states fill 64 KB at most."""
    for n in range(1, 257):
        chunk = cpu.chunk_size(n)
        assert n <= chunk <= 1024, n
        for seqlen in (1, 255, 256, 1000, 4097):
            assert -(-seqlen // chunk) * n <= seqlen + n, (n, seqlen)
        if n <= 32:
            assert chunk * 4 * (-(-n // 8) * 8) <= 64 * 1024, n
    assert [cpu.chunk_size(n) for n in (8, 16, 24, 32, 33, 64, 256)] == [1024, 1024, 680, 512, 256, 256, 256]


def test_custom_ops_pass_opcheck() -> None:
    """Schemas, fake (meta) implementations and autograd registration are consistent (torch.compile relies
    on them)."""
    case = dataclasses.replace(Case(dim=4, seqlen=20, dstate=5), return_last_state=True)
    inputs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(case).items()}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    fwd = (*args, None, None, True, 8)
    out, carries = cpu.selective_scan_fwd_cpu(*fwd)
    torch.library.opcheck(cpu.selective_scan_fwd_cpu, fwd, test_utils=("test_schema", "test_faketensor"))
    bwd = (*fwd, carries, torch.randn_like(out), torch.randn(2, 4, 5))
    torch.library.opcheck(cpu.selective_scan_bwd_cpu, bwd, test_utils=("test_schema", "test_faketensor"))


def test_cpu_isa_follows_the_baseline_switch() -> None:
    # Only COMPRESSM_CPU_BASELINE=1 forces the baseline loops ("0" does not); the choice is made once per process.
    def isa_with(value: str) -> str:
        code = "from compressm_kernels.ops.selective_scan import cpu; print(cpu.load_extension('_C')[0].cpu_isa())"
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "COMPRESSM_CPU_BASELINE": value},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.strip()

    forced = os.environ.get("COMPRESSM_CPU_BASELINE") == "1"
    here = cpu.load_extension("_C")[0].cpu_isa()
    assert isa_with("1") == "baseline"
    natural = isa_with("0")
    assert natural in ("avx2+fma", "baseline")
    assert here == ("baseline" if forced else natural)


def test_baseline_loops_pass_the_cpu_kernel_tests() -> None:
    # A wheel runs the baseline x86-64 loops on CPUs without AVX2+FMA. Where those exist, COMPRESSM_CPU_BASELINE
    # forces the baseline loops (the choice is made once per process): this file, the decode step's and the conv's
    # tests run again that way in a child process, which also checks that the switch took.
    if os.environ.get("COMPRESSM_CPU_BASELINE") == "1":
        pytest.skip("this process already runs the baseline loops")
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_cpu_scan.py"),
         str(tests / "test_cpu_state_update.py"), str(tests / "test_cpu_conv1d.py")],
        env={**os.environ, "COMPRESSM_CPU_BASELINE": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
