"""Mamba's fused inner path, ``mamba_inner_fn`` with mamba_ssm's signature, correct for compacted states.

conv1d → x_proj → dt_proj → selective scan → gate → out_proj, composed of differentiable ops (the scan
is :func:`compressm_kernels.selective_scan_fn`, so it honours ``state_mask`` and picks the fastest backend).
Every activation stays in the ``(Bt, channels, L)`` layout the kernels read: xz is split along its memory order
and out_proj reads the scan output in place, so neither pass makes a transposing copy.
Unlike mamba_ssm's version it takes N from ``A`` and checks that ``x_proj_weight`` has exactly the rows
``[dt | B | C]`` for that N, so a compacted layer can never read C from the wrong columns, and every
gradient row is written by autograd.

``checkpoint_lvl=1`` is selective activation checkpointing: backward recomputes conv1d → x_proj → dt_proj
(the cheap ``(Bt, D, L)`` activations) but reuses the outputs of the scan's forward kernel (the
``compressm::selective_scan_fwd_*`` custom ops), as mamba_ssm's MambaInnerFn never re-runs the scan.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .conv1d import causal_conv1d
from .selective_scan import selective_scan_fn

# The scans' forward kernels (the ops of the cpu, cuda and triton backends), by name so that a backend
# whose module cannot import here is no problem. Their outputs are kept for backward instead of recomputed.
_SCAN_FORWARD_OPS = frozenset(
    f"compressm::selective_scan_fwd_{backend}" for backend in ("cpu", "cuda", "triton")
)
# Newer torch asks whether tensors kept by selective checkpointing go through the caller's saved-tensors hooks
# (e.g. save_on_cpu); they should, like every other tensor kept for backward.
_HOOKS_KWARG = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters else {}
)


def _keep_scan_forward(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save the scan kernel's outputs, recompute every other op."""
    if op.name() in _SCAN_FORWARD_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _rms_norm(x: Tensor, weight: Tensor, eps: float, dim: int) -> Tensor:
    """RMSNorm of ``x`` along ``dim`` in fp32 (as mamba_ssm's B/C/dt norms), returned in x's dtype."""
    xf = x.float()
    shape = [1] * x.dim()
    shape[dim] = -1
    out = xf * torch.rsqrt(xf.square().mean(dim=dim, keepdim=True) + eps) * weight.float().view(shape)
    return out.to(x.dtype)


def project_channels(weight: Tensor, t: Tensor) -> Tensor:
    """``weight`` ``(O, I)`` applied to each ``(I, L)`` slice of ``t`` ``(Bt, I, L)`` → ``(Bt, O, L)``, contiguous.

    A bmm against the weight broadcast over the batch keeps L innermost, so the scan gets delta, B and C
    without a transposing copy, and t is read in place (``F.linear(t.transpose(1, 2))`` copies it first).
    Its backward sums a ``(Bt, O, I)`` weight gradient, small next to t ``(Bt, I, L)`` or the result
    ``(Bt, O, L)`` while min(O, I) ≪ L: x_proj's R + 2·N rows, dt_proj's rank R. out_proj's d_model × D is
    not: :func:`project_to_tokens` takes its weight gradient one batch row at a time instead."""
    return torch.bmm(weight.expand(t.shape[0], -1, -1), t)


class _SplitTokenMajor(torch.autograd.Function):
    """x and z as contiguous ``(Bt, D, L)`` rows from an xz whose memory is ``(Bt, L, 2·D)`` (``F.linear``'s
    output, transposed: transformers' in_proj). The forward makes the two copies the conv and the scan would make;
    the backward writes dx and dz transposed straight into a ``(Bt, L, 2·D)`` gradient, which in_proj's backward
    reads in place. Chunking instead makes autograd concatenate dx and dz as ``(Bt, 2·D, L)``, and the linear's
    backward then transposes that copy again (the two were 9 % of a profiled transformers CPU training step at
    d_model 512)."""

    @staticmethod
    def forward(ctx, xz: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        x, z = xz.chunk(2, dim=1)
        ctx.channels, ctx.x_channels = xz.shape[1], x.shape[1]  # chunk gives x the extra one of an odd count
        return x.contiguous(), z.contiguous()

    @staticmethod
    def backward(ctx, dx: Tensor | None, dz: Tensor | None) -> Tensor:
        given = dx if dx is not None else dz
        split = ctx.x_channels
        tokens = given.new_empty(given.shape[0], given.shape[2], ctx.channels)
        for half, grad in ((tokens[..., :split], dx), (tokens[..., split:], dz)):
            if grad is None:
                half.zero_()
            else:
                half.copy_(grad.transpose(1, 2))
        return tokens.transpose(1, 2)


def split_channels(xz: Tensor) -> tuple[Tensor, Tensor]:
    """x and z, the halves of ``xz`` ``(Bt, 2·D, L)`` along its channels, split along xz's memory order so that
    their gradient comes back in that order too.

    Mamba's in_proj is one GEMM into ``(2·D, Bt·L)`` memory, viewed as ``(Bt, 2·D, L)``. Chunking that view makes
    autograd concatenate dx and dz into a ``(Bt, 2·D, L)`` tensor, which the GEMM's backward then copies once more
    into its own layout; split along the memory's order instead, and the gradient comes back as one ``(2·D, Bt, L)``
    block that the GEMM reads in place (the second copy was 3 % of the CPU bench block's training step). An xz
    whose memory is ``(Bt, L, 2·D)`` goes through :class:`_SplitTokenMajor`."""
    channels_first = xz.transpose(0, 1)
    if channels_first.is_contiguous():
        x, z = channels_first.chunk(2, dim=0)
        return x.transpose(0, 1), z.transpose(0, 1)
    if xz.shape[-1] > 1 and xz.transpose(1, 2).is_contiguous():
        return _SplitTokenMajor.apply(xz)
    return xz.chunk(2, dim=1)


class _ChannelsFirstLinear(torch.autograd.Function):
    """out_proj on the scan's ``(Bt, D, L)`` output: ``(Bt, L, d_model)`` = yᵀ·Wᵀ + b, without the transposing
    copies of ``F.linear(y.transpose(1, 2))`` — one of y in the forward, one of dy in the backward (whose
    ``(Bt, L, D)`` result the scan's backward would copy back to its ``(Bt, D, L)`` rows). BLAS reads the
    transposed operands in place; dy comes out as ``(Bt, D, L)``."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(y, weight)
        ctx.has_bias = bias is not None
        weight_t = weight.t().expand(y.shape[0], -1, -1)
        if bias is None:
            return torch.bmm(y.transpose(1, 2), weight_t)
        return torch.baddbmm(bias, y.transpose(1, 2), weight_t)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        y, weight = ctx.saved_tensors
        dy = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dy = torch.bmm(weight.t().expand(y.shape[0], -1, -1), dout.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            # Σ_b dout_bᵀ · y_bᵀ, one GEMM per batch row (a single GEMM over Bt·L would copy y to (Bt·L, D)).
            dweight = weight.new_zeros(weight.shape)
            for b in range(y.shape[0]):
                dweight.addmm_(dout[b].t(), y[b].t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dout.sum((0, 1))
        return dy, dweight, dbias


def project_to_tokens(y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(y.transpose(1, 2), weight, bias)`` for y ``(Bt, D, L)``: for fp32/fp64 on a CPU without autocast
    through the Function above (the two copies were 7 % of the CPU bench block's training step). F.linear itself
    under autocast, which picks its dtypes; in bf16/fp16, whose weight gradient would be rounded once per batch row
    instead of once; and on a GPU, where a copy is cheap next to the GEMMs and F.linear takes the weight's gradient
    in one GEMM."""
    if (y.device.type != "cpu" or torch.is_autocast_enabled("cpu") or y.dtype not in (torch.float32, torch.float64)
            or weight.dtype != y.dtype or (bias is not None and bias.dtype != y.dtype)):
        return F.linear(y.transpose(1, 2), weight, bias)
    return _ChannelsFirstLinear.apply(y, weight, bias)


def _check(xz: Tensor, conv1d_weight: Tensor, x_proj_weight: Tensor, delta_proj_weight: Tensor,
           out_proj_weight: Tensor, A: Tensor, B: Tensor | None, C: Tensor | None, checkpoint_lvl: int,
           biases: dict[str, Tensor | None]) -> None:
    if xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"xz must have shape (Bt, 2·D, L), got {_shape(xz)}")
    dim = xz.shape[1] // 2
    if A.is_complex():
        raise TypeError("A must be real; complex A is not supported by compressm_kernels")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (D, N) with D={dim}, got {_shape(A)}")
    if conv1d_weight.dim() not in (2, 3) or conv1d_weight.shape[0] != dim or (
            conv1d_weight.dim() == 3 and conv1d_weight.shape[1] != 1):
        raise ValueError(f"conv1d_weight must have shape (D, 1, W) or (D, W) with D={dim}, got {_shape(conv1d_weight)}")
    if delta_proj_weight.dim() != 2 or delta_proj_weight.shape[0] != dim:
        raise ValueError(f"delta_proj_weight must have shape (D, R) with D={dim}, got {_shape(delta_proj_weight)}")
    rank, dstate = delta_proj_weight.shape[1], A.shape[1]
    rows = rank + dstate * ((B is None) + (C is None))
    if x_proj_weight.dim() != 2 or tuple(x_proj_weight.shape) != (rows, dim):
        raise ValueError(
            f"x_proj_weight must have shape (R + N·(variable B) + N·(variable C), D) = ({rows}, {dim}) for dt rank "
            f"R={rank} and N={dstate} states (from A), got {_shape(x_proj_weight)}; after compacting A, slice "
            "x_proj's rows to [dt | B[keep] | C[keep]] too"
        )
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != dim:
        raise ValueError(f"out_proj_weight must have shape (d_model, D) with D={dim}, got {_shape(out_proj_weight)}")
    sizes = {"conv1d_bias": ("D", dim), "out_proj_bias": ("d_model", out_proj_weight.shape[0]),
             "B_proj_bias": ("N", dstate), "C_proj_bias": ("N", dstate)}
    for name, bias in biases.items():
        if bias is not None and tuple(bias.shape) != (sizes[name][1],):
            raise ValueError(f"{name} must have shape ({sizes[name][0]},) = ({sizes[name][1]},), got {_shape(bias)}")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")


def _inner_path(
    xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, x_proj_weight: Tensor, delta_proj_weight: Tensor,
    out_proj_weight: Tensor, out_proj_bias: Tensor | None, A: Tensor, B: Tensor | None, C: Tensor | None,
    D: Tensor | None, delta_bias: Tensor | None, B_proj_bias: Tensor | None, C_proj_bias: Tensor | None,
    delta_softplus: bool, b_rms_weight: Tensor | None, c_rms_weight: Tensor | None, dt_rms_weight: Tensor | None,
    eps: float, state_mask: Tensor | None, backend: str,
) -> Tensor:
    """xz ``(Bt, 2D, L)`` → ``out_proj(y · silu(z))`` ``(Bt, L, d_model)``."""
    x, z = split_channels(xz)
    weight = conv1d_weight.reshape(conv1d_weight.shape[0], -1)
    u = causal_conv1d(x, weight, conv1d_bias, activation="silu")  # (Bt, D, L)
    rank, dstate = delta_proj_weight.shape[1], A.shape[1]
    x_dbl = project_channels(x_proj_weight, u)  # (Bt, rows, L): [dt | B | C]
    delta = project_channels(delta_proj_weight, x_dbl[:, :rank])  # (Bt, D, L)
    if dt_rms_weight is not None:
        delta = _rms_norm(delta, dt_rms_weight, eps, dim=1)
    col = rank
    if B is None:  # variable B: the next N rows, (Bt, N, L)
        B = x_dbl[:, col:col + dstate]
        col += dstate
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)[:, None]
        if b_rms_weight is not None:
            B = _rms_norm(B, b_rms_weight, eps, dim=1)
    if C is None:  # variable C: the N rows after B (never counted from the end)
        C = x_dbl[:, col:col + dstate]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)[:, None]
        if c_rms_weight is not None:
            C = _rms_norm(C, c_rms_weight, eps, dim=1)
    y = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          state_mask=state_mask, backend=backend)
    return project_to_tokens(y, out_proj_weight, out_proj_bias)


def mamba_inner_fn(
    xz: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Tensor | None,
    x_proj_weight: Tensor,
    delta_proj_weight: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    A: Tensor,
    B: Tensor | None = None,
    C: Tensor | None = None,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    B_proj_bias: Tensor | None = None,
    C_proj_bias: Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
    b_rms_weight: Tensor | None = None,
    c_rms_weight: Tensor | None = None,
    dt_rms_weight: Tensor | None = None,
    b_c_dt_rms_eps: float = 1e-6,
    *,
    state_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Mamba's inner path (mamba_ssm's ``mamba_inner_fn`` signature, plus ``state_mask`` and ``backend``).

    Args:
        xz: ``(Bt, 2·D, L)`` in_proj output, x then z.
        conv1d_weight: ``(D, 1, W)`` or ``(D, W)``; conv1d_bias: optional ``(D,)``.
        x_proj_weight: ``(R + 2·N, D)``, rows ``[dt | B | C]`` (only the variable parts when B or C is given).
        delta_proj_weight: ``(D, R)``; out_proj_weight: ``(d_model, D)``; out_proj_bias: optional ``(d_model,)``.
        A: ``(D, N)`` fp32 (``-exp(A_log)``); N is taken from here.
        B, C: ``None`` (variable, from x_proj) or time-invariant ``(D, N)`` fp32.
        D, delta_bias: optional ``(D,)`` fp32. B_proj_bias, C_proj_bias: optional ``(N,)``.
        checkpoint_lvl: 1 keeps only xz, the weights and the scan kernel's outputs for backward, which
            recomputes conv, x_proj and delta from them (mamba_ssm drops conv1d_out and delta) but does not
            re-run the scan's forward. The kept outputs are the gated ``(Bt, D, L)`` scan
            output and the fp32 chunk carries ``(Bt, D, ⌈L/chunk⌉, N)``; the triton backend with ``z`` also
            keeps its pre-gate output. The ``reference`` backend is plain torch ops, so it is recomputed
            whole, scan included. 0 keeps every activation.
        b_rms_weight, c_rms_weight, dt_rms_weight: optional RMSNorm weights applied to B, C (``(N,)``) and
            delta (``(D,)``), with epsilon ``b_c_dt_rms_eps``.
        state_mask: optional bool ``(N,)`` or ``(D, N)``; masked states contribute nothing.
        backend: the selective-scan backend (see :func:`compressm_kernels.selective_scan_fn`).
    Returns:
        ``(Bt, L, d_model)``.
    """
    _check(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C, checkpoint_lvl,
           {"conv1d_bias": conv1d_bias, "out_proj_bias": out_proj_bias, "B_proj_bias": B_proj_bias,
            "C_proj_bias": C_proj_bias})
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C,
            D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight,
            b_c_dt_rms_eps, state_mask, backend)
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)
    if checkpoint_lvl == 1 and needs_grad:
        # Keep xz, the weights and the scan kernel's outputs; backward recomputes the rest of this segment.
        return checkpoint(_inner_path, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_scan_forward), **_HOOKS_KWARG)
    return _inner_path(*args)
