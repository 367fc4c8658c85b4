"""compressm_kernels: selective-scan kernels for Mamba whose state dimension shrinks while it trains."""

from ._version import __version__
from .calibration import calibrate, find_mixers
from .hankel import HankelAccumulator, HankelEnergies, hankel_from_arrays, hankel_from_moments
from .modules import Mamba
from .ops.cpu_cache import cpu_cache_info, empty_cpu_cache
from .ops.mamba_inner import mamba_inner_fn
from .ops.selective_scan import (
    BACKENDS,
    backend_status,
    compact_scan_args,
    mask_to_ranks,
    selective_scan_fn,
    selective_scan_ref,
)
from .ops.state_update import selective_state_update, selective_state_update_ref
from .plan import CompressionPlan, LayerPlan
from .schedule import CompreSSM, trainer_callback
from .surgery import (
    CompressionReport,
    apply_plan,
    compress_model,
    plan_compression,
    resize_for_state_dict,
    state_sizes,
)

__all__ = [
    "BACKENDS",
    "CompreSSM",
    "CompressionPlan",
    "CompressionReport",
    "HankelAccumulator",
    "HankelEnergies",
    "LayerPlan",
    "Mamba",
    "__version__",
    "apply_plan",
    "backend_status",
    "calibrate",
    "compact_scan_args",
    "compress_model",
    "cpu_cache_info",
    "empty_cpu_cache",
    "find_mixers",
    "hankel_from_arrays",
    "hankel_from_moments",
    "mamba_inner_fn",
    "mask_to_ranks",
    "plan_compression",
    "resize_for_state_dict",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "state_sizes",
    "trainer_callback",
]
