"""State masks and the compacted forms kernels run on."""

from __future__ import annotations

import torch
from torch import Tensor


def mask_to_ranks(state_mask: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Turn a state mask into per-channel ranks and kept-state indices.

    Args:
        state_mask: bool ``(N,)`` (shared by all channels) or ``(D, N)`` (per channel).
        dim: the number of channels D.
    Returns:
        ranks: int32 ``(D,)``, the number of kept states of each channel.
        kept: int32 ``(D, N)``; row d lists channel d's kept state indices in increasing order in its
        first ``ranks[d]`` entries, then the dropped ones (so the kernel's loop to ``ranks[d]`` only
        visits kept states).
    """
    mask = state_mask.expand(dim, state_mask.shape[-1]) if state_mask.dim() == 1 else state_mask
    ranks = mask.sum(dim=1, dtype=torch.int32)
    # A stable sort on "dropped" puts kept states first, each group in increasing index order.
    kept = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return ranks, kept.contiguous()


def kept_states(state_mask: Tensor) -> Tensor:
    """Indices (int64) of the states a shared ``(N,)`` mask keeps."""
    if state_mask.dim() != 1:
        raise ValueError(f"kept_states needs a shared (N,) mask, got shape {tuple(state_mask.shape)}")
    return state_mask.nonzero().flatten()


def compact_scan_args(A: Tensor, B: Tensor, C: Tensor, state_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Slice A ``(D, N)`` and B/C (any form) to the states a shared ``(N,)`` mask keeps."""
    keep = kept_states(state_mask)

    def take(t: Tensor) -> Tensor:
        return t.index_select(1 if t.dim() == 2 else t.dim() - 2, keep)

    return A.index_select(1, keep), take(B), take(C)
