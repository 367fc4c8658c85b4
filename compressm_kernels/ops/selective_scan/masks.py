"""State masks and the compacted forms kernels run on."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# mask_to_ranks' results for the masks it saw last, by id(mask): a decode step passes the same mask every
# token, and the sort costs more than the step itself (1.4 ms against ~0.2 ms at D = 1536, N = 64). An entry
# is used only while its mask is alive and unmodified (same version counter), and dies with the mask.
_RANKS: dict[int, tuple[weakref.ref, int, int, Tensor, Tensor]] = {}
_RANKS_MAX = 64


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
    The results of a mask seen before (alive and not modified in place since) are reused; treat them as
    read-only.
    """
    if torch.compiler.is_compiling() or state_mask.is_inference():
        # No cache: dynamo cannot take id() of a mask made inside the traced graph (torch 2.11 refuses it),
        # and an inference tensor has no version counter.
        return _ranks_and_kept(state_mask, dim)
    key, version = id(state_mask), state_mask._version
    hit = _RANKS.get(key)
    if hit is not None and hit[0]() is state_mask and hit[1:3] == (version, dim):
        return hit[3], hit[4]
    ranks, kept = _ranks_and_kept(state_mask, dim)
    if len(_RANKS) >= _RANKS_MAX:
        _RANKS.pop(next(iter(_RANKS)))
    _RANKS[key] = (weakref.ref(state_mask, lambda _, key=key: _RANKS.pop(key, None)), version, dim, ranks, kept)
    return ranks, kept


def _ranks_and_kept(state_mask: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    mask = state_mask.expand(dim, state_mask.shape[-1]) if state_mask.dim() == 1 else state_mask
    ranks = mask.sum(dim=1, dtype=torch.int32)
    # A stable sort on "dropped" puts kept states first, each group in increasing index order.
    kept = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous()
    return ranks, kept


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
