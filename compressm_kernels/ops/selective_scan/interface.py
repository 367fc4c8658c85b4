"""The public selective scan and the one dispatcher that picks its backend.

A backend is a module of this package exposing
``unavailable_reason(x: ScanInputs) -> str | None`` (why it cannot run these inputs, ``None`` if it
can) and ``scan(x: ScanInputs) -> (out, last_state | None)`` (differentiable). ``backend="auto"``
takes the first eligible backend in the device's preference order and falls back quietly;
an explicitly requested backend raises if it cannot run, with the reason and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from types import ModuleType

import torch
from torch import Tensor

from ... import env
from .inputs import ScanInputs, check_scan_inputs

logger = logging.getLogger("compressm_kernels")

BACKENDS = ("cuda", "triton", "cpu", "reference")
_MODULES = {name: f"{__package__}.{name}" for name in BACKENDS}
# Triton on CPU means its interpreter: correct but far too slow to pick automatically.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_logged_choices: set[tuple[str, str]] = set()


def _load(name: str) -> ModuleType | str:
    """The backend's module, or why it cannot be imported."""
    # An imported backend is looked up without importlib, which torch.compile cannot trace.
    loaded = sys.modules.get(_MODULES[name])
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name == _MODULES[name]:
            return f"the {name!r} backend is not part of this version of compressm_kernels"
        return f"the {name!r} backend could not be imported ({err})"
    except ImportError as err:
        return f"the {name!r} backend could not be imported ({err})"


def _reason(name: str, x: ScanInputs) -> tuple[ModuleType | None, str | None]:
    module = _load(name)
    if isinstance(module, str):
        return None, module
    return module, module.unavailable_reason(x)


def resolve_backend(x: ScanInputs, backend: str = "auto") -> tuple[str, ModuleType]:
    """Pick the backend that runs ``x``; raise ``RuntimeError`` if a requested one cannot."""
    if backend == "auto":
        backend = env.default_backend()
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        module, reason = _reason(backend, x)
        if reason is not None:
            raise RuntimeError(f"selective_scan backend={backend!r} cannot run these inputs: {reason}")
        return backend, module
    reasons = []
    for name in _AUTO_ORDER.get(x.device.type, ("reference",)):
        module, reason = _reason(name, x)
        if reason is None:
            key = (name, x.device.type)
            if key not in _logged_choices and not torch.compiler.is_compiling():  # Logger calls break graphs
                _logged_choices.add(key)
                logger.info("selective_scan on %s uses the %r backend%s", x.device.type, name,
                            "".join(f"; {r}" for r in reasons))
            return name, module
        reasons.append(f"{name}: {reason}")
    raise RuntimeError("no selective_scan backend can run these inputs: " + "; ".join(reasons))


def backend_status(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """For each backend, ``None`` if it runs fp32 inputs on ``device``, else the reason it does not (every backend
    unavailable when this machine has no such device). ``ValueError`` if ``device`` names no device type."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r} ({err})") from None
    try:
        ones = torch.ones(1, 1, 1, device=device)
    except (RuntimeError, AssertionError) as err:  # e.g. CUDA on a machine without a driver
        return dict.fromkeys(BACKENDS, f"this machine has no usable {device} device ({err})")
    probe = check_scan_inputs(ones, ones, -ones[0], ones[0], ones[0])
    return {name: _reason(name, probe)[1] for name in BACKENDS}


def _unit_stride(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.dim() < 3 or t.stride(-1) == 1 else t.contiguous()


def selective_scan_fn(
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
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (Mamba-1 S6), a drop-in for ``mamba_ssm.selective_scan_fn`` with a state mask.

    Args:
        u: ``(Bt, D, L)`` input, fp32/fp16/bf16 (fp64 on the reference backend).
        delta: ``(Bt, D, L)`` step sizes before bias/softplus.
        A: ``(D, N)`` fp32 state matrix (diagonal per channel, negative), ``N <= 256``.
        B, C: ``(Bt, N, L)`` variable, ``(Bt, G, N, L)`` grouped (channel d uses group
            ``d // (D / G)``) or ``(D, N)`` time-invariant.
        D: optional ``(D,)`` fp32 skip connection.
        z: optional ``(Bt, D, L)`` gate; the output is multiplied by ``silu(z)``.
        delta_bias: optional ``(D,)`` fp32 bias added to delta.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final hidden state.
        state_mask: optional bool ``(N,)`` (shared) or ``(D, N)`` (per channel); masked states
            contribute nothing and receive zero gradient.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpu"``.
    Returns:
        ``out`` ``(Bt, D, L)`` in u's dtype, or ``(out, last_state)`` with ``last_state``
        ``(Bt, D, N)`` fp32 (fp64 for fp64 inputs). Inputs whose L axis is not unit-stride are
        copied, as mamba_ssm does; nothing is modified in place.
    """
    x = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, state_mask)
    x = dataclasses.replace(
        x, u=_unit_stride(x.u), delta=_unit_stride(x.delta), B=_unit_stride(x.B), C=_unit_stride(x.C),
        z=_unit_stride(x.z),
    )
    _, module = resolve_backend(x, backend)
    out, last_state = module.scan(x)
    return (out, last_state) if return_last_state else out
