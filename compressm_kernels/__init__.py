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
from .ops.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "__version__",
    "backend_status",
    "compact_scan_args",
    "mask_to_ranks",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
