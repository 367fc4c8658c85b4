"""mamba_ssm's Mamba-2 (SSD) ops as our selective scan; :mod:`.mamba_ssm` and :mod:`.transformers` route CPU
tensors here.

Mamba-2's scan is a selective scan whose A is one scalar per head, shared by the head's ``headdim``
channels and all its states, and whose Δ is one per head and step. Channel ``c = h·P + p`` of an input
``(Bt, L, H, P)`` takes head h's Δ and A, and B/C group ``g = h // (H / G)``, which is exactly the
grouped-B/C layout of :func:`compressm_kernels.selective_scan_fn` (channel d uses group ``d // (D / G)``).
So each op here is a reshape around that function (the C++ kernel and its backward on CPU), with
PyTorch for the rest; everything is differentiable through autograd. mamba_ssm's chunked SSD algorithm
gives the same result up to rounding.

What mamba_ssm's ops take but these do not (``seq_idx``, ``cu_seqlens``, varlen states: variable-length
batches) raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv1d import causal_conv1d
from ..ops.selective_scan import cpu as cpu_backend
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update


def _unsupported(fn: str, **values: object) -> None:
    for name, value in values.items():
        if value is not None and value is not False:
            raise NotImplementedError(f"mamba_ssm {fn} on CPU (compressm_kernels): {name} is not supported")


def _per_channel(t: Tensor, headdim: int) -> Tensor:
    """A per-head ``(H,)`` or per-channel ``(H, P)`` parameter as ``(H·P,)`` fp32."""
    return (t.repeat_interleave(headdim) if t.dim() == 1 else t.reshape(-1)).float()


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, math.inf), return_final_states: bool = False,
             initial_states: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's selective scan, ``mamba_chunk_scan_combined``'s math without its chunking.

    Args:
        x: ``(Bt, L, H, P)``; dt: ``(Bt, L, H)`` (``+ dt_bias``, softplus if ``dt_softplus``, then
            clamped to ``dt_limit``, in fp32); A: ``(H,)``; B, C: ``(Bt, L, G, N)`` with G dividing H;
            D: optional ``(H,)`` or ``(H, P)``; z: optional ``(Bt, L, H, P)`` gate (``out · silu(z)``);
            initial_states: optional ``(Bt, H, P, N)`` state before step 0 (zero without).
    Returns:
        ``out`` ``(Bt, L, H, P)`` in x's dtype, or ``(out, final_states)`` with ``final_states``
        ``(Bt, H, P, N)`` fp32.
    """
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(f"dt must have shape (Bt, L, H) = {(batch, seqlen, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must have shape (H,) = ({nheads},), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[:2] != (batch, seqlen) or nheads % t.shape[2] != 0 or t.shape != B.shape:
            raise ValueError(f"{name} must have shape (Bt, L, G, N) with Bt={batch}, L={seqlen} and G dividing "
                             f"H={nheads} (B and C alike), got {tuple(t.shape)}")
    dstate = B.shape[-1]
    expected = {"D": ((nheads,), (nheads, headdim)), "z": (tuple(x.shape),), "dt_bias": ((nheads,),),
                "initial_states": ((batch, nheads, headdim, dstate),)}
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias), ("initial_states", initial_states)):
        if t is not None and tuple(t.shape) not in expected[name]:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, expected[name]))}, got {tuple(t.shape)}")
    delta = dt.float()
    if dt_bias is not None:
        delta = delta + dt_bias.float()
    if dt_softplus:
        delta = F.softplus(delta)
    delta = delta.clamp(dt_limit[0], dt_limit[1])  # always, as mamba_ssm: the default (0, inf) clamps at 0

    def channels(t: Tensor) -> Tensor:  # (Bt, L, H, P) -> (Bt, H·P, L)
        return t.reshape(batch, seqlen, nheads * headdim).transpose(1, 2)

    gate_here = z is not None and initial_states is not None  # the initial state's share goes in before the gate
    out = selective_scan_fn(
        channels(x),
        delta.transpose(1, 2).repeat_interleave(headdim, dim=1),
        A.float().repeat_interleave(headdim)[:, None].expand(nheads * headdim, dstate).contiguous(),
        B.permute(0, 2, 3, 1),
        C.permute(0, 2, 3, 1),
        None if D is None else _per_channel(D, headdim),
        None if z is None or gate_here else channels(z),
        return_last_state=return_final_states,
    )
    y, last = out if return_final_states else (out, None)
    y = y.transpose(1, 2).reshape(batch, seqlen, nheads, headdim)
    if last is not None:
        last = last.view(batch, nheads, headdim, dstate)
    if initial_states is not None:
        # The scan starts from zero; the initial state adds linearly. With one A per head it has decayed by
        # exp(Σ_{s<=t} Δ_s A) at step t, the same for all its states: y_t += that · C_t·h0, final += that at L-1.
        decay = torch.exp(torch.cumsum(delta * A.float(), dim=1))  # (Bt, L, H)
        h0 = initial_states.float()
        C_heads = C.float().repeat_interleave(nheads // C.shape[2], dim=2)  # (Bt, L, H, N)
        y = (y.float() + decay[..., None] * torch.einsum("blhn,bhpn->blhp", C_heads, h0))
        if gate_here:
            y = y * F.silu(z.float())
        y = y.to(x.dtype)
        if last is not None:
            last = last + decay[:, -1, :, None, None] * h0
    return y if last is None else (y, last)


def chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                        seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                        return_final_states=False, return_varlen_states=False):
    """mamba_ssm's ``mamba_chunk_scan_combined`` (same arguments and returns; ``chunk_size`` is unused)."""
    _unsupported("mamba_chunk_scan_combined", seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                 return_varlen_states=return_varlen_states)
    return ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, return_final_states, initial_states)


def multi_head_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                            dt_softplus: bool = False) -> Tensor:
    """Mamba-2's decode step (mamba_ssm's multi-head ``selective_state_update``), state updated in place: state
    ``(Bt, H, P, N)``, x/dt/z ``(Bt, H, P)``, A ``(H, P, N)``, B/C ``(Bt, G, N)`` with G dividing H, D/dt_bias
    ``(H, P)``. Runs :func:`compressm_kernels.selective_state_update` on the heads' channels flattened, B/C groups
    over them as over heads; x, dt, A, D, dt_bias may be expanded views (mamba_ssm and transformers pass them so).
    An A expanded along N (one value per head) gets one decay per channel, not one per state."""
    # The kernel flattens the heads itself and checks every argument before it writes the state; on a refusal
    # (or with no kernel) the checks below say what is wrong, or the reference step runs.
    out = cpu_backend.try_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, multi_head=True)
    if out is not None:
        return out
    batch, nheads, headdim, dstate = state.shape
    channels = nheads * headdim
    expected = {"x": (batch, nheads, headdim), "dt": (batch, nheads, headdim), "A": (nheads, headdim, dstate),
                "D": (nheads, headdim), "z": (batch, nheads, headdim), "dt_bias": (nheads, headdim)}
    for name, t in (("x", x), ("dt", dt), ("A", A), ("D", D), ("z", z), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"selective_state_update with a (Bt, H, P, N) state: {name} must have shape "
                             f"{expected[name]}, got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape != B.shape or t.shape[0] != batch or nheads % t.shape[1] or t.shape[2] != dstate:
            raise ValueError(f"selective_state_update with a (Bt, H, P, N) state: {name} must have shape (Bt, G, N) "
                             f"with G dividing H={nheads} (B and C alike), got {tuple(t.shape)}")
    flat = state.reshape(batch, channels, dstate)  # a view when it can be, else a copy written back below
    A_flat = A[..., :1].reshape(channels, 1).expand(-1, dstate) if A.stride(-1) == 0 else A.reshape(channels, dstate)
    y = selective_state_update(flat, x.reshape(batch, channels), dt.reshape(batch, channels), A_flat, B, C,
                               None if D is None else D.reshape(channels),
                               None if z is None else z.reshape(batch, channels),
                               None if dt_bias is None else dt_bias.reshape(channels), dt_softplus)
    if flat.data_ptr() != state.data_ptr():
        state.copy_(flat.view_as(state))
    return y.view(batch, nheads, headdim)


def gated_norm(x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor | None = None, eps: float = 1e-6,
               group_size: int | None = None, norm_before_gate: bool = True, is_rms_norm: bool = False) -> Tensor:
    """mamba_ssm's gated LayerNorm/RMSNorm (``layernorm_gated``) in PyTorch, fp32 math, x's dtype out.

    Normalises each group of ``group_size`` features (all of them by default), then ``· weight + bias``;
    with ``z``, multiplies by ``silu(z)`` after the norm (``norm_before_gate``) or before it."""
    features = x.shape[-1]
    for name, t, shape in (("z", z, x.shape), ("weight", weight, (features,)), ("bias", bias, (features,))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    h = x.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        h = h * gate
    size = features if group_size is None else group_size
    if features % size != 0:
        raise ValueError(f"group_size {size} must divide the feature size {features}")
    groups = h.unflatten(-1, (features // size, size))
    if not is_rms_norm:
        groups = groups - groups.mean(-1, keepdim=True)
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if bias is not None:
        y = y + bias.float()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


def split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                               seq_idx=None, dt_limit=(0.0, math.inf), return_final_states=False, activation="silu",
                               rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                               headdim=None, ngroups=1, norm_before_gate=True):
    """mamba_ssm's ``mamba_split_conv1d_scan_combined``, the Mamba-2 layer after ``in_proj``: split
    ``zxbcdt`` into ``[z0, x0,] z, xBC, dt``, causal conv of xBC, the scan, gated RMSNorm (per group of
    ``dim / ngroups`` features), ``silu(z0) · x0`` in front, then ``out_proj``. Same arguments and returns."""
    _unsupported("mamba_split_conv1d_scan_combined", seq_idx=seq_idx)
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if outproj_bias is not None and outproj_weight is None:
        raise ValueError("outproj_bias needs outproj_weight")
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is needed when D has shape (H,)")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    batch, seqlen, width = zxbcdt.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_mlp = (width - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_mlp < 0 or width != 2 * d_mlp + 2 * dim + 2 * ngroups * dstate + nheads:
        raise ValueError(f"zxbcdt's last axis {width} does not split as 2·d_mlp + 2·{dim} + 2·{ngroups}·{dstate} + "
                         f"{nheads} (dim, ngroups, dstate, nheads)")
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    heads = (batch, seqlen, nheads, headdim)
    groups = (batch, seqlen, ngroups, dstate)
    out = ssd_scan(x.reshape(heads), dt, A, B.reshape(groups), C.reshape(groups), D,
                   z.reshape(heads) if rmsnorm_weight is None else None, dt_bias, True, dt_limit, return_final_states,
                   initial_states)
    y, final = out if return_final_states else (out, None)
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = gated_norm(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate, is_rms_norm=True)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight.to(y.dtype), None if outproj_bias is None else outproj_bias.to(y.dtype))
    return y if final is None else (y, final)
