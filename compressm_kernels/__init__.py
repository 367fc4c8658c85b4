"""compressm_kernels: selective-scan kernels for Mamba whose state dimension shrinks while it trains."""

from ._version import __version__
from .ops.selective_scan import (
    BACKENDS,
    backend_status,
    compact_scan_args,
    mask_to_ranks,
    selective_scan_fn,
    selective_scan_ref,
)
from .modules import Mamba
from .ops.mamba_inner import mamba_inner_fn
from .ops.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "Mamba",
    "__version__",
    "backend_status",
    "compact_scan_args",
    "mamba_inner_fn",
    "mask_to_ranks",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
