"""One benchmark harness: warm-up, median and 20/80 % quantiles, peak memory, a header with the machine
and versions, a fixed-width table with ratios to a baseline measured in the same run, JSON rows.

Used by every bench/*.py script::

    from harness import Bench
    bench = Bench("scan", device="cuda")
    bench.time("triton fwd N=16", fn, group="N=16", baseline=False, **extra_columns)
    bench.report(json_path="bench/results/scan.json")
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


def machine_header(device: str) -> str:
    """Machine, versions and device, one per line, for the top of every report."""
    import compressm_kernels

    lines = [
        f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), compressm_kernels "
        f"{compressm_kernels.__version__}",
    ]
    try:
        import triton

        lines[-1] += f", triton {triton.__version__}"
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append(f"device: {platform.processor() or platform.machine()} CPU")
    return "\n".join(lines)


@dataclass
class Row:
    name: str
    group: str
    median_ms: float
    q20_ms: float
    q80_ms: float
    peak_mem_mb: float | None
    ratio: float | None = None  # baseline time / this time, within the group (>1 means faster)
    extra: dict = field(default_factory=dict)


def measure(fn: Callable[[], object], device: str, warmup: int = 3, repeats: int = 10,
            min_seconds: float = 0.0) -> tuple[list[float], float | None]:
    """Times of ``repeats`` calls (ms) after ``warmup`` calls, and the peak memory of one call (MB, CUDA)."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, peak


class Bench:
    """Collects timed rows; ``report`` prints the table and writes JSON."""

    def __init__(self, title: str, device: str = "cpu", warmup: int = 3, repeats: int = 10) -> None:
        self.title, self.device, self.warmup, self.repeats = title, device, warmup, repeats
        self.rows: list[Row] = []
        self._baselines: dict[str, float] = {}

    def time(self, name: str, fn: Callable[[], object], *, group: str = "", baseline: bool = False,
             **extra: object) -> Row:
        times, peak = measure(fn, self.device, self.warmup, self.repeats)
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
        row = Row(name, group, statistics.median(times), q[0], q[3], peak, extra=dict(extra))
        if baseline:
            self._baselines[group] = row.median_ms
            for other in self.rows:
                if other.group == group:
                    other.ratio = row.median_ms / other.median_ms
        if group in self._baselines:
            row.ratio = self._baselines[group] / row.median_ms
        self.rows.append(row)
        return row

    def table(self) -> str:
        extra_keys = sorted({k for r in self.rows for k in r.extra})
        head = f"{'name':<40}{'median ms':>11}{'q20':>9}{'q80':>9}{'peak MB':>9}{'vs base':>9}"
        head += "".join(f"{k:>11}" for k in extra_keys)
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{r.name:<40}{r.median_ms:>11.3f}{r.q20_ms:>9.3f}{r.q80_ms:>9.3f}"
            line += f"{r.peak_mem_mb:>9.1f}" if r.peak_mem_mb is not None else f"{'-':>9}"
            line += f"{r.ratio:>8.2f}x" if r.ratio is not None else f"{'-':>9}"
            for k in extra_keys:
                v = r.extra.get(k, "")
                line += f"{v:>11.1f}" if isinstance(v, float) else f"{v!s:>11}"
            lines.append(line)
        return "\n".join(lines)

    def report(self, json_path: str | Path | None = None) -> str:
        text = f"== {self.title} ==\n{machine_header(self.device)}\n{self.table()}"
        print(text, flush=True)
        if json_path is not None:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"title": self.title, "header": machine_header(self.device),
                                        "rows": [asdict(r) for r in self.rows]}, indent=1))
        return text
