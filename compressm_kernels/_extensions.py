"""Loading the compiled extensions (``_C`` for CPU kernels, ``_C_cuda`` for CUDA kernels).

A missing or mismatched extension never breaks ``import compressm_kernels``: ``load_extension`` returns
the reason instead, and the backend that needs it raises at call time with the fix.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

REBUILD = "rebuild it: `pip install --no-build-isolation -e .` in the source tree (or `bash scripts/bootstrap.sh`)"


def built_against() -> str | None:
    """The torch version the extensions were built with (written by setup.py), or None if unbuilt."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


@functools.cache
def load_extension(name: str) -> tuple[ModuleType | None, str | None]:
    """Import ``compressm_kernels.<name>``; return ``(module, None)`` or ``(None, reason with the fix)``."""
    built = built_against()
    if built is not None and built != torch.__version__:
        # Checked before loading: a library built for another torch fails with undefined symbols.
        return None, (f"compressm_kernels.{name} was built against torch {built} but torch {torch.__version__} "
                      f"is running; {REBUILD}")
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as err:
        return None, f"the compiled extension compressm_kernels.{name} is not available ({err}); {REBUILD}"


def require_extension(name: str) -> ModuleType:
    """``compressm_kernels.<name>``, or ``RuntimeError`` with the reason and the fix (the backends' call-time
    failure)."""
    module, reason = load_extension(name)
    if module is None:
        raise RuntimeError(reason)
    return module


@torch.compiler.assume_constant_result
def extension_unavailable_reason(name: str) -> str | None:
    """``load_extension(name)``'s reason alone (``None`` when it loads), for the availability checks on paths
    torch.compile traces: it calls this once and keeps the result rather than tracing into importlib, which
    would break the graph."""
    return load_extension(name)[1]
