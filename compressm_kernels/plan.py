"""Rank selection: from Hankel energies to an inspectable :class:`CompressionPlan` (MATH.md §2).

How many states: CompreSSM's τ rule ``r = min{k : Σ_{i≤k} σ_i ≥ (1 − τ) Σ σ}`` (plain sum), a fixed
``rank`` or a ``fraction`` of the current N, never below ``min_rank``; a layer (or, per channel, a channel)
is reduced only if ``r < gate · N_current`` (the paper's 5 % gate, ``gate=0.95``).
Which states: the r largest per-state energies (modal truncation keeps A diagonal and B/C shared).

* ``mode="shared"``: one kept set per layer, N shrinks physically. r comes from the layer's spectrum (the
  channels' sorted σ summed on the common scale) and the states from the summed per-state energies.
* ``mode="channel"``: each channel its own r_d from its own σ and its own top-r_d states → a ``(D, N)``
  mask; states no channel keeps are removed physically as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .hankel import HankelEnergies

Mode = Literal["shared", "channel"]


def rank_from_tau(sigma: Tensor, tau: float) -> Tensor:
    """``min{k : Σ_{i≤k} σ_i ≥ (1 − τ) Σ σ}`` along the last axis of descending ``sigma`` (int64, ≥ 1)."""
    csum = sigma.cumsum(-1)
    need = (1.0 - tau) * csum[..., -1:]
    # Tiny relative slack so that exact ties (e.g. τ chosen to hit a partial sum) do not add a state.
    reached = csum >= need * (1 - 1e-12)
    return (reached.float().argmax(-1) + 1).clamp_min(1)


def check_selection(tau: float | None, rank: int | None, fraction: float | None, min_rank: int, gate: float) -> None:
    """``ValueError`` unless exactly one of tau/rank/fraction is given and every value is in range."""
    given = [n for n, v in (("tau", tau), ("rank", rank), ("fraction", fraction)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of tau, rank, fraction (got {', '.join(given) or 'none'})")
    if tau is not None and not (isinstance(tau, int | float) and 0.0 < tau < 1.0):
        raise ValueError(f"tau must be a number in (0, 1), got {tau!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if fraction is not None and not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if not (isinstance(gate, int | float) and 0.0 < gate <= 1.0):
        raise ValueError(f"gate must be a number in (0, 1], got {gate!r}")


@dataclass
class LayerPlan:
    """What compression does to one mixer; nothing has changed when you read it.

    Attributes:
        name: the mixer's qualified module name.
        kind: ``"compressm"``, ``"mamba_ssm"``, ``"transformers"`` or ``"mamba"``.
        n_before: the current physical state size N.
        keep: int64 indices (into the current states) that stay physically, ascending.
        mask: ``(D, len(keep))`` per-channel mask on the kept states (channel mode), else ``None``.
        rank: the layer's chosen r (shared) or the mean channel rank (channel mode).
        energy_kept: fraction of the layer's summed per-state energy in the kept states.
        hsv_kept: fraction of the layer's Hankel spectrum that the chosen rank keeps.
        reduce: False when the gate (or rank == N) leaves the layer as it is.
        energies: the analysis it was made from.
    """

    name: str
    kind: str
    n_before: int
    keep: Tensor
    mask: Tensor | None
    rank: float
    energy_kept: float
    hsv_kept: float
    reduce: bool
    energies: HankelEnergies = field(repr=False)

    @property
    def n_after(self) -> int:
        return int(self.keep.numel()) if self.reduce else self.n_before

    def __str__(self) -> str:
        what = "cut" if self.reduce else "keep (gate)"
        per = None if self.mask is None else self.mask.sum(1)
        ranks = "" if per is None else f", channel ranks {per.min().item()}-{per.max().item()}"
        return (f"{self.name} [{self.kind}]: N {self.n_before} -> {self.n_after} ({what}{ranks}), "
                f"energy kept {self.energy_kept:.4f}, HSV kept {self.hsv_kept:.4f}, "
                f"kept {self.keep.tolist() if self.reduce else 'all'}")


@dataclass
class CompressionPlan:
    """Per-layer plans, inspectable and printable before anything is applied."""

    layers: list[LayerPlan]
    mode: Mode

    def __str__(self) -> str:
        total_before = sum(p.n_before for p in self.layers)
        total_after = sum(p.n_after for p in self.layers)
        head = f"CompressionPlan ({self.mode}): {len(self.layers)} mixers, total N {total_before} -> {total_after}"
        return "\n".join([head] + ["  " + str(p) for p in self.layers])

    @property
    def changes(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.reduce]

    def state_sizes(self) -> dict[str, int]:
        return {p.name: p.n_after for p in self.layers}


def _target_rank(spectrum: Tensor, n: Tensor | int, tau: float | None, rank: int | None,
                 fraction: float | None, min_rank: int) -> Tensor:
    """Ranks for descending spectra ``(..., N)``; ``n`` is the current size of each (tensor or int)."""
    n_t = torch.as_tensor(n, device=spectrum.device).expand(spectrum.shape[:-1])
    if tau is not None:
        r = rank_from_tau(spectrum, tau)
    elif rank is not None:
        r = torch.full_like(n_t, rank)
    else:
        r = torch.ceil(n_t.double() * fraction).long()
    return torch.minimum(r.clamp_min(min_rank), n_t)


def plan_layer(name: str, kind: str, energies: HankelEnergies, *, mode: Mode = "shared", tau: float | None = None,
               rank: int | None = None, fraction: float | None = None, min_rank: int = 1, gate: float = 0.95,
               state_mask: Tensor | None = None) -> LayerPlan:
    """Choose one layer's kept states from its :class:`HankelEnergies` (``state_mask``: its current mask)."""
    check_selection(tau, rank, fraction, min_rank, gate)
    dim, n = energies.energy.shape
    if rank is not None and rank > n:
        raise ValueError(f"rank={rank} exceeds the current state size N={n} of {name}")
    dev = energies.energy.device
    if mode == "shared":
        spectrum = energies.layer_spectrum()
        total_e = energies.layer_energy()
        r = int(_target_rank(spectrum, n, tau, rank, fraction, min_rank))
        reduce = r < gate * n and r < n
        keep = torch.sort(torch.topk(total_e, r).indices).values if reduce else torch.arange(n, device=dev)
        energy_kept = float(total_e[keep].sum() / total_e.sum().clamp_min(1e-300))
        hsv_kept = float(spectrum[:r].sum() / spectrum.sum().clamp_min(1e-300))
        return LayerPlan(name, kind, n, keep.cpu(), None, float(r), energy_kept, hsv_kept, reduce, energies)
    if mode != "channel":
        raise ValueError(f"mode must be 'shared' or 'channel', got {mode!r}")
    current = torch.ones(dim, n, dtype=torch.bool, device=dev) if state_mask is None else \
        state_mask.to(dev).bool().expand(dim, n)
    n_cur = current.sum(1)
    r = _target_rank(energies.sigma, n_cur, tau, rank, fraction, min_rank)
    r = torch.where(r < gate * n_cur, r, n_cur)  # the gate, per channel
    energy = energies.energy.masked_fill(~current, -1.0)
    order = energy.argsort(dim=1, descending=True)
    mask = torch.zeros_like(current)
    mask.scatter_(1, order, torch.arange(n, device=dev).expand(dim, n) < r[:, None])
    mask &= current
    keep = mask.any(0).nonzero().flatten()
    reduce = bool((mask != current).any())
    weights = energies.channel_weights()
    e = energies.energy * weights
    energy_kept = float((e * mask).sum() / (e * current).sum().clamp_min(1e-300))
    s = energies.sigma * weights
    ranks_mask = torch.arange(n, device=dev)[None, :] < r[:, None]
    hsv_kept = float((s * ranks_mask).sum() / s.sum().clamp_min(1e-300))
    if not reduce:
        keep = torch.arange(n, device=dev)
    return LayerPlan(name, kind, n, keep.cpu(), mask[:, keep].cpu() if reduce else None,
                     float(r.double().mean()), energy_kept, hsv_kept, reduce, energies)


def ranking_agreement(a: Tensor, b: Tensor, k: int) -> tuple[float, float]:
    """Overlap of the top-k sets and Spearman rank correlation of two ``(N,)`` energy vectors."""
    n = a.numel()
    k = max(1, min(k, n))
    top_a, top_b = set(torch.topk(a, k).indices.tolist()), set(torch.topk(b, k).indices.tolist())
    overlap = len(top_a & top_b) / k
    if n < 2:
        return overlap, 1.0
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    rho = float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum())))
    return overlap, rho
