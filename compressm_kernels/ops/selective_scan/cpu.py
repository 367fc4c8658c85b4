"""The C++ CPU backend (``compressm_kernels._C``): selective scan forward/backward and the decode step.

The kernels are ``torch.library`` ops (``compressm::selective_scan_fwd_cpu`` and ``_bwd_cpu``, whose kernels the
extension registers, and the custom op ``compressm::selective_state_update_cpu``) with fake implementations, so
``torch.compile`` traces through them; an ``autograd.Function`` pairs forward and backward. The forward saves
only the state at each chunk end, ``(Bt, D, n_chunks, N)`` fp32, and the backward recomputes inside each chunk
from it: memory O(Bt·D·(L + N)).

State masks: a shared ``(N,)`` mask compacts A/B/C to the kept states before the kernel (a smaller N;
autograd scatters the gradients back, zero for dropped states); a per-channel ``(D, N)`` mask becomes
per-channel ranks and kept indices (:func:`mask_to_ranks`), so the kernel's state loop visits kept
states only.
"""

import torch
from torch import Tensor

from ..._extensions import define_ops, extension_unavailable_reason, load_extension, require_extension
from .inputs import ScanInputs
from .masks import compact_scan_args, kept_states, mask_to_ranks

# Steps per chunk. Up to 32 states: as many as keep the states the backward recomputes for a chunk (steps × N padded
# to 8, fp32) within 64 KB, at most the kernel's kMaxChunk. Each chunk boundary restarts a channel's loops: against
# 256-step chunks the backward runs 11-17 % faster at N = 2-3, 5-9 % at N = 8, 2-6 % at N = 16-32. More states:
# 256 steps (N = 40-64 ran 2-3 % slower in longer chunks), and at least N, so that the saved carries (n_chunks·N
# per channel) stay within L + N.
CHUNK, MAX_CHUNK, CHUNK_BYTES = 256, 1024, 64 * 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    return require_extension("_C")


def chunk_size(dstate: int) -> int:
    padded = (dstate + 7) // 8 * 8
    if padded > 32:
        return max(CHUNK, dstate)
    return min(MAX_CHUNK, CHUNK_BYTES // (4 * padded) // 8 * 8)


# ------------------------------------------------------------------------------------------------- ops


# The scan's CPU kernels, registered by the extension (bindings.cpp), which this loads now (for torch.compile: see
# _extensions.extension_unavailable_reason). The decode step's op keeps a Python kernel: eager decoding calls the
# extension directly, and only torch.compile's graphs call the op.
_lib = define_ops("_C", "CPU", [
    "selective_scan_fwd_cpu(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, Tensor? ranks, Tensor? kept, bool delta_softplus, int chunk) -> (Tensor, Tensor)",
    "selective_scan_bwd_cpu(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, Tensor? ranks, Tensor? kept, bool delta_softplus, int chunk, Tensor carries, Tensor dout, "
    "Tensor? dlast) -> Tensor[]",
])
# (out (Bt, D, L) in u's dtype, carries (Bt, D, n_chunks, N) fp32): h at the end of each chunk.
selective_scan_fwd_cpu = torch.ops.compressm.selective_scan_fwd_cpu.default
# [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias], each in its input's dtype (0-element when the input is absent);
# invariant B/C and A, D, delta_bias get fp32 gradients.
selective_scan_bwd_cpu = torch.ops.compressm.selective_scan_bwd_cpu.default


@torch.library.register_fake("compressm::selective_scan_fwd_cpu", lib=_lib)
def _(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk):
    batch, dim, seqlen = u.shape
    n_chunks = (seqlen + chunk - 1) // chunk
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(
        (batch, dim, n_chunks, A.shape[1]), dtype=torch.float32
    )


@torch.library.register_fake("compressm::selective_scan_bwd_cpu", lib=_lib)
def _(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk, carries, dout, dlast):
    dim, dstate = A.shape
    f32 = {"dtype": torch.float32}

    def like(t: Tensor) -> Tensor:
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    def bc(t: Tensor) -> Tensor:
        return u.new_empty((dim, dstate), **f32) if t.dim() == 2 else like(t)

    return [
        like(u),
        like(delta),
        u.new_empty((dim, dstate), **f32),
        bc(B),
        bc(C),
        u.new_empty((dim if D is not None else 0,), **f32),
        like(z) if z is not None else u.new_empty((0,)),
        u.new_empty((dim if delta_bias is not None else 0,), **f32),
    ]


@torch.library.custom_op("compressm::selective_state_update_cpu", mutates_args=("state",))
def selective_state_update_cpu(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    ranks: Tensor | None,
    kept: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """One decode step: ``state`` updated in place, returns ``(Bt, D)`` in x's dtype."""
    return _ext().state_update(state, x, dt, A, B, C, D, z, dt_bias, ranks, kept, dt_softplus)


@selective_state_update_cpu.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, ranks, kept, dt_softplus):
    return x.new_empty(x.shape)


# -------------------------------------------------------------------------------------------- autograd


class SelectiveScanCPU(torch.autograd.Function):
    """The C++ scan with its C++ backward; returns ``(out, last_state)``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk):
        out, carries = selective_scan_fwd_cpu(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries)
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.set_materialize_grads(False)
        return out, carries[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        if dlast is not None:
            dlast = dlast.float().contiguous()
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = selective_scan_bwd_cpu(
            u, delta, A, B, C, D, z, delta_bias, ranks, kept, ctx.delta_softplus, ctx.chunk, carries, dout, dlast
        )
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                ddelta_bias if delta_bias is not None else None, None, None, None, None)


# ----------------------------------------------------------------------------------- backend protocol


def unavailable_reason(x: ScanInputs) -> str | None:
    """Why the C++ CPU kernels cannot run ``x`` (``None`` if they can)."""
    if x.device.type != "cpu":
        return f"the 'cpu' backend runs CPU tensors; these are on {x.device}"
    for t in x.tensors():
        if t.dtype == torch.float64:
            return "float64 inputs: the C++ CPU kernels compute in float32; use backend='reference'"
    return extension_unavailable_reason("_C")


def scan(x: ScanInputs) -> tuple[Tensor, Tensor | None]:
    """Run validated inputs through the C++ kernels: ``(out, last_state or None)`` (differentiable)."""
    A, B, C = x.A, x.B, x.C
    ranks = kept = keep = None
    if x.state_mask is not None and x.state_mask.dim() == 1:
        keep = kept_states(x.state_mask)
        A, B, C = compact_scan_args(A, B, C, x.state_mask)
    elif x.state_mask is not None:
        ranks, kept = mask_to_ranks(x.state_mask, x.dim)
    # The kernel reads time-invariant B/C in fp32 (the cast's backward returns their dtype's gradient).
    B = B.float() if B.dim() == 2 else B
    C = C.float() if C.dim() == 2 else C
    out, last = SelectiveScanCPU.apply(x.u, x.delta, A, B, C, x.D, x.z, x.delta_bias, ranks, kept, x.delta_softplus,
                                       chunk_size(A.shape[1]))
    if not x.return_last_state:
        return out, None
    if keep is not None:  # back to the full state size; dropped states are exactly 0
        last = last.new_zeros(x.batch, x.dim, x.dstate).index_copy(2, keep, last)
    return out, last


def state_update_unavailable_reason(tensors: dict[str, Tensor | None]) -> str | None:
    """Why the C++ decode step cannot run these ``selective_state_update`` arguments (``None`` if it can)."""
    state = tensors["state"]
    if state.device.type != "cpu":
        return f"the 'cpu' decode step runs CPU tensors; these are on {state.device}"
    for name, t in tensors.items():
        if t is None:
            continue
        allowed = (torch.float32,) if name == "A" else _DTYPES
        if t.dtype not in allowed:
            names = "/".join(str(d).replace("torch.", "") for d in allowed)
            return f"{name} is {str(t.dtype).replace('torch.', '')}; the C++ decode step takes {names}"
    return extension_unavailable_reason("_C")


def try_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                     z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
                     multi_head: bool = False) -> Tensor | None:
    """The eager C++ decode step without a mask, or ``None`` if the extension is missing, torch.compile is
    tracing, or the kernel refuses the inputs. The kernel checks every shape, dtype and device before it
    writes the state, so a refusal has changed nothing; the caller then runs the full checks. ``multi_head``:
    Mamba-2's ``(Bt, H, P, N)`` step instead of the ``(Bt, D, N)`` one."""
    if torch.compiler.is_compiling():
        return None
    module = load_extension("_C")[0]
    if module is None:
        return None
    try:
        softplus = bool(dt_softplus)
        if multi_head:
            return module.state_update_heads(state, x, dt, A, B, C, D, z, dt_bias, softplus)
        return module.state_update(state, x, dt, A, B, C, D, z, dt_bias, None, None, softplus)
    except (TypeError, ValueError, RuntimeError):
        return None


def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool, state_mask: Tensor | None) -> Tensor:
    """The C++ decode step on validated inputs (``state`` updated in place)."""
    ranks = kept = None
    if state_mask is not None:
        ranks, kept = mask_to_ranks(state_mask, state.shape[1])
    args = (state, x, dt, A, B, C, D, z, dt_bias, ranks, kept, dt_softplus)
    if torch.compiler.is_compiling():
        return selective_state_update_cpu(*args)
    # Eager: call the extension directly; the custom-op wrapper costs more (~0.15 ms) than a whole step.
    return _ext().state_update(*args)
