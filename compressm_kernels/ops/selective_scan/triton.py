"""The ``triton`` backend: host launchers, ``torch.library`` custom ops and the autograd Function.

Layering: ``triton_kernels.py`` (the two kernels) -> ``_launch_fwd``/``_launch_bwd`` (allocate, grid,
launch) -> custom ops ``compressm::selective_scan_fwd_triton`` / ``..._bwd_triton`` (with fake
implementations, so ``torch.compile`` traces through them) -> ``_TritonScan`` (autograd) -> ``scan``
(the dispatcher's backend protocol).

The decode step (``state_update``) has its own launcher and custom op
``compressm::selective_state_update_triton``.

Eligible on CUDA tensors when triton imports, and on CPU tensors only under ``TRITON_INTERPRET=1``
(set before triton is imported; correct but very slow, for tests). float64 is not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ... import env
from .inputs import ScanInputs
from .masks import mask_to_ranks

try:
    from . import triton_kernels as _kernels

    _IMPORT_ERROR = None
except ImportError as err:  # triton missing or broken: the backend reports why at call time
    _kernels = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

# Mask modes of the kernels: none, one (N,) mask for all channels, a (D, N) mask per channel.
NO_MASK, SHARED_MASK, PER_CHANNEL_MASK = 0, 1, 2


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes: ``block_d`` channels per program, ``chunk`` steps per scan (both powers of two).

    The default keeps 4 elements of each (block_d, chunk) tile per thread: compiled for sm_90 (ptxas,
    triton 3.8) it needs 91-95 registers forward and 147-168 backward at N = 16-256, with no spills but
    8 bytes in the backward at N = 64; block_d=4 spilled in the backward. Not yet tuned on a GPU:
    ``python -m bench scan --triton-config`` sweeps it."""

    block_d: int = 2
    chunk: int = 256
    fwd_warps: int = 4
    bwd_warps: int = 4


_forced: LaunchConfig | None = None


@contextlib.contextmanager
def forced_config(config: LaunchConfig) -> Iterator[None]:
    """Use ``config`` for every launch inside the block (tests force several chunks at small L; the
    benchmark sweeps tile sizes). ``block_d`` is still lowered to divide the group size."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def launch_config(dim: int, seqlen: int, group_size: int) -> LaunchConfig:
    """The tile sizes for these sizes (a heuristic; only powers of two, so few compiled variants).
    ``group_size``: a tile must divide it (the gcd of B's and C's channels per group; ``dim`` if ungrouped)."""
    cfg = _forced or LaunchConfig(chunk=min(256, max(16, 1 << (seqlen - 1).bit_length())))
    # A channel tile must sit inside one group of B and of C, so a row of B/C serves the whole tile.
    block_d = _pow2_divisor(group_size, cfg.block_d) if group_size < dim else cfg.block_d
    return LaunchConfig(block_d, cfg.chunk, cfg.fwd_warps, cfg.bwd_warps)


def _unavailable_reason(device: torch.device, tensors: Iterable[Tensor]) -> str | None:
    if _kernels is None:
        return f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton`"
    if device.type == "cpu":
        if not _kernels.INTERPRETED:
            return ("Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before "
                    "triton is imported (slow; meant for tests)")
    elif device.type != "cuda":
        return f"Triton kernels need CUDA tensors, got {device.type}"
    elif _kernels.INTERPRETED or env.triton_interpret():
        return "TRITON_INTERPRET=1 is set, so Triton cannot run CUDA tensors; unset it"
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 is not supported by the Triton kernels; use backend='reference'"
    return None


def unavailable_reason(x: ScanInputs) -> str | None:
    """Why the Triton kernels cannot run ``x`` (``None`` if they can)."""
    return _unavailable_reason(x.device, x.tensors())


def state_update_unavailable_reason(tensors: dict[str, Tensor | None]) -> str | None:
    """Why the Triton decode step cannot run these ``selective_state_update`` arguments (``None`` if it can)."""
    return _unavailable_reason(tensors["state"].device, [t for t in tensors.values() if t is not None])


# ---------------------------------------------------------------------------------------------------
# Launchers


def _bc_strides(t: Tensor) -> tuple[Tensor, tuple[int, int, int], bool]:
    """B/C as the kernel reads it: variable (Bt, G, N, L) with strides (batch, group, state), or
    time-invariant (D, N) with strides (0, channel, state)."""
    if t.dim() == 2:
        return t, (0, t.stride(0), t.stride(1)), False
    if t.dim() == 3:
        t = t.unsqueeze(1)
    return t, (t.stride(0), t.stride(1), t.stride(2)), True


def _groups(t: Tensor) -> int:
    """Groups of a B/C as the kernel reads it (1 for variable and time-invariant)."""
    return t.shape[1] if t.dim() == 4 else 1


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_fwd(u, delta, A, B, C, D, z, delta_bias, kept, ranks, delta_softplus: bool, mask_mode: int,
                save: bool, block_d: int, chunk: int, warps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_chunks = _cdiv(seqlen, chunk)
    Bk, sb, b_var = _bc_strides(B)
    Ck, sc, c_var = _bc_strides(C)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    y = torch.empty_like(out) if (save and z is not None) else _empty(u)
    carries = u.new_empty(batch, dim, n_chunks, dstate, dtype=torch.float32) if save else _empty(u)
    last = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    grid = (_cdiv(dim, block_d), batch)
    _kernels.scan_fwd_kernel[grid](
        u, delta, A, Bk, Ck, D, z, delta_bias, kept, ranks,
        out, y if y.numel() else None, carries if save else None, last,
        dstate, seqlen, dim, dim // _groups(B), dim // _groups(C), n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *zs, A.stride(0), A.stride(1), *sb, *sc,
        SOFTPLUS=delta_softplus, MASK_MODE=mask_mode, B_VAR=b_var, C_VAR=c_var,
        STORE_Y=bool(y.numel()), STORE_CARRIES=save, BLOCK_D=block_d, CHUNK=chunk, num_warps=warps,
    )
    return out, y, carries, last


def _launch_bwd(u, delta, A, B, C, D, z, delta_bias, kept, ranks, dout, y, carries, dlast,
                delta_softplus: bool, mask_mode: int, block_d: int, chunk: int, warps: int) -> list[Tensor]:
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    n_chunks = carries.shape[2]
    Bk, sb, b_var = _bc_strides(B)
    Ck, sc, c_var = _bc_strides(C)
    f32 = {"dtype": torch.float32, "device": u.device}
    # Cotangents may be broadcast views (the gradient of a .sum() has stride 0); the kernel indexes densely.
    dout = dout.contiguous()
    dlast = dlast.contiguous() if dlast is not None else None
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
    dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
    dA = torch.empty(batch, dim, dstate, **f32)

    def grad_bc(var: bool, t: Tensor) -> Tensor:
        # Variable: atomically accumulated over channel tiles. Time-invariant: per-batch partials.
        return torch.zeros(t.shape, **f32) if var else torch.empty(batch, dim, dstate, **f32)

    dB, dC = grad_bc(b_var, Bk), grad_bc(c_var, Ck)
    dD = torch.empty(batch, dim, **f32) if D is not None else None
    dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    grid = (_cdiv(dim, block_d), batch)
    _kernels.scan_bwd_kernel[grid](
        u, delta, A, Bk, Ck, D, z, delta_bias, kept, ranks,
        dout, y if z is not None else None, carries, dlast,
        du, ddelta, dz, dA, dB, dC, dD, dbias,
        dstate, seqlen, dim, dim // _groups(B), dim // _groups(C), n_chunks, _groups(B), _groups(C),
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *zs, A.stride(0), A.stride(1), *sb, *sc,
        SOFTPLUS=delta_softplus, MASK_MODE=mask_mode, B_VAR=b_var, C_VAR=c_var,
        BLOCK_D=block_d, CHUNK=chunk, num_warps=warps,
    )

    def finish_bc(var: bool, g: Tensor, like: Tensor) -> Tensor:
        return (g.view(like.shape) if var else g.sum(0)).to(like.dtype)

    return [
        du, ddelta, dA.sum(0).to(A.dtype), finish_bc(b_var, dB, B), finish_bc(c_var, dC, C),
        dD.sum(0).to(D.dtype) if D is not None else _empty(u),
        dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else _empty(u),
        dz if dz is not None else _empty(u),
    ]


# ---------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, described to it by their fake implementations.


@torch.library.custom_op("compressm::selective_scan_fwd_triton", mutates_args=())
def selective_scan_fwd_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, kept: Tensor | None, ranks: Tensor | None, delta_softplus: bool, mask_mode: int,
    save: bool, block_d: int, chunk: int, warps: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward scan -> ``(out, y before the z gate or empty, chunk carries or empty, last_state)``."""
    return _launch_fwd(u, delta, A, B, C, D, z, delta_bias, kept, ranks, delta_softplus, mask_mode, save,
                       block_d, chunk, warps)


@selective_scan_fwd_triton.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, kept, ranks, delta_softplus, mask_mode, save, block_d, chunk, warps):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    y = torch.empty_like(out) if (save and z is not None) else _empty(u)
    n_chunks = _cdiv(seqlen, chunk)
    carries = u.new_empty(batch, dim, n_chunks, dstate, dtype=torch.float32) if save else _empty(u)
    return out, y, carries, u.new_empty(batch, dim, dstate, dtype=torch.float32)


@torch.library.custom_op("compressm::selective_scan_bwd_triton", mutates_args=())
def selective_scan_bwd_triton(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, kept: Tensor | None, ranks: Tensor | None, dout: Tensor, y: Tensor,
    carries: Tensor, dlast: Tensor | None, delta_softplus: bool, mask_mode: int, block_d: int, chunk: int,
    warps: int,
) -> list[Tensor]:
    """Backward scan -> ``[du, ddelta, dA, dB, dC, dD, ddelta_bias, dz]`` (empty where absent)."""
    return _launch_bwd(u, delta, A, B, C, D, z, delta_bias, kept, ranks, dout, y, carries, dlast,
                       delta_softplus, mask_mode, block_d, chunk, warps)


@selective_scan_bwd_triton.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, kept, ranks, dout, y, carries, dlast, delta_softplus, mask_mode,
      block_d, chunk, warps):
    like = torch.empty_like
    fmt = torch.contiguous_format
    return [
        like(u, memory_format=fmt), like(delta, memory_format=fmt), like(A), like(B), like(C),
        like(D) if D is not None else _empty(u), like(delta_bias) if delta_bias is not None else _empty(u),
        like(z, memory_format=fmt) if z is not None else _empty(u),
    ]


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, kept, ranks, delta_softplus, mask_mode, save, cfg):
        out, y, carries, last = torch.ops.compressm.selective_scan_fwd_triton(
            u, delta, A, B, C, D, z, delta_bias, kept, ranks, delta_softplus, mask_mode, save,
            cfg.block_d, cfg.chunk, cfg.fwd_warps)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, kept, ranks, y, carries)
        ctx.config = (delta_softplus, mask_mode, cfg)
        ctx.set_materialize_grads(False)  # an unused last_state sends None, not a zero tensor to gather
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, kept, ranks, y, carries = ctx.saved_tensors
        if dout is None:  # only last_state was used
            dout = torch.zeros_like(u)
        delta_softplus, mask_mode, cfg = ctx.config
        grads = torch.ops.compressm.selective_scan_bwd_triton(
            u, delta, A, B, C, D, z, delta_bias, kept, ranks, dout, y, carries, dlast, delta_softplus, mask_mode,
            cfg.block_d, cfg.chunk, cfg.bwd_warps)
        du, ddelta, dA, dB, dC, dD, dbias, dz = grads
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dbias if delta_bias is not None else None, None, None, None, None, None, None)


def _mask_tables(x: ScanInputs) -> tuple[int, Tensor | None, Tensor | None]:
    """Mask mode, kept-state indices (int32) and ranks (int32) for the kernels."""
    mask = x.state_mask
    if mask is None:
        return NO_MASK, None, None
    if mask.dim() == 1:
        ranks, kept = mask_to_ranks(mask[None], 1)
        return SHARED_MASK, kept, ranks
    ranks, kept = mask_to_ranks(mask, x.dim)
    return PER_CHANNEL_MASK, kept, ranks


def scan(x: ScanInputs) -> tuple[Tensor, Tensor | None]:
    """Backend protocol: the Triton scan on validated inputs -> ``(out, last_state or None)``."""
    mode, kept, ranks = _mask_tables(x)
    cfg = launch_config(x.dim, x.seqlen, math.gcd(x.dim // _groups(x.B), x.dim // _groups(x.C)))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in x.tensors())
    out, last = _TritonScan.apply(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, kept, ranks,
                                  x.delta_softplus, mode, save, cfg)
    return out, (last if x.return_last_state else None)


# ---------------------------------------------------------------------------------------------------
# The decode step


def step_config(dim: int, dstate: int) -> tuple[int, int]:
    """``(BLOCK_D, num_warps)`` of the decode step: a (BLOCK_D, BLOCK_N) state tile of four fp32 values per thread
    (mamba_ssm's step uses the same tiles; ptxas for sm_90: 32-48 registers, no spills). Not yet tuned on a GPU
    (``python -m bench decode --device cuda`` times it against mamba_ssm's Triton step)."""
    block_n = 1 << (dstate - 1).bit_length()  # the kernel's BLOCK_N
    warps = 4 if block_n <= 128 else 8
    return min(1 << (dim - 1).bit_length(), max(1, 128 * warps // block_n)), warps


def _bc_step(t: Tensor) -> tuple[int, tuple[int, int, int]]:
    """Channels per group and (batch, group, state) strides of a decode step's B/C, ``(Bt, N)`` or ``(Bt, G, N)``."""
    if t.dim() == 2:
        return 0, (t.stride(0), 0, t.stride(1))
    return t.shape[1], (t.stride(0), t.stride(1), t.stride(2))


def _launch_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         z: Tensor | None, dt_bias: Tensor | None, state_mask: Tensor | None,
                         dt_softplus: bool) -> Tensor:
    batch, dim, dstate = state.shape
    out = x.new_empty(batch, dim)
    if out.numel() == 0:  # an empty grid is not launched
        return out
    groups_b, s_b = _bc_step(B)
    groups_c, s_c = _bc_step(C)
    mask_strides = (0, 0)
    if state_mask is not None:
        mask_strides = (0, state_mask.stride(0)) if state_mask.dim() == 1 else state_mask.stride()
    block_d, warps = step_config(dim, dstate)
    _kernels.state_update_kernel[(_cdiv(dim, block_d), batch)](
        state, x, dt, A, B, C, D, z, dt_bias, state_mask, out,
        dim, dstate, dim // groups_b if groups_b else dim, dim // groups_c if groups_c else dim,
        *state.stride(), *x.stride(), *dt.stride(), *(z.stride() if z is not None else (0, 0)), *A.stride(),
        *s_b, *s_c, *mask_strides,
        SOFTPLUS=dt_softplus, BLOCK_D=block_d, num_warps=warps,
    )
    return out


@torch.library.custom_op("compressm::selective_state_update_triton", mutates_args=("state",))
def selective_state_update_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    state_mask: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """The decode step: ``state`` advanced in place, returns the ``(Bt, D)`` output in x's dtype."""
    return _launch_state_update(state, x, dt, A, B, C, D, z, dt_bias, state_mask, dt_softplus)


@selective_state_update_triton.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, state_mask, dt_softplus):
    return x.new_empty(state.shape[0], state.shape[1])


def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, state_mask: Tensor | None) -> Tensor:
    """The Triton decode step on validated inputs (``state`` updated in place)."""
    args = (state, x, dt, A, B, C, D, z, dt_bias, state_mask, bool(dt_softplus))
    if torch.compiler.is_compiling():
        return selective_state_update_triton(*args)
    return _launch_state_update(*args)  # eager: the custom-op wrapper would cost more than the step
