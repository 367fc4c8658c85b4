"""Changing a parameter's shape in place, safely for autograd and optimizers."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


def reseat_parameter(p: nn.Parameter, data: Tensor, grad: Tensor | None) -> None:
    """Give parameter ``p`` (the same Python object, so optimizers keep their references) new data and
    grad of a new shape.

    ``p.data = ...`` alone is not enough: autograd caches a parameter's gradient accumulator, with the old
    shape, for as long as any earlier graph (e.g. last step's ``loss``) is alive, and the next backward fails.
    ``torch.utils.swap_tensors`` puts a fresh tensor behind the same object instead.
    """
    fresh = nn.Parameter(data, requires_grad=p.requires_grad)
    fresh.__dict__.update(p.__dict__)  # swap_tensors exchanges __dict__ (e.g. _no_weight_decay flags)
    fresh.grad = grad
    try:
        torch.utils.swap_tensors(p, fresh)
    except RuntimeError as err:  # e.g. a weakref held by torch.compile or DDP: fall back to rebinding .data
        warnings.warn(f"could not swap a parameter's tensor ({err}); rebinding .data instead: drop references to "
                      "earlier losses/outputs before the next backward", stacklevel=3)
        p.data = data
        p.grad = grad
