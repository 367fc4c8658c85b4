"""Validation of selective-scan arguments, shared by every backend.

``check_scan_inputs`` raises a ``ValueError``/``TypeError`` naming the argument and what was expected;
it never mutates or copies its inputs. ``ScanInputs`` is the validated bundle the dispatcher hands to
a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_DSTATE = 256
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ScanInputs:
    """Validated selective-scan arguments (shapes as in :func:`selective_scan_fn`)."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor | None
    z: Tensor | None
    delta_bias: Tensor | None
    delta_softplus: bool
    return_last_state: bool
    state_mask: Tensor | None

    @property
    def batch(self) -> int:
        return self.u.shape[0]

    @property
    def dim(self) -> int:
        return self.u.shape[1]

    @property
    def seqlen(self) -> int:
        return self.u.shape[2]

    @property
    def dstate(self) -> int:
        return self.A.shape[1]

    @property
    def device(self) -> torch.device:
        return self.u.device

    def tensors(self) -> list[Tensor]:
        """Every tensor argument that is present."""
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state_mask")
        return [t for t in (getattr(self, n) for n in names) if t is not None]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_dtype(name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_writable(name: str, t: Tensor) -> None:
    """A tensor an op updates in place (a decode state): an ``expand()``ed one, stride 0 along an axis longer
    than 1, would have several channels writing the same memory."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True)):
        raise ValueError(f"{name} is updated in place but has overlapping memory (an expand()ed tensor?), strides "
                         f"{list(t.stride())}; pass a clone()")


def _check_bc(name: str, t: Tensor, batch: int, dim: int, seqlen: int, dstate: int) -> None:
    """B/C: time-invariant (D, N), variable (Bt, N, L) or grouped (Bt, G, N, L) with D % G == 0."""
    if t.dim() == 2:
        if tuple(t.shape) != (dim, dstate):
            raise ValueError(f"{name} (time-invariant) must have shape (D, N) = ({dim}, {dstate}), got {_shape(t)}")
    elif t.dim() == 3:
        if tuple(t.shape) != (batch, dstate, seqlen):
            raise ValueError(
                f"{name} (variable) must have shape (Bt, N, L) = ({batch}, {dstate}, {seqlen}), got {_shape(t)}"
            )
    elif t.dim() == 4:
        groups = t.shape[1]
        if groups < 1 or dim % groups != 0 or tuple(t.shape) != (batch, groups, dstate, seqlen):
            raise ValueError(
                f"{name} (grouped) must have shape (Bt, G, N, L) = ({batch}, G, {dstate}, {seqlen}) with D={dim} "
                f"divisible by G, got {_shape(t)}"
            )
    else:
        raise ValueError(f"{name} must have 2 (D, N), 3 (Bt, N, L) or 4 (Bt, G, N, L) dims, got {_shape(t)}")


def check_scan_inputs(
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
    state_mask: Tensor | None = None,
    *,
    require_unit_stride: bool = False,
) -> ScanInputs:
    """Validate selective-scan arguments and bundle them; see :func:`selective_scan_fn` for shapes.

    Args:
        require_unit_stride: also demand that the L axis of ``u``, ``delta``, ``z`` and variable
            ``B``/``C`` is unit-stride (kernels need it; the public function copies instead).
    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: an argument has the wrong shape or device, or the mask keeps no state.
    """
    u = _check_tensor("u", u)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (Bt, D, L), got {_shape(u)}")
    _check_dtype("u", u, ACTIVATION_DTYPES)
    batch, dim, seqlen = u.shape
    if batch < 1 or dim < 1 or seqlen < 1:
        raise ValueError(f"u must have non-empty (Bt, D, L), got {_shape(u)}")

    delta = _check_tensor("delta", delta)
    _check_dtype("delta", delta, ACTIVATION_DTYPES)
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {_shape(u)}, got {_shape(delta)}")

    A = _check_tensor("A", A)
    if A.is_complex():
        raise TypeError("A must be real (complex A is not supported), got " + str(A.dtype).replace("torch.", ""))
    _check_dtype("A", A, PARAM_DTYPES)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D={dim}, got {_shape(A)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"A has N={dstate} states; supported: 1 <= N <= {MAX_DSTATE}")

    for name, t in (("B", B), ("C", C)):
        t = _check_tensor(name, t)
        _check_dtype(name, t, ACTIVATION_DTYPES)
        _check_bc(name, t, batch, dim, seqlen, dstate)

    if z is not None:
        z = _check_tensor("z", z)
        _check_dtype("z", z, ACTIVATION_DTYPES)
        if z.shape != u.shape:
            raise ValueError(f"z must have the shape of u {_shape(u)}, got {_shape(z)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            t = _check_tensor(name, t)
            _check_dtype(name, t, PARAM_DTYPES)
            if tuple(t.shape) != (dim,):
                raise ValueError(f"{name} must have shape (D,) = ({dim},), got {_shape(t)}")

    if state_mask is not None:
        state_mask = _check_tensor("state_mask", state_mask)
        if state_mask.dtype != torch.bool:
            raise TypeError(f"state_mask must have dtype bool, got {str(state_mask.dtype).replace('torch.', '')}")
        if tuple(state_mask.shape) not in ((dstate,), (dim, dstate)):
            raise ValueError(
                f"state_mask must have shape (N,) = ({dstate},) or (D, N) = ({dim}, {dstate}), got {_shape(state_mask)}"
            )

    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")

    inputs = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, state_mask)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state_mask")
    for name in names:
        t = getattr(inputs, name)
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; all inputs must share a device")
    if require_unit_stride:
        for name in ("u", "delta", "z", "B", "C"):
            t = getattr(inputs, name)
            if t is not None and t.dim() >= 3 and t.shape[-1] > 1 and t.stride(-1) != 1:
                raise ValueError(f"{name} must be unit-stride along L (its last axis), got strides {tuple(t.stride())}")
    # The all-False check reads the mask's values; skip it while torch.compile traces.
    if state_mask is not None and not torch.compiler.is_compiling() and not bool(state_mask.any()):
        raise ValueError("state_mask keeps no state (all False); keep at least one state")
    return inputs
