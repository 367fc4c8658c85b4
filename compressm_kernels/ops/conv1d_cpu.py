"""The C++ CPU causal conv1d (``compressm_kernels._C``): Mamba's short depthwise convolution and its SiLU.

The ops ``compressm::causal_conv1d_fwd_cpu`` / ``_bwd_cpu`` (kernels registered by the extension, fake
implementations here), paired by an ``autograd.Function``. The backward recomputes the pre-activation from ``x``
instead of saving it. ``x`` is read in place when it is unit-stride along L (e.g. the x half of
``xz.chunk(2, dim=1)``); the output and ``dx`` are contiguous in x's dtype, the weight and bias gradients fp32.
The one-token decode step (``compressm::causal_conv1d_update_cpu``, no autograd) shifts ``conv_state`` in place;
in eager mode it calls the extension directly, the custom-op wrapper costing more than the step. At Mamba's
sizes the op is 3-5× faster forward+backward than ``F.conv1d`` on a padded copy followed by ``F.silu``, its
decode step 4-5× faster than PyTorch's (``python -m bench conv``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._extensions import define_ops, extension_unavailable_reason, require_extension

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext():
    return require_extension("_C")


# The conv's CPU kernels, registered by the extension (bindings.cpp), which this loads now (for torch.compile: see
# _extensions.extension_unavailable_reason).
_lib = define_ops("_C", "CPU", [
    "causal_conv1d_fwd_cpu(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor",
    "causal_conv1d_bwd_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor dout, bool silu) -> Tensor[]",
])
# (Bt, D, L) in x's dtype: silu(conv) or conv; and [dx, dweight, dbias (0-element without a bias)].
causal_conv1d_fwd_cpu = torch.ops.compressm.causal_conv1d_fwd_cpu.default
causal_conv1d_bwd_cpu = torch.ops.compressm.causal_conv1d_bwd_cpu.default


@torch.library.register_fake("compressm::causal_conv1d_fwd_cpu", lib=_lib)
def _(x, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("compressm::causal_conv1d_bwd_cpu", lib=_lib)
def _(x, weight, bias, dout, silu):
    f32 = {"dtype": torch.float32}
    return [torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape, **f32),
            weight.new_empty((weight.shape[0] if bias is not None else 0,), **f32)]


@torch.library.custom_op("compressm::causal_conv1d_update_cpu", mutates_args=("conv_state",))
def causal_conv1d_update_cpu(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                             silu: bool) -> Tensor:
    """One decode step: ``conv_state`` ``(Bt, D, S)`` shifted in place, returns ``(Bt, D)`` in x's dtype."""
    return _ext().conv1d_update(x, conv_state, weight, bias, silu)


@causal_conv1d_update_cpu.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return causal_conv1d_fwd_cpu(x, weight, bias, silu)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dx, dweight, dbias = causal_conv1d_bwd_cpu(x, weight, bias, dout, ctx.silu)
        return dx, dweight, dbias if bias is not None else None, None


def unavailable_reason(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the C++ conv cannot run these (already shape-checked) inputs, ``None`` if it can."""
    if x.device.type != "cpu":
        return f"the C++ conv runs CPU tensors; these are on {x.device}"
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; the C++ conv takes float32/float16/bfloat16"
    if weight.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64):
        return "float64 weights: the C++ conv computes in float32"
    if x.numel() == 0:
        return "x is empty"
    return extension_unavailable_reason("_C")


def update_unavailable_reason(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the C++ decode step of the conv cannot run these (already shape-checked) inputs, ``None`` if it can."""
    if x.dim() != 2:
        return "the C++ conv step takes one token, x (Bt, D)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, conv_state, weight, bias)):
        return "the C++ conv step has no backward"
    if conv_state.dtype not in _DTYPES:
        return f"conv_state is {conv_state.dtype}; the C++ conv step takes float32/float16/bfloat16"
    return unavailable_reason(x[..., None], weight, bias)


def causal_conv1d_update_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                              silu: bool) -> Tensor:
    """The C++ conv step on inputs :func:`update_unavailable_reason` accepts (fp32 weight and bias)."""
    if torch.compiler.is_compiling():
        return causal_conv1d_update_cpu(x, conv_state, weight, bias, silu)
    # Eager: the extension directly; the custom-op wrapper costs more than the step (as the decode step's).
    return _ext().conv1d_update(x, conv_state, weight, bias, silu)


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """The C++ conv on inputs :func:`unavailable_reason` accepts; differentiable."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    # The kernel reads fp32 weights; the casts' backward returns the parameters' dtype.
    return CausalConv1dCPU.apply(x, weight.float(), None if bias is None else bias.float(), silu)
