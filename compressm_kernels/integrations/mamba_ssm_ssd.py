"""mamba_ssm's Mamba-2 (SSD) ops as our selective scan; :mod:`.mamba_ssm` and :mod:`.transformers` route CPU
tensors here.

Mamba-2's scan is a selective scan whose A is one scalar per head, shared by the head's ``headdim``
channels and all its states, and whose Δ is one per head and step. Channel ``c = h·P + p`` of an input
``(Bt, L, H, P)`` takes head h's Δ and A, and B/C group ``g = h // (H / G)``, which is exactly the
grouped-B/C layout of :func:`compressm_kernels.selective_scan_fn` (channel d uses group ``d // (D / G)``).
So each op here is a reshape around that function (the C++ kernel and its backward on CPU), with
PyTorch for the rest; everything is differentiable through autograd. mamba_ssm's chunked SSD algorithm
gives the same result up to rounding.

Packed variable-length batches (``seq_idx``, and ``cu_seqlens`` for each sequence's final state) run each
sequence as a row of its own (:class:`PackedRuns`).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv1d import causal_conv1d
from ..ops.selective_scan import cpu as cpu_backend
from ..ops.selective_scan import selective_scan_fn
from ..ops.state_update import selective_state_update


class PackedRuns:
    """mamba_ssm's packed sequences as rows of their own.

    ``seq_idx`` ``(Bt, L)`` labels each position with the sequence packed there, and mamba_ssm's kernels reset
    the scan's state and the conv's history wherever the label changes. Each run of equal labels becomes a row
    of ``(R, W)`` (R runs, W the longest), left-aligned and followed by zeros, which change nothing before them
    (the conv is causal) nor after (the scan gets Δ = 0 there: ā = 1 and no input), so a row's last state is
    its run's final state.

    The labels must be sequence indices as mamba_ssm builds them from ``cu_seqlens``: a label that came back after
    another would join its sequence again in causal-conv1d's window (and in mamba_ssm's scan within a chunk), which
    runs cannot express, so it is refused. Negative labels (padding, whose conv output is 0) may repeat."""

    def __init__(self, seq_idx: Tensor, batch: int, seqlen: int) -> None:
        integer = isinstance(seq_idx, Tensor) and not seq_idx.is_floating_point() and not seq_idx.is_complex() \
            and seq_idx.dtype != torch.bool
        if not integer or seq_idx.shape != (batch, seqlen):
            raise ValueError(f"seq_idx must be an integer tensor of shape (Bt, L) = {(batch, seqlen)}, got "
                             f"{getattr(seq_idx, 'dtype', type(seq_idx).__name__)} of shape "
                             f"{tuple(getattr(seq_idx, 'shape', ()))}")
        labels = seq_idx.detach().cpu()
        starts_run = torch.ones(batch, seqlen, dtype=torch.bool)
        starts_run[:, 1:] = labels[:, 1:] != labels[:, :-1]
        run = torch.cumsum(starts_run.flatten(), 0) - 1  # each position's run, rows in order
        starts = starts_run.flatten().nonzero().flatten()
        _refuse_labels_coming_back(labels.flatten()[starts], starts, seqlen)
        self.lengths = torch.diff(starts, append=torch.tensor([batch * seqlen]))
        self.count, self.width, self.shape = len(starts), int(self.lengths.max()), (batch, seqlen)
        position = torch.arange(batch * seqlen) - starts[run]
        self.index = (run * self.width + position).to(seq_idx.device)  # where each position goes in the rows
        self.first_run, self.last_run = run.view(batch, seqlen)[:, 0], run.view(batch, seqlen)[:, -1]
        self.first_label = labels[:, 0]

    def unpack(self, t: Tensor, dim: int = 1) -> Tensor:
        """``t`` (batch axis 0, time axis ``dim``) with each run as a row: ``(R, ..., W, ...)``."""
        moved = t.movedim(dim, 1)
        rest = moved.shape[2:]
        rows = moved.new_zeros(self.count * self.width, *rest).index_copy(0, self.index, moved.reshape(-1, *rest))
        return rows.view(self.count, self.width, *rest).movedim(1, dim)

    def repack(self, t: Tensor, dim: int = 1) -> Tensor:
        """The inverse of :meth:`unpack`: ``(R, ..., W, ...)`` back to ``(Bt, ..., L, ...)``."""
        moved = t.movedim(dim, 1)
        rest = moved.shape[2:]
        flat = moved.reshape(self.count * self.width, *rest).index_select(0, self.index)
        return flat.view(*self.shape, *rest).movedim(1, dim)

    def first_runs(self, per_row: Tensor, rows: Tensor | None = None) -> Tensor:
        """``(Bt, ...)`` values (a state before step 0) as ``(R, ...)``: each batch row's value goes to its first
        run (only for the ``rows`` marked True, when given), zeros to the others."""
        rows = torch.ones(self.shape[0], dtype=torch.bool) if rows is None else rows
        index = self.first_run[rows].to(per_row.device)
        out = per_row.new_zeros(self.count, *per_row.shape[1:])
        return out.index_copy(0, index, per_row[rows.to(per_row.device)])


def _refuse_labels_coming_back(run_labels: Tensor, run_starts: Tensor, seqlen: int) -> None:
    seen: set[tuple[int, int]] = set()
    for label, start in zip(run_labels.tolist(), run_starts.tolist(), strict=True):
        row = start // seqlen
        if label >= 0 and (row, label) in seen:
            raise ValueError(f"seq_idx: label {label} comes back at position {start % seqlen} of row {row} after "
                             "another label; each packed sequence must be one run (labels are sequence indices, as "
                             "mamba_ssm builds them from cu_seqlens)")
        seen.add((row, label))


def _check_cu_seqlens(cu_seqlens: Tensor, total: int) -> list[int]:
    """``cu_seqlens`` as a list of offsets, checked: 1-D integers from 0, non-decreasing, ending at ``total``."""
    ok = isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and len(cu_seqlens) >= 2 \
        and not cu_seqlens.is_floating_point() and cu_seqlens.dtype != torch.bool
    offsets = cu_seqlens.tolist() if ok else []
    if not ok or offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of sequence offsets from 0 to {total}, "
                         f"non-decreasing, got {cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens}")
    return offsets


def _per_channel(t: Tensor, headdim: int) -> Tensor:
    """A per-head ``(H,)`` or per-channel ``(H, P)`` parameter as ``(H·P,)`` fp32."""
    return (t.repeat_interleave(headdim) if t.dim() == 1 else t.reshape(-1)).float()


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
             dt_limit: tuple[float, float] = (0.0, math.inf), return_final_states: bool = False,
             initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
             cu_seqlens: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
    """Mamba-2's selective scan, ``mamba_chunk_scan_combined``'s math without its chunking.

    Args:
        x: ``(Bt, L, H, P)``; dt: ``(Bt, L, H)`` (``+ dt_bias``, softplus if ``dt_softplus``, then
            clamped to ``dt_limit``, in fp32); A: ``(H,)``; B, C: ``(Bt, L, G, N)`` with G dividing H;
            D: optional ``(H,)`` or ``(H, P)``; z: optional ``(Bt, L, H, P)`` gate (``out · silu(z)``);
            initial_states: optional ``(Bt, H, P, N)`` state before step 0 (zero without).
        seq_idx: optional ``(Bt, L)`` integer labels of packed sequences: the state restarts from zero wherever
            the label changes. As in mamba_ssm, a row's initial state goes to its first sequence only if that
            one's label is 0, and ``final_states`` is the state at the row's end (its last sequence's).
        cu_seqlens: optional ``(S + 1,)`` offsets of the S sequences of a one-row batch (their labels in
            ``seq_idx``); given, each one's final state is returned too (mamba_ssm's ``varlen_states``).
    Returns:
        ``out`` ``(Bt, L, H, P)`` in x's dtype; then ``final_states`` ``(Bt, H, P, N)`` fp32 if
        ``return_final_states``; then ``varlen_states`` ``(S, H, P, N)`` if ``cu_seqlens``: a tuple when
        there is more than ``out``.
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
    if seq_idx is None:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens needs seq_idx labelling the same sequences: mamba_ssm restarts the scan "
                             "only where seq_idx changes")
        y, last = _scan(x, delta, A, B, C, D, z, return_final_states, initial_states)
        return y if last is None else (y, last)
    runs = PackedRuns(seq_idx, batch, seqlen)
    if cu_seqlens is not None:
        lengths = torch.diff(torch.tensor(_check_cu_seqlens(cu_seqlens, batch * seqlen)))
        if batch != 1 or not torch.equal(lengths, runs.lengths):
            raise ValueError(f"cu_seqlens must be the offsets of the sequences seq_idx labels in a one-row batch: "
                             f"lengths {runs.lengths.tolist()}, got cu_seqlens {cu_seqlens.tolist()} for Bt={batch}")
    if initial_states is not None:
        initial_states = runs.first_runs(initial_states, rows=runs.first_label == 0)
    x, delta, B, C, z = (None if t is None else runs.unpack(t) for t in (x, delta, B, C, z))
    y, last = _scan(x, delta, A, B, C, D, z, return_final_states or cu_seqlens is not None, initial_states)
    out = [runs.repack(y)]
    if return_final_states:
        out.append(last.index_select(0, runs.last_run.to(last.device)))
    if cu_seqlens is not None:
        out.append(last)
    return out[0] if len(out) == 1 else tuple(out)


def _scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
          return_final_states: bool, initial_states: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """ssd_scan on checked inputs and the fp32 Δ ``(Bt, L, H)``: ``(out, final_states or None)``."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]

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
    return y, last


def chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                        seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                        return_final_states=False, return_varlen_states=False):
    """mamba_ssm's ``mamba_chunk_scan_combined`` (same arguments and returns; ``chunk_size`` is unused)."""
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states needs cu_seqlens")
    return ssd_scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, return_final_states, initial_states,
                    seq_idx, cu_seqlens if return_varlen_states else None)


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
    if state.device.type == "cpu":
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


def packed_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                         seq_idx: Tensor | None) -> Tensor:
    """:func:`compressm_kernels.ops.conv1d.causal_conv1d` of ``x`` ``(Bt, D, L)``, with ``seq_idx`` as causal-conv1d
    takes it: each packed sequence's window starts from zeros, and positions labelled below 0 output 0."""
    if seq_idx is None:
        return causal_conv1d(x, weight, bias, activation)
    runs = PackedRuns(seq_idx, x.shape[0], x.shape[-1])
    out = runs.repack(causal_conv1d(runs.unpack(x, dim=2), weight, bias, activation), dim=2)
    return out.masked_fill((seq_idx < 0).to(out.device)[:, None, :], 0.0)


def conv_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """causal-conv1d's ``causal_conv1d_varlen_states``: for x ``(total, D)`` holding the sequences that
    ``cu_seqlens`` delimits, each one's last ``state_len`` inputs as a conv state ``(S, D, state_len)``, zeros in
    front of a shorter sequence."""
    if x.dim() != 2:
        raise ValueError(f"x must have shape (total, D), got {tuple(x.shape)}")
    offsets = _check_cu_seqlens(cu_seqlens, x.shape[0])
    states = x.new_zeros(len(offsets) - 1, state_len, x.shape[1])
    for i, (start, end) in enumerate(itertools.pairwise(offsets)):
        kept = min(end - start, state_len)
        if kept > 0:
            states[i, state_len - kept:] = x[end - kept:end]
    return states.transpose(1, 2)  # channel-last memory, as causal-conv1d's


def split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                               seq_idx=None, dt_limit=(0.0, math.inf), return_final_states=False, activation="silu",
                               rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None,
                               headdim=None, ngroups=1, norm_before_gate=True):
    """mamba_ssm's ``mamba_split_conv1d_scan_combined``, the Mamba-2 layer after ``in_proj``: split
    ``zxbcdt`` into ``[z0, x0,] z, xBC, dt``, causal conv of xBC, the scan, gated RMSNorm (per group of
    ``dim / ngroups`` features), ``silu(z0) · x0`` in front, then ``out_proj``. Same arguments and returns."""
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
    xBC = packed_causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation, seq_idx).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    heads = (batch, seqlen, nheads, headdim)
    groups = (batch, seqlen, ngroups, dstate)
    out = ssd_scan(x.reshape(heads), dt, A, B.reshape(groups), C.reshape(groups), D,
                   z.reshape(heads) if rmsnorm_weight is None else None, dt_bias, True, dt_limit, return_final_states,
                   initial_states, seq_idx)
    y, final = out if return_final_states else (out, None)
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = gated_norm(y, rmsnorm_weight, None, z, rmsnorm_eps, dim // ngroups, norm_before_gate, is_rms_norm=True)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight.to(y.dtype), None if outproj_bias is None else outproj_bias.to(y.dtype))
    return y if final is None else (y, final)
