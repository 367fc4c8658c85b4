"""CUDA backend of the selective scan: our kernels in ``compressm_kernels._C_cuda``.

Layers, top-down: ``scan`` (backend protocol, mask -> ranks once) -> ``SelectiveScanCuda``
(autograd) -> ``torch.ops.compressm.selective_scan_{fwd,bwd}_cuda`` (custom ops with fake kernels,
so torch.compile traces them) -> the binding in csrc/cuda/selective_scan.cpp -> the kernels.

The forward saves only the fp32 carries ``(Bt, D, n_chunks, N)`` at the end of every
``CHUNK_SIZE`` steps; the backward recomputes the states inside each chunk. A state mask is turned
into per-channel ranks and kept-state indices outside the kernel, so channel d's state loop runs
``r_d`` iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._extensions import extension_unavailable_reason, require_extension
from .inputs import ScanInputs
from .masks import mask_to_ranks

# Time steps per chunk (one warp x 8 steps per lane); must equal _C_cuda.CHUNK_SIZE (a test checks).
CHUNK_SIZE = 256
MAX_BATCH = 65535  # the kernels put the batch on the grid's y axis
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
extension_unavailable_reason("_C_cuda")  # load now: torch.compile then reads the result (_extensions)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _extension():
    return require_extension("_C_cuda")


def unavailable_reason(x: ScanInputs) -> str | None:
    """Why the CUDA kernels cannot run ``x`` (``None`` if they can)."""
    if x.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got tensors on {x.device}"
    reason = extension_unavailable_reason("_C_cuda")
    if reason is not None:
        return reason
    if x.u.dtype not in KERNEL_DTYPES:
        return f"the cuda kernels take float32/float16/bfloat16 u, got {_dtype_name(x.u.dtype)}"
    for name in ("delta", "z", "B", "C"):
        t = getattr(x, name)
        if t is None:
            continue
        if t.dim() == 2 and t.dtype not in KERNEL_DTYPES:  # invariant B/C: upcast to fp32 exactly
            return f"the cuda kernels take float32/float16/bfloat16 {name}, got {_dtype_name(t.dtype)}"
        if t.dim() > 2 and t.dtype != x.u.dtype:
            return (f"the cuda kernels need {name} in u's dtype {_dtype_name(x.u.dtype)}, got "
                    f"{_dtype_name(t.dtype)}")
    for name in ("A", "D", "delta_bias"):
        t = getattr(x, name)
        if t is not None and t.dtype != torch.float32:
            return f"the cuda kernels need float32 {name}, got {_dtype_name(t.dtype)}"
    if x.batch > MAX_BATCH:
        return f"the cuda kernels support a batch of at most {MAX_BATCH}, got {x.batch}"
    return None


# ---------------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("compressm::selective_scan_fwd_cuda", mutates_args=())
def selective_scan_fwd_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    ranks: Tensor | None,
    kept: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """Forward kernel: ``out (Bt, D, L)`` in u's dtype and fp32 ``carries (Bt, D, n_chunks, N)``.

    ``ranks``/``kept`` (int32) are ``(1,)``/``(N,)`` for a shared mask or ``(D,)``/``(D, N)`` per
    channel, as :func:`mask_to_ranks` makes them; ``None`` keeps every state.
    """
    out, carries = _extension().fwd(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus)
    return out, carries


@selective_scan_fwd_cuda.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus):
    batch, dim, seqlen = u.shape
    n_chunks = -(-seqlen // CHUNK_SIZE)
    return torch.empty_like(u), u.new_empty((batch, dim, n_chunks, A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("compressm::selective_scan_bwd_cuda", mutates_args=())
def selective_scan_bwd_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    ranks: Tensor | None,
    kept: Tensor | None,
    carries: Tensor,
    dout: Tensor,
    dlast: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernel: ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``; dA/dB/dC/dD/ddelta_bias
    are fp32 (dB/dC with B/C's shapes); dD, dz, ddelta_bias are empty ``(0,)`` when D, z,
    delta_bias are absent (a custom op cannot return None)."""
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _extension().bwd(
        u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries, dout, dlast, delta_softplus
    )
    absent = u.new_empty(0, dtype=torch.float32)
    return (du, ddelta, dA, dB, dC, absent if dD is None else dD, u.new_empty(0) if dz is None else dz,
            absent.clone() if ddelta_bias is None else ddelta_bias)


@selective_scan_bwd_cuda.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries, dout, dlast, delta_softplus):
    f32 = torch.float32
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        A.new_empty(A.shape, dtype=f32),
        B.new_empty(B.shape, dtype=f32),
        C.new_empty(C.shape, dtype=f32),
        u.new_empty((u.shape[1],) if D is not None else (0,), dtype=f32),
        torch.empty_like(u) if z is not None else u.new_empty(0),
        u.new_empty((u.shape[1],) if delta_bias is not None else (0,), dtype=f32),
    )


# ----------------------------------------------------------------------------------------------- autograd

def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class SelectiveScanCuda(torch.autograd.Function):
    """Autograd over the custom ops; returns ``(out, last_state)`` with last_state ``(Bt, D, N)`` fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus):
        out, carries = torch.ops.compressm.selective_scan_fwd_cuda(
            u, delta, A, B, C, D, z, delta_bias, ranks, kept, delta_softplus
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries)
        ctx.delta_softplus = delta_softplus
        return out, carries[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else _unit_stride(dout)
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = torch.ops.compressm.selective_scan_bwd_cuda(
            u, delta, A, B, C, D, z, delta_bias, ranks, kept, carries, dout, dlast, ctx.delta_softplus
        )
        return (
            du,
            ddelta,
            dA,
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            None,
            None,
            None,
        )


def scan(x: ScanInputs) -> tuple[Tensor, Tensor | None]:
    """Backend protocol: run ``x`` on the CUDA kernels; ``(out, last_state or None)``, differentiable."""
    ranks = kept = None
    if x.state_mask is not None:
        shared = x.state_mask.dim() == 1
        ranks, kept = mask_to_ranks(x.state_mask, 1 if shared else x.dim)
        if shared:
            kept = kept[0]  # (N,) with ranks (1,): every channel runs the same loop

    def projection(t: Tensor) -> Tensor:  # time-invariant (D, N) in fp32 (exact for fp16/bf16)
        return t.to(torch.float32).contiguous() if t.dim() == 2 else t

    def param(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    out, last_state = SelectiveScanCuda.apply(
        x.u, x.delta, x.A.contiguous(), projection(x.B), projection(x.C), param(x.D), x.z, param(x.delta_bias),
        ranks, kept, x.delta_softplus,
    )
    return out, (last_state if x.return_last_state else None)
