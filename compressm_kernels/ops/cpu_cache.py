"""The CPU kernels' output cache: memory for their large outputs (a scan's ``out`` and gradients, the conv's) from
the blocks that earlier outputs freed, as a GPU caching allocator keeps freed blocks.

Without it a training loop on glibc faults in fresh pages for every step's outputs: glibc hands the freed top of
its heap back to the OS, and each 4 KB page then costs a fault and a zeroing (on the 2-CPU VM the benchmarks ran
on, ~1.7 µs a page, a third of an N = 8 backward). Outputs of at least 128 KB reuse a cached block of their size,
or failing that one of up to twice it (shapes that change from step to step then reuse earlier blocks). The cache
holds at most ``COMPRESSM_CPU_CACHE_MB`` (default 512, read once; 0 turns it off) of idle memory, frees the
longest-idle blocks past that, and frees them all before an allocation reports running out of memory.
``empty_cpu_cache()`` frees the idle blocks now.
"""

from __future__ import annotations

from .._extensions import REBUILD, load_extension, require_extension


def cpu_cache_info() -> dict[str, int]:
    """``live_bytes`` (in tensors now), ``idle_bytes`` and ``idle_blocks`` (cached for reuse), ``limit_bytes``, and
    the ``hits`` and ``misses`` of allocations so far. Raises if the CPU extension is not built, or was built from
    sources without the cache."""
    module = require_extension("_C")
    if not hasattr(module, "output_cache_info"):
        raise RuntimeError(f"compressm_kernels._C was built from older sources without the output cache; {REBUILD}")
    return module.output_cache_info()


def empty_cpu_cache() -> None:
    """Free the cache's idle blocks (outputs still in use return to it when freed). Without the CPU extension, or
    with one built before the cache, nothing is cached and this does nothing."""
    module, _ = load_extension("_C")
    if module is not None and hasattr(module, "empty_output_cache"):
        module.empty_output_cache()
