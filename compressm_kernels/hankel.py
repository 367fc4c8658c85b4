"""Hankel singular values and per-state energies of a Mamba layer's mean-LTI surrogate (MATH.md §2).

A selective (input-dependent) layer is reduced through one diagonal LTI system per channel d, built from
second moments of calibration activations, accumulated in float64 without keeping the activations:

    ā[d,n] = E[exp(Δ[d] A[d,n])]
    M_B[d] = E[(Δ[d] u[d])² B Bᵀ]      (scale="input": the input energy is part of the drive)
           = E[Δ[d]² B Bᵀ]             (scale="normalize": then each channel's spectrum is normalised)
    M_C    = E[C Cᵀ]

Closed-form Gramians of the diagonal system (no Lyapunov solver):
``P = M_B / (1 − ā āᵀ)``, ``Q = M_C / (1 − ā āᵀ)``; Hankel singular values ``σ = sqrt(eig(P Q))``
(computed as the eigenvalues of the symmetric ``P^½ Q P^½``, real and ≥ 0); per-state energies
``e[d,n] = sqrt(P_nn Q_nn)``.

**Scale convention.** σ and e of one channel scale with the size of what drives it. Comparing or summing
them across channels (layer-shared mode) needs a convention: ``"input"`` (default) measures the drive
actually injected, Δ·B·u, so a channel whose input is twice as large counts twice; ``"normalize"`` leaves
u out and divides each channel's σ and e by that channel's Σσ, so every channel gets one equal vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scale = Literal["input", "normalize"]
SCALES = ("input", "normalize")
# Positions per chunk are chosen so a chunk's (D, T, N) / (N², T) temporaries hold ~4M float64 elements.
_CHUNK_ELEMENTS = 1 << 22


def lti_gramians(a_bar: Tensor, M_B: Tensor, M_C: Tensor) -> tuple[Tensor, Tensor]:
    """Controllability and observability Gramians of diagonal discrete systems, in closed form.

    Args:
        a_bar: ``(..., N)`` diagonal of Ā, each entry in (-1, 1).
        M_B: ``(..., N, N)`` B̄B̄ᵀ (or its average over inputs).
        M_C: ``(..., N, N)`` C̄ᵀC̄ (broadcastable against M_B).
    Returns:
        ``P, Q`` solving ``P = Ā P Ā + M_B`` and ``Q = Ā Q Ā + M_C``.
    """
    denom = 1.0 - a_bar.unsqueeze(-1) * a_bar.unsqueeze(-2)
    return M_B / denom, M_C / denom


def _psd_sqrt(M: Tensor) -> Tensor:
    lam, V = torch.linalg.eigh(M)
    return (V * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def hankel_singular_values(P: Tensor, Q: Tensor) -> Tensor:
    """``sqrt(eig(P Q))`` for symmetric PSD ``P, Q`` ``(..., N, N)``: ``(..., N)``, real, ≥ 0, descending.

    Computed as the singular values of ``P^½ Q^½`` (same values: ``eig(PQ) = eig(P^½ Q P^½)``): real by
    construction, no complex eigensolver, no Cholesky factor (which fails for singular P), and no squaring,
    so small σ keep more digits than ``sqrt(eig(PQ))`` gives.
    """
    return torch.linalg.svdvals(_psd_sqrt(P) @ _psd_sqrt(Q))


def state_energies(P: Tensor, Q: Tensor) -> Tensor:
    """Per-state energies ``sqrt(P_nn Q_nn)`` ``(..., N)``: how much state n carries in the original coordinates."""
    return (P.diagonal(dim1=-2, dim2=-1) * Q.diagonal(dim1=-2, dim2=-1)).clamp_min(0).sqrt()


@dataclass
class HankelEnergies:
    """Hankel analysis of one layer (or of plain arrays).

    Attributes:
        a_bar: ``(D, N)`` mean discretized decay.
        sigma: ``(D, N)`` Hankel singular values per channel, descending (float64).
        energy: ``(D, N)`` per-state energies, indexed like the states (float64).
        scale: the convention that makes channels comparable (see the module docstring).
        count: the number of (batch, time) positions averaged (0 for plain arrays).
    """

    a_bar: Tensor
    sigma: Tensor
    energy: Tensor
    scale: Scale = "input"
    count: float = 0.0

    def channel_weights(self) -> Tensor:
        """``(D, 1)`` factors that put channels on the common scale (ones for ``"input"``)."""
        if self.scale == "input":
            return torch.ones_like(self.sigma[:, :1])
        total = self.sigma.sum(dim=1, keepdim=True)
        return torch.where(total > 0, 1.0 / total, torch.zeros_like(total))

    def layer_spectrum(self) -> Tensor:
        """``(N,)`` the channels' sorted spectra summed on the common scale: the layer's HSV profile."""
        return (self.sigma * self.channel_weights()).sum(dim=0)

    def layer_energy(self) -> Tensor:
        """``(N,)`` per-state energies summed over channels on the common scale: which states matter to the layer."""
        return (self.energy * self.channel_weights()).sum(dim=0)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite value(s); refusing to rank states from it")


def hankel_from_moments(a_bar: Tensor, M_B: Tensor, M_C: Tensor, *, scale: Scale = "input",
                        state_mask: Tensor | None = None, count: float = 0.0) -> HankelEnergies:
    """Hankel analysis from the surrogate's moments, batched over channels in float64.

    Args:
        a_bar: ``(D, N)`` decays in [0, 1).
        M_B: ``(D, N, N)`` drive second moments.
        M_C: ``(N, N)`` shared or ``(D, N, N)`` per-channel readout second moments.
        scale: ``"input"`` or ``"normalize"``.
        state_mask: optional bool ``(N,)`` or ``(D, N)``: masked states are excluded (zero σ share, zero energy).
    Returns:
        :class:`HankelEnergies`.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    a_bar, M_B, M_C = a_bar.double(), M_B.double(), M_C.double()
    for name, t in (("a_bar", a_bar), ("M_B", M_B), ("M_C", M_C)):
        _check_finite(name, t)
    if (a_bar.abs() >= 1).any():
        raise ValueError("a_bar has entries with |ā| >= 1 (Δ·A underflowed to 0?): the Gramians are unbounded")
    if state_mask is not None:
        keep = state_mask.to(device=a_bar.device, dtype=torch.float64).expand_as(a_bar)
        M_B = M_B * keep.unsqueeze(-1) * keep.unsqueeze(-2)  # P's masked rows/cols vanish: eig(PQ) is the kept block's
    P, Q = lti_gramians(a_bar, M_B, M_C)
    sigma = hankel_singular_values(P, Q.expand_as(P))
    energy = state_energies(P, Q.expand_as(P))
    _check_finite("Hankel singular values", sigma)
    _check_finite("state energies", energy)
    return HankelEnergies(a_bar=a_bar, sigma=sigma, energy=energy, scale=scale, count=count)


def hankel_from_arrays(A_bar: Tensor, B_bar: Tensor, C_bar: Tensor, *, scale: Scale = "input") -> HankelEnergies:
    """Hankel analysis of D diagonal LTI systems given as arrays.

    Args:
        A_bar: ``(D, N)`` diagonal of each channel's Ā, entries in (-1, 1).
        B_bar: ``(D, N)`` input vector or ``(D, N, m)`` input matrix of each channel.
        C_bar: ``(N,)`` shared, ``(D, N)`` per channel, or ``(D, p, N)`` output matrix of each channel.
    """
    if A_bar.dim() != 2:
        raise ValueError(f"A_bar must be (D, N), got shape {tuple(A_bar.shape)}")
    Bm = B_bar.double().unsqueeze(-1) if B_bar.dim() == 2 else B_bar.double()
    Cm = C_bar.double()
    Cm = Cm.reshape(1, 1, -1) if Cm.dim() == 1 else (Cm.unsqueeze(1) if Cm.dim() == 2 else Cm)
    if Bm.shape[:2] != A_bar.shape or Cm.shape[-1] != A_bar.shape[1]:
        raise ValueError(f"B_bar {tuple(B_bar.shape)} / C_bar {tuple(C_bar.shape)} do not match A_bar "
                         f"{tuple(A_bar.shape)}")
    return hankel_from_moments(A_bar, Bm @ Bm.transpose(-1, -2), Cm.transpose(-1, -2) @ Cm, scale=scale)


class HankelAccumulator:
    """Streaming float64 sums of the surrogate's moments over calibration batches (no activations kept).

    ``update`` adds one batch; ``all_reduce`` sums the accumulators of all distributed ranks (so every rank
    computes the same plan); ``energies`` turns the averages into :class:`HankelEnergies`.
    """

    def __init__(self, scale: Scale = "input") -> None:
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.scale = scale
        self.sum_a: Tensor | None = None  # (D, N)
        self.sum_MB: Tensor | None = None  # (D, N, N)
        self.sum_MC: Tensor | None = None  # (N, N)
        self.count: Tensor | None = None  # ()
        self.A: Tensor | None = None  # (D, N) fp64, the A the sums were taken with

    @torch.no_grad()
    def update(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, weight: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            u: ``(Bt, D, L)`` scan input.
            delta: ``(Bt, D, L)`` step sizes *after* bias and softplus.
            A: ``(D, N)`` negative state matrix.
            B, C: ``(Bt, N, L)``.
            weight: optional ``(Bt, L)`` position weights (0 for padding).
        """
        batch, dim, seqlen = u.shape
        dstate = A.shape[1]
        if delta.shape != u.shape or A.shape[0] != dim or B.shape != (batch, dstate, seqlen) or C.shape != B.shape:
            raise ValueError(f"calibration shapes disagree: u {tuple(u.shape)}, delta {tuple(delta.shape)}, "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
        for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("A", A)):
            _check_finite(f"calibration activation {name}", t)
        if self.A is not None and self.A.shape != A.shape:
            raise ValueError(f"A changed shape during accumulation: {tuple(self.A.shape)} -> {tuple(A.shape)}")
        dev = A.device
        A64 = A.double()
        u64 = u.double().permute(1, 0, 2).reshape(dim, -1)  # (D, P) positions flattened
        d64 = delta.double().permute(1, 0, 2).reshape(dim, -1)
        B64 = B.double().permute(1, 0, 2).reshape(dstate, -1)
        C64 = C.double().permute(1, 0, 2).reshape(dstate, -1)
        w64 = torch.ones(batch * seqlen, dtype=torch.float64, device=dev) if weight is None else \
            weight.double().reshape(-1).to(dev)
        if self.sum_a is None:
            self.sum_a = torch.zeros(dim, dstate, dtype=torch.float64, device=dev)
            self.sum_MB = torch.zeros(dim, dstate, dstate, dtype=torch.float64, device=dev)
            self.sum_MC = torch.zeros(dstate, dstate, dtype=torch.float64, device=dev)
            self.count = torch.zeros((), dtype=torch.float64, device=dev)
        self.A = A64
        step = max(1, _CHUNK_ELEMENTS // max(dim * dstate, dstate * dstate))
        for p0 in range(0, u64.shape[1], step):
            d, w = d64[:, p0:p0 + step], w64[p0:p0 + step]
            b, c = B64[:, p0:p0 + step], C64[:, p0:p0 + step]
            self.sum_a += (torch.exp(d.unsqueeze(-1) * A64.unsqueeze(1)) * w[None, :, None]).sum(1)
            drive = d * u64[:, p0:p0 + step] if self.scale == "input" else d
            bb = (b.unsqueeze(1) * b.unsqueeze(0)).reshape(dstate * dstate, -1)  # (N², T)
            self.sum_MB += ((drive * drive * w) @ bb.T).reshape(dim, dstate, dstate)
            self.sum_MC += (c * w) @ c.T
            self.count += w.sum()

    def all_reduce(self, group=None) -> None:
        """Sum the moments over all ranks of ``torch.distributed`` (a no-op when it is not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self.sum_a is None:
            return
        flat = torch.cat([self.sum_a.flatten(), self.sum_MB.flatten(), self.sum_MC.flatten(), self.count.reshape(1)])
        dist.all_reduce(flat, group=group)
        sizes = [self.sum_a.numel(), self.sum_MB.numel(), self.sum_MC.numel(), 1]
        a, mb, mc, n = flat.split(sizes)
        self.sum_a, self.sum_MB = a.view_as(self.sum_a), mb.view_as(self.sum_MB)
        self.sum_MC, self.count = mc.view_as(self.sum_MC), n.reshape(())

    def energies(self, state_mask: Tensor | None = None) -> HankelEnergies:
        """The layer's :class:`HankelEnergies` from the averages so far; ``ValueError`` if nothing was seen."""
        if self.count is None or float(self.count) <= 0:
            raise ValueError("no calibration data reached this layer (empty calibration iterable?)")
        n = self.count
        return hankel_from_moments(self.sum_a / n, self.sum_MB / n, self.sum_MC / n, scale=self.scale,
                                   state_mask=state_mask, count=float(n))
