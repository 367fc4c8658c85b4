"""Run stock mamba_ssm (v2.3.x, Mamba-1 and Mamba-2) on our kernels, including on machines without a GPU.

Call :func:`install` once, before importing mamba_ssm::

    from compressm_kernels.integrations.mamba_ssm import install
    install()
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel   # now imports and runs on CPU

``install`` registers, only where no real extension is importable:

* ``selective_scan_cuda``: ``fwd``/``bwd`` with mamba_ssm's contract (MATH.md §3), computed by
  :func:`compressm_kernels.selective_scan_fn` (our CPU kernel on CPU, our CUDA/Triton kernels on GPU);
* ``causal_conv1d_cuda`` (if the causal_conv1d package is installed without its extension): its
  ``causal_conv1d_fwd/bwd/update`` (our C++ conv on CPU, PyTorch with initial/final states or elsewhere),
  so causal_conv1d imports and mamba_ssm's fused ``mamba_inner_fn`` path runs;

and, for CPU tensors only (CUDA tensors keep mamba_ssm's Triton kernels), routes mamba_ssm's Triton
``selective_state_update`` (Mamba-1's ``(Bt, D, N)`` and Mamba-2's ``(Bt, H, P, N)`` states) to
:func:`compressm_kernels.selective_state_update`, its LayerNorm/RMSNorm (``layer_norm_fn``, ``rms_norm_fn``,
``RMSNorm``, i.e. ``rms_norm=True`` and ``fused_add_norm=True``) and Mamba-2's gated norm to PyTorch, and
Mamba-2's ``mamba_chunk_scan_combined`` / ``mamba_split_conv1d_scan_combined`` to :mod:`.mamba_ssm_ssd`. What
cannot run raises ``NotImplementedError`` with the reason (complex A; mamba_ssm's B/C/dt RMSNorm weights in its
fused path; ``cache_seqlens``/``conv_state_indices`` in causal conv; x1/weight1/rowscale/dropout masks in
LayerNorm). Packed variable-length batches (``seq_idx``, ``cu_seqlens``) run on CPU too, each sequence as a row of
its own, and so does causal-conv1d's ``causal_conv1d_varlen_states``. ``generate(cg=True)`` (CUDA graphs) and
``enable_timing=True`` need CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import conv1d_cpu
from ..ops.conv1d import causal_conv1d_torch, causal_conv1d_update_torch
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update as _our_state_update
from . import mamba_ssm_ssd as ssd

CHUNK = 2048  # mamba_ssm's scan chunk: x holds one carry per 2048 steps
_MARK = "__compressm_kernels__"


# ---- selective_scan_cuda ---------------------------------------------------------------------------
def _check_real(A: Tensor) -> None:
    if A.is_complex():
        raise NotImplementedError("selective_scan_cuda (compressm_kernels): complex A is not supported")


def _softplus_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _chunk(t: Tensor, t0: int, t1: int) -> Tensor:
    return t if t.dim() == 2 else t[..., t0:t1]


def fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, delta_softplus: bool) -> list[Tensor]:
    """mamba_ssm's ``selective_scan_cuda.fwd``.

    Returns:
        ``[out, x]`` or, with ``z``, ``[out, x, out_z]``: ``out`` ``(Bt, D, L)`` is the ungated
        ``y + D·u`` in u's dtype, ``out_z = out · silu(z)``, and ``x`` ``(Bt, D, n_chunks, 2N)`` fp32 holds
        per 2048-step chunk and state the scan prefix ``(a, h)``: ``x[..., 2n]`` the product of
        ``exp(Δ·A)`` from step 0 to the chunk's end, ``x[..., 2n+1]`` the state there
        (``last_state = x[:, :, -1, 1::2]``).
    """
    _check_real(A)
    with torch.no_grad():
        out, last = selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus, return_last_state=True)
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        n_chunks = math.ceil(seqlen / CHUNK)
        x = torch.empty(batch, dim, n_chunks, dstate, 2, device=u.device, dtype=torch.float32)
        dt = _softplus_delta(delta, delta_bias, delta_softplus)
        A32 = A.float()
        decay = torch.ones(batch, dim, dstate, device=u.device)
        state = torch.zeros(batch, dim, dstate, device=u.device)
        for c in range(n_chunks):
            t0, t1 = c * CHUNK, min((c + 1) * CHUNK, seqlen)
            chunk_decay = torch.exp(dt[..., t0:t1].sum(-1, keepdim=True) * A32)  # (Bt, D, N)
            decay = decay * chunk_decay
            if c == n_chunks - 1:
                state = last.float()
            else:  # carry across chunks: h_end = a_chunk · h_start + (the chunk's scan from a zero state)
                _, local = selective_scan_fn(u[..., t0:t1], delta[..., t0:t1], A, _chunk(B, t0, t1),
                                             _chunk(C, t0, t1), None, None, delta_bias, delta_softplus,
                                             return_last_state=True)
                state = chunk_decay * state + local.float()
            x[:, :, c, :, 0] = decay
            x[:, :, c, :, 1] = state
        x = x.view(batch, dim, n_chunks, 2 * dstate)
        if z is None:
            return [out, x]
        out_z = (out.float() * F.silu(z.float())).to(out.dtype)
        return [out, x, out_z]


def bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, dout: Tensor, x: Tensor | None, out: Tensor | None, dz: Tensor | None,
        delta_softplus: bool, recompute_out_z: bool) -> list[Tensor | None]:
    """mamba_ssm's ``selective_scan_cuda.bwd``: gradients of ``out_z`` (or ``out`` without z) for ``dout``,
    recomputed through autograd of :func:`selective_scan_fn` (``x`` and ``out`` are not needed).

    Returns:
        ``[du, ddelta, dA, dB, dC, dD, ddelta_bias]`` (``dD``/``ddelta_bias`` are None when D/delta_bias
        are), then ``dz`` if z is given (written into ``dz`` when one is passed), then ``out_z`` if
        ``recompute_out_z``. Gradients have their input's dtype (dA, dD, ddelta_bias fp32).
    """
    _check_real(A)
    if dout.shape != u.shape:
        raise ValueError(f"dout must have the shape of u {tuple(u.shape)}, got {tuple(dout.shape)}")
    if recompute_out_z and z is None:
        raise ValueError("recompute_out_z needs z")
    leaves = {name: t.detach().requires_grad_(True) for name, t in
              (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
               ("delta_bias", delta_bias)) if t is not None}
    with torch.enable_grad():
        y = selective_scan_fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves.get("D"),
                              None, leaves.get("delta_bias"), delta_softplus)
        target = y if z is None else (y.float() * F.silu(leaves["z"].float())).to(y.dtype)
        grads = dict(zip(leaves, torch.autograd.grad(target, list(leaves.values()), dout, allow_unused=True,
                                                     materialize_grads=True), strict=True))
    result = [grads["u"], grads["delta"], grads["A"], grads["B"], grads["C"], grads.get("D"), grads.get("delta_bias")]
    if z is not None:
        result.append(grads["z"] if dz is None else dz.copy_(grads["z"]))
    if recompute_out_z:
        result.append(target.detach())
    return result


# ---- causal_conv1d_cuda ------------------------------------------------------------------------------
def _no(name: str, value: object, fn: str) -> None:
    if value is not None:
        raise NotImplementedError(f"causal_conv1d_cuda.{fn} (compressm_kernels, PyTorch on CPU): {name} is not "
                                  "supported")


def _check_initial_states(x: Tensor, weight: Tensor, initial_states: Tensor | None) -> None:
    expected = (x.shape[0], x.shape[1], weight.shape[1] - 1)
    if initial_states is not None and tuple(initial_states.shape) != expected:
        raise ValueError(f"initial_states must have shape (Bt, D, W - 1) = {expected}, got "
                         f"{tuple(initial_states.shape)}")


def _cpu_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, *absent: Tensor | None):
    """``(x, weight, bias)`` as our C++ conv takes them, or ``None`` where it cannot run these inputs (initial
    or final states, which it does not model; other devices; float64)."""
    if any(t is not None for t in absent) or conv1d_cpu.unavailable_reason(x, weight, bias) is not None:
        return None
    return (x if x.stride(-1) == 1 else x.contiguous(), weight.float(), None if bias is None else bias.float())


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None,
                      initial_states: Tensor | None, out: Tensor, final_states_out: Tensor | None,
                      silu_activation: bool) -> None:
    """causal-conv1d's ``causal_conv1d_fwd``: writes ``out`` (and ``final_states_out``) in place."""
    _check_initial_states(x, weight, initial_states)
    if seq_idx is not None:  # each packed sequence as a row of its own (initial states: the first one's)
        _no("final_states_out (with seq_idx)", final_states_out, "causal_conv1d_fwd")
        runs = ssd.PackedRuns(seq_idx, x.shape[0], x.shape[-1])
        rows = runs.unpack(x, dim=2)
        rows_out = torch.empty_like(rows)
        initial = None if initial_states is None else runs.first_runs(initial_states)
        causal_conv1d_fwd(rows, weight, bias, None, initial, rows_out, None, silu_activation)
        out.copy_(runs.repack(rows_out, dim=2).masked_fill((seq_idx < 0)[:, None, :], 0.0))
        return
    act = "silu" if silu_activation else None
    cpu_args = _cpu_conv_args(x, weight, bias, initial_states)
    if cpu_args is not None:
        out.copy_(conv1d_cpu.causal_conv1d_fwd_cpu(*cpu_args, silu_activation))
    else:
        out.copy_(causal_conv1d_torch(x, weight, bias, act, initial_states))
    if final_states_out is not None:
        width = weight.shape[1]
        prev = x.new_zeros(*x.shape[:2], width - 1) if initial_states is None else initial_states.to(x.dtype)
        final_states_out.copy_(torch.cat([prev, x], dim=-1)[..., -(width - 1):] if width > 1 else prev)


def causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor, seq_idx: Tensor | None,
                      initial_states: Tensor | None, dfinal_states: Tensor | None, dx: Tensor, dweight: Tensor,
                      dbias: Tensor | None, dinitial_states: Tensor | None, silu_activation: bool) -> None:
    """causal-conv1d's ``causal_conv1d_bwd``: writes ``dx``, ``dweight``, ``dbias``, ``dinitial_states``.

    Written out by hand (or our C++ backward, without initial or final states): it runs inside a
    ``torch.library`` op, where autograd does not record."""
    if seq_idx is not None:  # as causal_conv1d_fwd: each packed sequence a row of its own
        _no("dfinal_states (with seq_idx)", dfinal_states, "causal_conv1d_bwd")
        runs = ssd.PackedRuns(seq_idx, x.shape[0], x.shape[-1])
        rows = runs.unpack(x, dim=2)
        rows_dx = torch.empty_like(rows)
        initial = None if initial_states is None else runs.first_runs(initial_states)
        rows_dinitial = None if dinitial_states is None else dinitial_states.new_empty(runs.count,
                                                                                         *dinitial_states.shape[1:])
        dout = runs.unpack(dout.masked_fill((seq_idx < 0)[:, None, :], 0.0), dim=2)  # those outputs are 0
        causal_conv1d_bwd(rows, weight, bias, dout, None, initial, None, rows_dx, dweight, dbias, rows_dinitial,
                          silu_activation)
        dx.copy_(runs.repack(rows_dx, dim=2))
        if dinitial_states is not None:
            dinitial_states.copy_(rows_dinitial.index_select(0, runs.first_run.to(x.device)))
        return
    cpu_args = _cpu_conv_args(x, weight, bias, initial_states, dfinal_states, dinitial_states)
    if cpu_args is not None:
        grads = conv1d_cpu.causal_conv1d_bwd_cpu(*cpu_args, dout if dout.stride(-1) == 1 else dout.contiguous(),
                                                 silu_activation)
        dx.copy_(grads[0])
        dweight.copy_(grads[1])
        if dbias is not None:
            dbias.copy_(grads[2])
        return
    width, seqlen = weight.shape[1], x.shape[-1]
    prev = x.new_zeros(*x.shape[:2], width - 1) if initial_states is None else initial_states.to(x.dtype)
    xpad = torch.cat([prev, x], dim=-1).float()  # (Bt, D, W - 1 + L)
    w = weight.float()
    g = dout.float()
    if silu_activation:  # d silu(p)/dp = s (1 + p (1 - s)), s = sigmoid(p)
        pre = F.conv1d(xpad, w.unsqueeze(1), None if bias is None else bias.float(), groups=x.shape[1])
        s = torch.sigmoid(pre)
        g = g * s * (1 + pre * (1 - s))
    dxpad = F.conv1d(F.pad(g, (width - 1, width - 1)), w.flip(-1).unsqueeze(1), groups=x.shape[1])
    if dfinal_states is not None and width > 1:
        dxpad[..., -(width - 1):] += dfinal_states.float()
    dx.copy_(dxpad[..., width - 1:])
    dweight.copy_(torch.einsum("bdl,bdlw->dw", g, xpad.unfold(-1, width, 1)[..., :seqlen, :]))
    if dbias is not None:
        dbias.copy_(g.sum(dim=(0, 2)))
    if dinitial_states is not None:
        dinitial_states.copy_(dxpad[..., : width - 1])


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor,
                         silu_activation: bool, cache_seqlens: Tensor | None,
                         conv_state_indices: Tensor | None) -> None:
    """causal-conv1d's ``causal_conv1d_update``: ``x`` ``(Bt, D, T)``; shifts ``conv_state``, writes ``out``."""
    _no("cache_seqlens", cache_seqlens, "causal_conv1d_update")
    _no("conv_state_indices", conv_state_indices, "causal_conv1d_update")
    token = x[..., 0] if x.dim() == 3 and x.shape[-1] == 1 else None
    if token is not None and conv1d_cpu.update_unavailable_reason(token, conv_state, weight, bias) is None:
        out.copy_(conv1d_cpu.causal_conv1d_update_step(token, conv_state, weight.float(),
                                                       None if bias is None else bias.float(),
                                                       silu_activation)[..., None])
        return
    out.copy_(causal_conv1d_update_torch(x, conv_state, weight, bias, "silu" if silu_activation else None))


# ---- CPU routes for mamba_ssm's Triton kernels -------------------------------------------------------
def _route(original, on_cpu):
    """``original`` for CUDA tensors, ``on_cpu`` otherwise, by the device of the first argument (given by position
    or by name)."""
    first_name = next(iter(inspect.signature(original).parameters))

    @functools.wraps(original)
    def routed(*args, **kwargs):
        first = args[0] if args else kwargs[first_name]
        return (original if first.is_cuda else on_cpu)(*args, **kwargs)

    setattr(routed, _MARK, True)
    return routed


class _ApplyRouter:
    """Stands in for an autograd Function of mamba_ssm: ``apply`` runs it for CUDA tensors, ``on_cpu``
    otherwise."""

    def __init__(self, original, on_cpu) -> None:
        self.original, self.on_cpu = original, on_cpu

    def apply(self, x, *args):
        return self.original.apply(x, *args) if x.is_cuda else self.on_cpu(x, *args)


def _cpu_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                      state_batch_indices=None):
    """mamba_ssm's ``selective_state_update`` on :func:`compressm_kernels.selective_state_update`.

    With ``state_batch_indices``, row b advances ``state[state_batch_indices[b]]``, and a negative index marks a
    padding row, whose output is 0 and which touches no state (mamba_ssm's kernel)."""
    if state.dim() not in (3, 4):
        raise NotImplementedError("selective_state_update on CPU (compressm_kernels) takes states (Bt, D, N) or "
                                  f"(Bt, H, P, N), got {tuple(state.shape)}")
    step = _our_state_update if state.dim() == 3 else ssd.multi_head_state_update  # Mamba-1 / Mamba-2
    if state_batch_indices is None:
        return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if tuple(state_batch_indices.shape) != (x.shape[0],):
        raise ValueError(f"state_batch_indices must have shape (Bt,) = ({x.shape[0]},), got "
                         f"{tuple(state_batch_indices.shape)}")
    live = state_batch_indices >= 0
    rows = state_batch_indices[live]
    y = torch.zeros_like(x)
    if len(rows):
        picked = state[rows]
        y[live] = step(picked, x[live], dt[live], A, B[live], C[live], D, None if z is None else z[live], dt_bias,
                       dt_softplus)
        state[rows] = picked
    return y


def layer_norm_torch(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                     rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                     return_dropout_mask=False):
    """mamba_ssm's ``LayerNormFn`` (residual add + LayerNorm/RMSNorm, fp32 math) in PyTorch; differentiable.

    Returns ``y`` (x's dtype), or ``(y, residual_out)`` with ``prenorm``; ``residual_out`` has the
    residual's dtype, else fp32 with ``residual_in_fp32``, else x's dtype."""
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale)):
        if value is not None:
            raise NotImplementedError(f"mamba_ssm layer_norm_fn on CPU (compressm_kernels): {name} is not supported")
    if return_dropout_mask:
        raise NotImplementedError("mamba_ssm layer_norm_fn on CPU (compressm_kernels): return_dropout_mask is not "
                                  "supported")
    h = F.dropout(x.float(), dropout_p) if dropout_p > 0 else x.float()
    if residual is not None:
        h = h + residual.float()
    if is_rms_norm:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(h, h.shape[-1:], eps=eps)
    y = y * weight.float() + (0 if bias is None else bias.float())
    y = y.to(x.dtype)
    if not prenorm:
        return y
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    return y, h.to(res_dtype)


# ---- install -----------------------------------------------------------------------------------------
def _shim(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name, f"compressm_kernels stand-in for {name} (see compressm_kernels.integrations."
                                    "mamba_ssm)")
    module.__dict__.update(functions)
    setattr(module, _MARK, True)
    return module


def _needs_shim(name: str) -> bool:
    """True unless a real module of this name is importable (or our shim is already registered)."""
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install() -> dict[str, str]:
    """Make stock mamba_ssm import and run on this machine through compressm_kernels (idempotent).

    Returns:
        what was done, ``{component: description}``.
    """
    done = {}
    placeholder = sys.modules.get("selective_scan_cuda")
    if placeholder is not None and not hasattr(placeholder, "fwd"):
        # An empty stand-in registered earlier (and maybe already bound by mamba_ssm): fill it in place.
        placeholder.__dict__.update(fwd=fwd, bwd=bwd, **{_MARK: True})
    if _needs_shim("selective_scan_cuda"):
        sys.modules["selective_scan_cuda"] = _shim("selective_scan_cuda", fwd=fwd, bwd=bwd)
    if getattr(sys.modules.get("selective_scan_cuda"), _MARK, False):
        done["selective_scan_cuda"] = "compressm_kernels.selective_scan_fn"
    else:
        done["selective_scan_cuda"] = "mamba_ssm's own extension"

    if importlib.util.find_spec("causal_conv1d") is not None:
        if _needs_shim("causal_conv1d_cuda"):
            sys.modules["causal_conv1d_cuda"] = _shim(
                "causal_conv1d_cuda", causal_conv1d_fwd=causal_conv1d_fwd, causal_conv1d_bwd=causal_conv1d_bwd,
                causal_conv1d_update=causal_conv1d_update)
        own = getattr(sys.modules.get("causal_conv1d_cuda"), _MARK, False)
        done["causal_conv1d_cuda"] = "PyTorch (compressm_kernels)" if own else "causal-conv1d's own extension"

    layer_norm = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
    if not isinstance(layer_norm.LayerNormFn, _ApplyRouter):
        layer_norm.LayerNormFn = _ApplyRouter(layer_norm.LayerNormFn, layer_norm_torch)
    done["layer_norm_fn"] = "PyTorch on CPU tensors, Triton on CUDA"
    gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    if not isinstance(gated.LayerNormFn, _ApplyRouter):
        gated.LayerNormFn = _ApplyRouter(gated.LayerNormFn, ssd.gated_norm)
    done["layernorm_gated"] = "PyTorch on CPU tensors, Triton on CUDA"

    routes = {"selective_state_update": _cpu_state_update,
              "mamba_chunk_scan_combined": ssd.chunk_scan_combined,
              "mamba_split_conv1d_scan_combined": ssd.split_conv1d_scan_combined,
              "causal_conv1d_varlen_states": ssd.conv_varlen_states}
    modules = [importlib.import_module("mamba_ssm." + name) for name in (
        "ops.triton.selective_state_update", "ops.triton.ssd_combined", "modules.mamba_simple", "modules.mamba2",
        "modules.mamba2_simple")]
    # causal-conv1d's Triton varlen helper, where mamba2 imported it from (without Triton, neither has it).
    if importlib.util.find_spec("causal_conv1d") is not None:
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module("causal_conv1d.causal_conv1d_varlen"))
    for module in modules:
        for fn, on_cpu in routes.items():
            current = getattr(module, fn, None)
            if current is not None and not getattr(current, _MARK, False):
                setattr(module, fn, _route(current, on_cpu))
    done["selective_state_update"] = "compressm_kernels.selective_state_update on CPU tensors, Triton on CUDA"
    done["mamba_chunk_scan_combined"] = "compressm_kernels.selective_scan_fn on CPU tensors, Triton on CUDA"
    done["mamba_split_conv1d_scan_combined"] = "compressm_kernels.selective_scan_fn on CPU tensors, Triton on CUDA"
    done["causal_conv1d_varlen_states"] = "PyTorch on CPU tensors, Triton on CUDA"
    return done
