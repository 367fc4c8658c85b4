"""Every runtime environment switch of the package, in one place (the README has the same table).

Build-time switches (``COMPRESSM_SKIP_CUDA_BUILD``, ``COMPRESSM_FORCE_CUDA_BUILD``,
``COMPRESSM_CUDA_ARCHS``, ``MAX_JOBS``) are read by ``setup.py``.
"""

from __future__ import annotations

import os

_BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


def default_backend() -> str:
    """``COMPRESSM_BACKEND``: the backend ``backend="auto"`` resolves to (default ``auto``)."""
    value = os.environ.get("COMPRESSM_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"COMPRESSM_BACKEND={value!r}; expected one of {', '.join(_BACKENDS)}")
    return value


def triton_interpret() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
