"""``mamba_inner_fn(checkpoint_lvl=1)``: backward recomputes conv1d → x_proj → dt_proj but
never re-runs the scan's forward kernel, keeps none of the activations it recomputes, and gives exactly
``checkpoint_lvl=0``'s output and gradients; both equal a plain composition of the definition."""

from __future__ import annotations

import gc
import inspect
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from compressm_kernels import selective_scan_ref
from compressm_kernels.ops.mamba_inner import mamba_inner_fn
from compressm_kernels.ops.selective_scan import cpu as cpu_backend
from compressm_kernels.ops.selective_scan import triton as triton_backend
from compressm_kernels.ops.selective_scan.inputs import check_scan_inputs
from scan_cases import assert_close

F32 = torch.float32
BATCH, DIM, SEQLEN, DSTATE, RANK, WIDTH, D_MODEL = 2, 8, 37, 13, 3, 4, 5


def make_args(extras: bool = False, batch: int = BATCH, seqlen: int = SEQLEN, dstate: int = DSTATE
              ) -> dict[str, Tensor | None]:
    """``mamba_inner_fn`` tensors, every one a leaf requiring grad; ``extras`` adds the optional biases and
    RMSNorm weights so that their gradients are compared too."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_(True)

    args = {
        "xz": randn(batch, 2 * DIM, seqlen),
        "conv1d_weight": randn(DIM, 1, WIDTH, scale=0.5),
        "conv1d_bias": randn(DIM, scale=0.1),
        "x_proj_weight": randn(RANK + 2 * dstate, DIM, scale=0.3),
        "delta_proj_weight": randn(DIM, RANK, scale=0.5),
        "out_proj_weight": randn(D_MODEL, DIM, scale=0.3),
        "out_proj_bias": randn(D_MODEL, scale=0.1) if extras else None,
        "A": (-torch.exp(0.5 * torch.randn(DIM, dstate, generator=gen))).requires_grad_(True),
        "D": randn(DIM),
        "delta_bias": randn(DIM, scale=0.5),
    }
    if extras:
        args |= {"B_proj_bias": randn(dstate, scale=0.1), "C_proj_bias": randn(dstate, scale=0.1),
                 "b_rms_weight": randn(dstate), "c_rms_weight": randn(dstate), "dt_rms_weight": randn(DIM)}
    return args


def make_mask(kind: str) -> Tensor | None:
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(7)
    if kind == "shared":
        return torch.rand(DSTATE, generator=gen) < 0.6
    mask = torch.rand(DIM, DSTATE, generator=gen) < 0.6
    mask[0] = False  # a channel with no state left
    return mask


def out_and_grads(args: dict[str, Tensor | None], **kw) -> dict[str, Tensor]:
    leaves = {k: v for k, v in args.items() if v is not None}
    out = mamba_inner_fn(**args, **kw)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()))
    return {"out": out.detach(), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


@pytest.mark.parametrize(("name", "value", "match"), [
    ("conv1d_weight", torch.zeros(DIM, 2, WIDTH), r"conv1d_weight must have shape \(D, 1, W\) or \(D, W\)"),
    ("conv1d_bias", torch.zeros(DIM + 1), r"conv1d_bias must have shape \(D,\) = \(8,\)"),
    ("out_proj_bias", torch.zeros(D_MODEL, 1), r"out_proj_bias must have shape \(d_model,\) = \(5,\)"),
    ("B_proj_bias", torch.zeros(DSTATE - 1), r"B_proj_bias must have shape \(N,\) = \(13,\)"),
    ("C_proj_bias", torch.zeros(1), r"C_proj_bias must have shape \(N,\) = \(13,\)"),
], ids=lambda v: v if isinstance(v, str) and "(" not in v else None)
def test_bad_weights_and_biases_are_named(name: str, value: Tensor, match: str) -> None:
    # A (D, 2, W) conv weight has D·2W elements, which used to pass as a wider conv; a wrong-shaped bias used
    # to fail in a broadcast, without its name.
    with pytest.raises(ValueError, match=match):
        mamba_inner_fn(**(make_args(extras=True) | {name: value}))


@pytest.mark.parametrize("mask", ["none", "shared", "per-channel"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "biases+rms"])
def test_checkpoint_levels_agree(extras: bool, mask: str) -> None:
    _assert_levels_agree(make_args(extras=extras), state_mask=make_mask(mask), backend="cpu")


def test_checkpoint_levels_agree_on_the_reference_backend() -> None:
    """No custom op there, so checkpoint_lvl=1 recomputes the whole segment, scan included."""
    _assert_levels_agree(make_args(extras=True), state_mask=make_mask("per-channel"), backend="reference")


def _assert_levels_agree(args: dict[str, Tensor | None], **kw) -> None:
    kept = out_and_grads(args, checkpoint_lvl=0, **kw)
    recomputed = out_and_grads(args, checkpoint_lvl=1, **kw)
    assert len(kept) == 1 + sum(t is not None for t in args.values())  # the output, one gradient per tensor
    for name in kept:
        assert_close(recomputed[name], kept[name], F32, name)


def _rms(t: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return t * (t.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def _by_definition(*, xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor, x_proj_weight: Tensor,
                   delta_proj_weight: Tensor, out_proj_weight: Tensor, A: Tensor, D: Tensor, delta_bias: Tensor,
                   out_proj_bias: Tensor | None = None, B_proj_bias: Tensor | None = None,
                   C_proj_bias: Tensor | None = None, b_rms_weight: Tensor | None = None,
                   c_rms_weight: Tensor | None = None, dt_rms_weight: Tensor | None = None,
                   state_mask: Tensor | None = None) -> Tensor:
    """The inner path written out in the (Bt, L, features) layout of nn.Linear, with the reference scan."""
    x, z = xz.chunk(2, dim=1)
    u = F.silu(F.conv1d(F.pad(x, (WIDTH - 1, 0)), conv1d_weight, conv1d_bias, groups=DIM))  # (Bt, D, L)
    x_dbl = u.transpose(1, 2) @ x_proj_weight.T  # (Bt, L, R + 2N)
    dt, B, C = x_dbl.split([RANK, DSTATE, DSTATE], dim=-1)
    delta = dt @ delta_proj_weight.T  # (Bt, L, D)
    if B_proj_bias is not None:
        B, C = B + B_proj_bias, C + C_proj_bias
    if b_rms_weight is not None:
        delta, B, C = _rms(delta, dt_rms_weight), _rms(B, b_rms_weight), _rms(C, c_rms_weight)
    y = selective_scan_ref(u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z, delta_bias,
                           delta_softplus=True, state_mask=state_mask)
    out = y.transpose(1, 2) @ out_proj_weight.T
    return out if out_proj_bias is None else out + out_proj_bias


@pytest.mark.parametrize(("extras", "mask"), [(False, "none"), (True, "per-channel")])
def test_matches_the_definition(extras: bool, mask: str) -> None:
    args, state_mask = make_args(extras=extras), make_mask(mask)
    ours = out_and_grads(args, checkpoint_lvl=1, state_mask=state_mask, backend="cpu")
    leaves = {k: v for k, v in args.items() if v is not None}
    out = _by_definition(**leaves, state_mask=state_mask)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()))
    expected = {"out": out, **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}
    assert ours.keys() == expected.keys()
    for name in expected:
        assert_close(ours[name], expected[name], F32, name)


class _CountScanKernels(TorchDispatchMode):
    """Counts the CPU scan's forward and backward kernel calls (ops that reach the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"fwd": 0, "bwd": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for kind in self.calls:
            self.calls[kind] += func.name() == f"compressm::selective_scan_{kind}_cpu"
        return func(*args, **(kwargs or {}))


def _triton_runs_here() -> bool:
    probe = check_scan_inputs(*(torch.ones(1, 1, 1),) * 2, -torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    return triton_backend.unavailable_reason(probe) is None


@pytest.mark.parametrize("mask", ["none", "per-channel"])
@pytest.mark.parametrize("lvl", [0, 1])
def test_scan_forward_runs_once_per_step(lvl: int, mask: str) -> None:
    with _CountScanKernels() as counter:
        out_and_grads(make_args(), checkpoint_lvl=lvl, state_mask=make_mask(mask), backend="cpu")
    assert counter.calls == {"fwd": 1, "bwd": 1}


@pytest.mark.skipif(not _triton_runs_here(), reason="the triton backend cannot run CPU tensors here "
                    "(triton not importable, or imported without TRITON_INTERPRET=1)")
def test_triton_scan_forward_runs_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"fwd": 0, "bwd": 0}

    def counted(name: str, launch):
        def run(*args):
            calls[name] += 1
            return launch(*args)
        return run

    monkeypatch.setattr(triton_backend, "_launch_fwd", counted("fwd", triton_backend._launch_fwd))
    monkeypatch.setattr(triton_backend, "_launch_bwd", counted("bwd", triton_backend._launch_bwd))
    # Tiny sizes and one tile per batch row: the Triton interpreter is slow.
    args = make_args(batch=1, seqlen=6, dstate=3)
    with triton_backend.forced_config(triton_backend.LaunchConfig(block_d=DIM, chunk=16)):
        recomputed = out_and_grads(args, checkpoint_lvl=1, backend="triton")
        assert calls == {"fwd": 1, "bwd": 1}
        kept = out_and_grads(args, checkpoint_lvl=0, backend="triton")
    for name in kept:
        assert_close(recomputed[name], kept[name], F32, name)


class _RecordStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes, and which ones the scan kernel made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref] = []
        self.scan_outputs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, Tensor)]
        refs = [weakref.ref(t.untyped_storage()) for t in tensors]
        self.made += refs
        if func.name() == "compressm::selective_scan_fwd_cpu":
            self.scan_outputs += refs
        return out


@pytest.mark.parametrize("lvl", [0, 1])
def test_only_the_scan_outputs_outlive_the_forward(lvl: int) -> None:
    """Between forward and backward the storages made in forward that are still alive (kept by autograd or
    by the checkpoint) are, at checkpoint_lvl=1, exactly the scan kernel's outputs: the gated output
    ``(Bt, D, L)`` and the fp32 chunk carries. The conv output, delta and x_proj's output are all freed. At
    checkpoint_lvl=0 they are kept (which shows that the probe sees them); out_proj reads the scan output in place,
    so it keeps no copy of its own either way."""
    args = make_args()
    inputs = {id(t.untyped_storage()) for t in args.values() if t is not None}
    record = _RecordStorages()
    with record:
        out = mamba_inner_fn(**args, checkpoint_lvl=lvl, backend="cpu")
    gc.collect()
    alive = {id(s): s for ref in record.made if (s := ref()) is not None}
    kept = {k: s for k, s in alive.items() if k not in inputs and k != id(out.untyped_storage())}
    scan_outputs = {id(s) for ref in record.scan_outputs if (s := ref()) is not None}
    if lvl == 1:
        assert len(scan_outputs) == 2
        assert set(kept) == scan_outputs, sorted(s.nbytes() for s in kept.values())
    else:  # u, delta and more
        activation = BATCH * DIM * SEQLEN * 4
        assert sum(s.nbytes() >= activation for k, s in kept.items() if k not in scan_outputs) >= 3
    out.sum().backward()  # the graph is intact: backward still runs
    assert args["xz"].grad is not None


@pytest.mark.skipif("respect_saved_tensors_hooks" not in inspect.signature(checkpoint).parameters,
                    reason="this torch's selective checkpointing keeps its tensors outside saved-tensors hooks")
def test_kept_scan_outputs_go_through_saved_tensors_hooks() -> None:
    """Hooks such as ``save_on_cpu`` see every tensor kept for backward: xz and the weights, and the two scan
    outputs that selective checkpointing keeps, and nothing else; no warning about the hooks."""
    args = make_args(extras=True)
    packed: list[Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = mamba_inner_fn(**args, checkpoint_lvl=1, backend="cpu")
    inputs = [t for t in args.values() if t is not None]
    others = [tuple(t.shape) for t in packed if not any(t is i for i in inputs)]
    n_chunks = -(-SEQLEN // cpu_backend.chunk_size(DSTATE))
    assert sorted(others) == [(BATCH, DIM, n_chunks, DSTATE), (BATCH, DIM, SEQLEN)]
    out.sum().backward()
    assert all(t.grad is not None for t in inputs)
