"""Pure-PyTorch selective scan: the reference every kernel is tested against, and a CPU fallback.

The scan runs chunk by chunk along L: a chunk of T steps materialises ``(Bt, D, T, N)`` tensors, never
``(Bt, D, L, N)``, and under autograd each chunk is checkpointed, so only the ``(Bt, D, N)`` carry
between chunks is kept for backward. Memory is O(Bt·D·(L + T·N)); the math is MATH.md §1, in float32
(float64 when any input is float64, for gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .inputs import ScanInputs, check_scan_inputs

# Elements of one chunk's (Bt, D, T, N) tensors: bounds the reference's working memory (16 MB in fp32).
_CHUNK_ELEMENTS = 1 << 22
_MAX_CHUNK = 128


def _compute_dtype(x: ScanInputs) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in x.tensors()) else torch.float32


def _per_channel(t: Tensor, dim: int, t0: int, t1: int, dtype: torch.dtype) -> Tensor:
    """B or C for steps [t0, t1) as a tensor broadcastable to (Bt, D, T, N)."""
    if t.dim() == 2:  # time-invariant (D, N)
        return t.to(dtype)[None, :, None, :]
    if t.dim() == 3:  # variable (Bt, N, L): shared by all channels
        return t[:, None, :, t0:t1].to(dtype).transpose(-1, -2)
    batch, groups, dstate, _ = t.shape  # grouped (Bt, G, N, L): channel d uses group d // (D / G)
    chunk = t[..., t0:t1].to(dtype).unsqueeze(2).expand(batch, groups, dim // groups, dstate, t1 - t0)
    return chunk.reshape(batch, dim, dstate, t1 - t0).transpose(-1, -2)


def _scan_chunk(
    h: Tensor, delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, keep: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Run T steps from carry h ``(Bt, D, N)``; delta/u are ``(Bt, D, T)``, B/C broadcast to (Bt, D, T, N)."""
    decay = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (Bt, D, T, N)
    drive = (delta * u).unsqueeze(-1) * B  # (Bt, D, T, N)
    if keep is not None:
        drive = drive * keep
    states = []
    for s in range(delta.shape[-1]):
        h = decay[:, :, s] * h + drive[:, :, s]
        states.append(h)
    y = (torch.stack(states, dim=2) * C).sum(-1)  # (Bt, D, T)
    return y, h


def scan_reference(x: ScanInputs) -> tuple[Tensor, Tensor | None]:
    """The reference scan on validated inputs: ``(out, last_state or None)``."""
    dtype = _compute_dtype(x)
    batch, dim, seqlen, dstate = x.batch, x.dim, x.seqlen, x.dstate
    delta = x.delta.to(dtype)
    if x.delta_bias is not None:
        delta = delta + x.delta_bias.to(dtype)[:, None]
    if x.delta_softplus:
        delta = F.softplus(delta)
    u = x.u.to(dtype)
    A = x.A.to(dtype)
    keep = None
    if x.state_mask is not None:
        keep = x.state_mask.to(dtype)
        keep = keep[:, None, :] if keep.dim() == 2 else keep  # (D, 1, N) or (N,) against (Bt, D, T, N)

    chunk = max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // (batch * dim * dstate)))
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in x.tensors())
    h = u.new_zeros(batch, dim, dstate)
    ys = []
    for t0 in range(0, seqlen, chunk):
        t1 = min(t0 + chunk, seqlen)
        args = (
            h,
            delta[..., t0:t1],
            u[..., t0:t1],
            A,
            _per_channel(x.B, dim, t0, t1, dtype),
            _per_channel(x.C, dim, t0, t1, dtype),
            keep,
        )
        # Checkpointing keeps only the carry h per chunk for backward instead of every step's state.
        y, h = checkpoint(_scan_chunk, *args, use_reentrant=False) if differentiable else _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1)
    if x.D is not None:
        y = y + x.D.to(dtype)[:, None] * u
    if x.z is not None:
        y = y * F.silu(x.z.to(dtype))
    return y.to(x.u.dtype), (h if x.return_last_state else None)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    state_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-PyTorch selective scan with an optional state mask (same contract as
    :func:`compressm_kernels.selective_scan_fn`, computed without any kernel)."""
    x = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, state_mask)
    out, last_state = scan_reference(x)
    return (out, last_state) if return_last_state else out


# Backend protocol (see interface.py): the reference runs everywhere.
def unavailable_reason(x: ScanInputs) -> str | None:
    return None


scan = scan_reference
