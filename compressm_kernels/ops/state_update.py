"""One decode step of the selective scan, updating the hidden state in place.

Semantics of ``mamba_ssm.ops.triton.selective_state_update.selective_state_update`` (Mamba-1 shapes),
plus an optional state mask; works on compacted states (any N). CPU tensors run the C++ kernel
(``backend="cpu"``), CUDA tensors the Triton kernel (``backend="triton"``);
``selective_state_update_ref`` is the pure-PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .selective_scan import cpu as cpu_backend
from .selective_scan import triton as triton_backend
from .selective_scan.inputs import ACTIVATION_DTYPES, PARAM_DTYPES, check_writable


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_state_update_inputs(
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
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad argument; mutates nothing."""
    for name, t in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("dt_bias", dt_bias), ("state_mask", state_mask)):
        if not (isinstance(t, Tensor) or (t is None and name not in ("state", "x", "dt", "A", "B", "C"))):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if state.dim() != 3:
        raise ValueError(f"state must have shape (Bt, D, N), got {_shape(state)}")
    batch, dim, dstate = state.shape
    if not state.is_floating_point():
        raise TypeError(f"state must be a floating tensor, got {state.dtype}")
    check_writable("state", state)
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is None:
            continue
        if tuple(t.shape) != (batch, dim):
            raise ValueError(f"{name} must have shape (Bt, D) = ({batch}, {dim}), got {_shape(t)}")
        if t.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16/fp64, got {t.dtype}")
    if tuple(A.shape) != (dim, dstate):
        raise ValueError(f"A must have shape (D, N) = ({dim}, {dstate}), got {_shape(A)}")
    if A.dtype not in PARAM_DTYPES:
        raise TypeError(f"A must be fp32 or fp64, got {A.dtype}")
    for name, t in (("B", B), ("C", C)):
        if t.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16/fp64, got {t.dtype}")
        ok = (t.dim() == 2 and tuple(t.shape) == (batch, dstate)) or (
            t.dim() == 3 and t.shape[0] == batch and t.shape[2] == dstate and t.shape[1] >= 1 and dim % t.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"{name} must have shape (Bt, N) = ({batch}, {dstate}) or (Bt, G, N) with D={dim} divisible by G, "
                f"got {_shape(t)}"
            )
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is None:
            continue
        if tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must have shape (D,) = ({dim},), got {_shape(t)}")
        if t.dtype not in ACTIVATION_DTYPES:  # as mamba_ssm's step: a half-precision model passes its own
            raise TypeError(f"{name} must be fp32/fp16/bf16/fp64, got {t.dtype}")
    if state_mask is not None:
        if state_mask.dtype != torch.bool:
            raise TypeError(f"state_mask must have dtype bool, got {state_mask.dtype}")
        if tuple(state_mask.shape) not in ((dstate,), (dim, dstate)):
            raise ValueError(f"state_mask must have shape (N,) or (D, N) = ({dim}, {dstate}), got {_shape(state_mask)}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("state_mask", state_mask)):
        if t is not None and t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}; all inputs must share a device")


def _per_channel(t: Tensor, dim: int) -> Tensor:
    """B/C ``(Bt, N)`` or grouped ``(Bt, G, N)`` as ``(Bt, D, N)`` (or broadcastable)."""
    if t.dim() == 2:
        return t[:, None, :]
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    state_mask: Tensor | None = None,
) -> Tensor:
    """Pure-PyTorch decode step (fp32 math); see :func:`selective_state_update`."""
    check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias, state_mask)
    dtype = torch.float64 if state.dtype == torch.float64 or x.dtype == torch.float64 else torch.float32
    dim = state.shape[1]
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.to(dtype)
    drive = (dt * xf)[..., None] * _per_channel(B.to(dtype), dim)
    h = torch.exp(dt[..., None] * A.to(dtype)) * state.to(dtype) + drive
    if state_mask is not None:  # a masked state is 0: it neither carries nor contributes anything
        h = h * state_mask.to(dtype)
    state.copy_(h)
    out = (h * _per_channel(C.to(dtype), dim)).sum(-1)
    if D is not None:
        out = out + D.to(dtype) * xf
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(x.dtype)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    state_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Advance the selective-scan state by one token, in place.

    Args:
        state: ``(Bt, D, N)`` hidden state, updated in place.
        x, dt: ``(Bt, D)`` input and step size (before bias/softplus).
        A: ``(D, N)`` fp32.
        B, C: ``(Bt, N)`` or grouped ``(Bt, G, N)``.
        D, dt_bias: optional ``(D,)``, any float dtype; z: optional ``(Bt, D)`` gate.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        state_mask: optional bool ``(N,)`` or ``(D, N)``; masked states are set to 0 and contribute nothing
            (with a per-channel mask the C++ kernel visits kept states only).
        backend: ``"auto"`` (the C++ kernel for CPU tensors it supports, the Triton kernel for CUDA tensors
            when triton is installed, else the reference), ``"cpu"`` or ``"triton"`` (each raises if it
            cannot run these inputs) or ``"reference"``.
    Returns:
        ``(Bt, D)`` output in x's dtype.

    A decode step is a few microseconds of work, so the common case (CPU tensors the kernel takes, no mask)
    goes straight to the C++ kernel, whose checks run before anything is written; any input it refuses
    takes the full path below, which raises the precise error or picks the reference.
    """
    cpu_state = isinstance(state, Tensor) and state.device.type == "cpu"
    if state_mask is None and cpu_state and (backend == "auto" or backend == "cpu"):
        out = cpu_backend.try_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        if out is not None:
            return out
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if backend not in ("auto", "cpu", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'cpu', 'triton' or 'reference', got {backend!r}")
    if backend == "reference":
        return selective_state_update_ref(*args, state_mask=state_mask)
    check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias, state_mask)
    tensors = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    # auto: the C++ kernel on a CPU, Triton on a GPU (never Triton's interpreter: it is for tests).
    kernel = backend if backend != "auto" else "cpu" if cpu_state else "triton"
    module = {"cpu": cpu_backend, "triton": triton_backend}[kernel]
    reason = module.state_update_unavailable_reason(tensors)
    if reason is None:
        return module.state_update(*args, state_mask)
    if backend == "auto":
        return selective_state_update_ref(*args, state_mask=state_mask)
    raise RuntimeError(f"selective_state_update backend={backend!r} cannot run these inputs: {reason}")
