from .inputs import MAX_DSTATE, ScanInputs, check_scan_inputs
from .interface import BACKENDS, backend_status, resolve_backend, selective_scan_fn
from .masks import compact_scan_args, kept_states, mask_to_ranks
from .reference import selective_scan_ref

__all__ = [
    "BACKENDS",
    "MAX_DSTATE",
    "ScanInputs",
    "backend_status",
    "check_scan_inputs",
    "compact_scan_args",
    "kept_states",
    "mask_to_ranks",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_ref",
]
