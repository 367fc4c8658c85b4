"""Depthwise causal conv1d (Mamba's short convolution): causal-conv1d's kernels on CUDA when installed, our
C++ kernel on CPU (:mod:`.conv1d_cpu`), otherwise a correct PyTorch implementation (also the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import conv1d_cpu
from .selective_scan.inputs import check_writable

try:  # causal-conv1d imports only with its CUDA extension
    from causal_conv1d import causal_conv1d_fn as _cuda_conv
    from causal_conv1d import causal_conv1d_update as _cuda_conv_update
except ImportError:
    _cuda_conv = _cuda_conv_update = None

_ACTIVATIONS = (None, "silu", "swish")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must have shape (D, W) with D={x.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape (D,) = ({x.shape[1]},), got {tuple(bias.shape)}")


def _uses_cuda_kernel(x: Tensor) -> bool:
    # causal-conv1d's kernels run only on CUDA tensors; anything else takes the PyTorch path.
    return _cuda_conv is not None and x.is_cuda


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
    initial_states: Tensor | None = None,
) -> Tensor:
    """PyTorch causal depthwise conv: ``out[:, d, t] = act(bias[d] + Σ_k weight[d, k] · x[:, d, t - W + 1 + k])``.

    Args:
        x: ``(Bt, D, L)``; weight: ``(D, W)``; bias: optional ``(D,)``.
        initial_states: optional ``(Bt, D, W - 1)``, the inputs before ``x[..., 0]`` (zeros if None).
    Returns:
        ``(Bt, D, L)`` in x's dtype.
    """
    _check(x, weight, bias, activation)
    width = weight.shape[1]
    padded = F.pad(x, (width - 1, 0)) if initial_states is None else torch.cat([initial_states.to(x.dtype), x], dim=-1)
    out = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Causal depthwise conv of ``x`` ``(Bt, D, L)`` with ``weight`` ``(D, W)``; differentiable."""
    if _uses_cuda_kernel(x) and 2 <= weight.shape[1] <= 4:
        _check(x, weight, bias, activation)
        return _cuda_conv(x, weight, bias, activation=activation)
    if x.dim() == 3 and conv1d_cpu.unavailable_reason(x, weight, bias) is None:
        _check(x, weight, bias, activation)
        return conv1d_cpu.causal_conv1d_cpu(x, weight, bias, silu=activation in ("silu", "swish"))
    return causal_conv1d_torch(x, weight, bias, activation)


def causal_conv1d_update_torch(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One or more decode steps of the causal conv; ``conv_state`` ``(Bt, D, S)`` (S >= W - 1, the last
    S inputs) is shifted in place.

    Args:
        x: ``(Bt, D)`` or ``(Bt, D, T)`` new inputs.
    Returns:
        the conv outputs for the new inputs, shaped like ``x``.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    _check(x3, weight, bias, activation)
    width, keep = weight.shape[1], conv_state.shape[-1]
    if conv_state.shape[:2] != x3.shape[:2] or keep < width - 1:
        raise ValueError(f"conv_state must have shape (Bt, D, S >= W - 1) = ({x3.shape[0]}, {x3.shape[1]}, "
                         f">= {width - 1}), got {tuple(conv_state.shape)}")
    check_writable("conv_state", conv_state)
    window = torch.cat([conv_state.to(x3.dtype), x3], dim=-1)  # (Bt, D, S + T)
    conv_state.copy_(window[..., -keep:])
    out = causal_conv1d_torch(x3, weight, bias, activation, initial_states=window[..., keep - width + 1: keep])
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Decode step(s) of the causal conv, updating ``conv_state`` ``(Bt, D, S)`` in place (see
    :func:`causal_conv1d_update_torch`)."""
    if _cuda_conv_update is not None and x.is_cuda:
        return _cuda_conv_update(x, conv_state, weight, bias, activation)
    if x.dim() == 3 and x.shape[-1] == 1:  # one token as (Bt, D, 1), transformers' layout: the one-token step
        return causal_conv1d_update(x[..., 0], conv_state, weight, bias, activation)[..., None]
    if conv1d_cpu.update_unavailable_reason(x, conv_state, weight, bias) is None:
        _check(x[..., None], weight, bias, activation)  # the kernel checks conv_state before it writes
        return conv1d_cpu.causal_conv1d_update_step(x, conv_state, weight.float(),
                                                    None if bias is None else bias.float(),
                                                    activation in ("silu", "swish"))
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
