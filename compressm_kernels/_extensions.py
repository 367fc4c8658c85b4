"""Loading the compiled extensions (``_C`` for CPU kernels, ``_C_cuda`` for CUDA kernels), and the ops whose
kernels they register.

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


_reasons: dict[str, str | None] = {}


def extension_unavailable_reason(name: str) -> str | None:
    """``load_extension(name)``'s reason alone (``None`` when it loads). The first call loads the extension; later
    ones read a plain dict, which torch.compile traces as a constant where it could not trace the import (a graph
    break). The backend modules make that first call when they are imported (a millisecond), so a model compiled
    before any eager call sees it too."""
    if name not in _reasons:
        _reasons[name] = load_extension(name)[1]
    return _reasons[name]


def define_ops(extension: str, dispatch_key: str, schemas: list[str]) -> torch.library.Library:
    """Define the ops ``compressm::<schema>`` whose ``dispatch_key`` kernels ``extension`` registers in C++ when it
    loads (TORCH_LIBRARY_IMPL), so that a call reaches the kernel with no Python in between. Without the extension,
    or with one built from older sources that lacks an op's kernel, that kernel raises the reason and the fix
    instead. The ops live as long as the returned library: keep it."""
    lib = torch.library.Library("compressm", "FRAGMENT")
    reason = extension_unavailable_reason(extension)  # loads the extension: its kernels register now
    for schema in schemas:
        name = schema.split("(")[0]
        lib.define(schema)
        missing = reason
        if missing is None and not torch._C._dispatch_has_kernel_for_dispatch_key(f"compressm::{name}", dispatch_key):
            missing = (f"compressm_kernels.{extension} has no {dispatch_key} kernel for {name}: it was built from "
                       f"older sources; {REBUILD}")
        if missing is not None:
            lib.impl(name, functools.partial(_unavailable, missing), dispatch_key)
    return lib


def _unavailable(reason: str, *args, **kwargs):
    raise RuntimeError(reason)
