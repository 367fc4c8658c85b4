"""One benchmark harness: warm-up, median and 20/80 % quantiles, peak memory (CUDA) or page faults (CPU), a
header with the machine and versions, a fixed-width table with ratios to a baseline measured in the same run,
JSON rows, PNG plots.

Every suite (``python -m bench <suite>``) uses it::

    bench = Bench("scan", device="cuda")
    bench.time("triton fwd N=16", fn, group="fwd N=16", baseline=False, backend="triton", N=16)
    bench.report(json_path="bench/results/scan.json")
    bench.plot("bench/results/scan.png", x="N", series="backend", panel="pass")

Rows of one ``group`` are compared with the group's baseline row (``vs base`` = baseline time / this time,
> 1 is faster). Keyword extras become table columns, JSON fields and the plot's axes/series. ``compare`` times
a whole group round-robin, one call of each in turn, so a slow spell of a shared machine (this VM's speed
drifts by a quarter over seconds) lands on every row of the group instead of skewing their ratios::

    bench.compare("fwd N=16", {"reference fwd N=16": ref, "cpu fwd N=16": ours}, baseline="reference fwd N=16",
                  extras={"cpu fwd N=16": dict(backend="cpu", N=16)})

On a CPU each row also gets the median number of minor page faults per call (``faults``): memory the allocator
handed back to the OS and takes fresh again. glibc does that with large freed tensors depending on what else
sits on its heap, so the same call can pay thousands of faults in one process and none in the next (1-3
µs each on this VM); the column says when a row's time includes them. The header names the heap
policy the environment sets (``heap_policy``): ``MALLOC_TRIM_THRESHOLD_=2000000000
MALLOC_MMAP_THRESHOLD_=2000000000`` keeps freed memory, as a training loop's steady state does (a Mamba block's
step takes no faults here), and so times the kernels without the faults of isolated calls.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

try:
    import resource  # Unix only: page faults per call
except ImportError:  # pragma: no cover - Windows
    resource = None

_VERSIONED = ("triton", "numpy", "scipy", "mamba_ssm", "transformers")


def _version(dist: str) -> str | None:
    # Distribution metadata, not an import: mamba_ssm cannot even be imported without its CUDA extension.
    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def machine_header(device: str) -> str:
    """Machine, versions and device, one per line, for the top of every report."""
    import compressm_kernels

    versions = ", ".join(f"{d} {v}" for d in _VERSIONED if (v := _version(d)) is not None)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())  # other work on the machine skews CPU timings
    lines = [
        f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (load {load}), "
        f"python {platform.python_version()}",
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), compressm_kernels "
        f"{compressm_kernels.__version__}, {versions}",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append(f"device: {platform.processor() or platform.machine()} CPU; {heap_policy()}")
    return "\n".join(lines)


# What decides whether freed tensors go back to the OS (see the module docstring): glibc's malloc tunables, or
# another allocator preloaded in its place.
_HEAP_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def heap_policy() -> str:
    """How the C heap treats freed memory in this run, as far as the environment sets it: the same kernels
    page-fault on every call under glibc's defaults and not at all with trimming off, so CPU timings name it."""
    found = [f"{k}={os.environ[k]}" for k in _HEAP_SETTINGS if os.environ.get(k)]
    return "heap: " + (", ".join(found) if found else "the C library's defaults")


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
    faults: float | None = None  # CPU: median minor page faults per call

    def value(self, key: str) -> object:
        """A field or an extra by name (``median_ms``, ``ratio``, ``N``, ``GB/s``, ...)."""
        return getattr(self, key) if key in self.__dataclass_fields__ and key != "extra" else self.extra.get(key)


def _minor_faults() -> int | None:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def _timed_call(fn: Callable[[], object], cuda: bool) -> tuple[float, int | None]:
    """One call of ``fn``: ms (CUDA: between events on the current stream) and, on a CPU, the minor page faults
    the process took meanwhile."""
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end), None
    faults = _minor_faults()
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, None if faults is None else _minor_faults() - faults


def _peak_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (MB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fns: list[Callable[[], object]], device: str, warmup: int = 3,
            repeats: int = 10) -> list[tuple[list[float], float | None, list[int] | None]]:
    """Per callable: the times of ``repeats`` calls (ms), the peak memory of one call (MB, CUDA only) and the
    page faults of each timed call (CPU only).

    Each callable is warmed up and its memory taken in turn; then the timed calls go round-robin, each round
    starting one callable later, so drift in the machine's speed is shared by all of them.
    """
    cuda = device.startswith("cuda")
    peaks: list[float | None] = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        peaks.append(_peak_mb(fn) if cuda else None)
    times: list[list[float]] = [[] for _ in fns]
    faults: list[list[int] | None] = [None if cuda or resource is None else [] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            ms, n = _timed_call(fns[i], cuda)
            times[i].append(ms)
            if faults[i] is not None:
                faults[i].append(n)
    return list(zip(times, peaks, faults, strict=True))


class Bench:
    """Collects timed rows; ``report`` prints the table and writes JSON, ``plot`` draws them."""

    def __init__(self, title: str, device: str = "cpu", warmup: int = 3, repeats: int = 10) -> None:
        self.title, self.device, self.warmup, self.repeats = title, device, warmup, repeats
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self._baselines: dict[str, float] = {}

    def time(self, name: str, fn: Callable[[], object], *, group: str = "", baseline: bool = False,
             warmup: int | None = None, repeats: int | None = None, **extra: object) -> Row:
        """Time ``fn`` and add a row; ``baseline=True`` makes it the reference of its ``group``."""
        return self.compare(group, {name: fn}, baseline=name if baseline else None, extras={name: extra},
                            warmup=warmup, repeats=repeats)[name]

    def compare(self, group: str, fns: dict[str, Callable[[], object]], *, baseline: str | None = None,
                extras: dict[str, dict] | None = None, warmup: int | None = None,
                repeats: int | None = None) -> dict[str, Row]:
        """Time ``fns`` (row name -> callable) round-robin and add their rows to ``group`` in that order;
        ``baseline`` names the group's reference row; ``extras`` gives a row's keyword extras."""
        if baseline is not None and baseline not in fns:
            raise ValueError(f"baseline {baseline!r} is not one of the rows {list(fns)}")
        measured = measure(list(fns.values()), self.device, self.warmup if warmup is None else warmup,
                           self.repeats if repeats is None else repeats)
        rows = {}
        for name, (times, peak, faults) in zip(fns, measured, strict=True):
            # "inclusive": quantiles stay within the measured times (the default extrapolates from few samples).
            q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
            rows[name] = Row(name, group, statistics.median(times), q[0], q[3], peak,
                             extra=dict((extras or {}).get(name, {})),
                             faults=statistics.median(faults) if faults else None)
            print(f"  {name}: {rows[name].median_ms:.3f} ms", file=sys.stderr, flush=True)  # progress of long runs
        if baseline is not None:
            self._baselines[group] = rows[baseline].median_ms
            for other in self.rows:
                if other.group == group:
                    other.ratio = self._baselines[group] / other.median_ms
        for row in rows.values():
            if group in self._baselines:
                row.ratio = self._baselines[group] / row.median_ms
            self.rows.append(row)
        return rows

    def note(self, text: str) -> None:
        """A line printed under the header (a skipped backend and why, a baseline's definition)."""
        self.notes.append(text)

    def table(self, columns: list[str] | None = None) -> str:
        """Fixed-width table; ``columns`` picks and orders the extras shown (default: all, sorted)."""
        keys = columns if columns is not None else sorted({k for r in self.rows for k in r.extra})
        width = max([40, *(len(r.name) + 2 for r in self.rows)])
        # Peak memory on CUDA, page faults per call on a CPU: one column, named for what the rows carry.
        cpu = any(r.faults is not None for r in self.rows)
        head = f"{'name':<{width}}{'median ms':>11}{'q20':>10}{'q80':>10}{'faults' if cpu else 'peak MB':>9}"
        head += f"{'vs base':>9}"
        head += "".join(f"{k:>11}" for k in keys)
        lines = [head, "-" * len(head)]
        for r in self.rows:
            line = f"{r.name:<{width}}{r.median_ms:>11.3f}{r.q20_ms:>10.3f}{r.q80_ms:>10.3f}"
            if cpu:
                line += f"{r.faults:>9.0f}" if r.faults is not None else f"{'-':>9}"
            else:
                line += f"{r.peak_mem_mb:>9.1f}" if r.peak_mem_mb is not None else f"{'-':>9}"
            line += f"{r.ratio:>8.2f}x" if r.ratio is not None else f"{'-':>9}"
            for k in keys:
                v = r.extra.get(k, "")
                line += f"{v:>11.4g}" if isinstance(v, float) else f"{v!s:>11}"
            lines.append(line)
        return "\n".join(lines)

    def report(self, json_path: str | Path | None = None, columns: list[str] | None = None) -> str:
        """Print header, notes and table; write ``{"title", "header", "notes", "rows"}`` to ``json_path``."""
        text = "\n".join([f"== {self.title} ==", machine_header(self.device), *self.notes, self.table(columns)])
        print(text + "\n", flush=True)
        if json_path is not None:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"title": self.title, "header": machine_header(self.device),
                                        "notes": self.notes, "rows": [asdict(r) for r in self.rows]}, indent=1))
        return text

    def plot(self, path: str | Path, *, x: str, series: str, panel: str | None = None, y: str = "median_ms",
             where: Callable[[Row], bool] | None = None, logx: bool = True, logy: bool = True) -> Path | None:
        """One PNG: ``y`` against extra ``x`` per ``series`` value, one subplot per ``panel`` value.

        Rows lacking ``x`` or ``series`` (or rejected by ``where``) are left out; ``median_ms`` gets 20/80 %
        error bars. Returns the path written, or None when no row qualifies.
        """
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.value(x) is not None and r.value(series) is not None
                and r.value(y) is not None and (where is None or where(r))]
        if not rows:
            return None
        panels = list(dict.fromkeys(r.value(panel) if panel else "" for r in rows))
        colors = {sv: f"C{i % 10}" for i, sv in enumerate(dict.fromkeys(r.value(series) for r in rows))}
        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
        for ax, pv in zip(axes[0], panels, strict=True):
            mine = [r for r in rows if not panel or r.value(panel) == pv]
            for sv in dict.fromkeys(r.value(series) for r in mine):
                pts = sorted((r for r in mine if r.value(series) == sv), key=lambda r: r.value(x))
                xs, ys = [r.value(x) for r in pts], [r.value(y) for r in pts]
                if y == "median_ms":
                    err = [[r.median_ms - r.q20_ms for r in pts], [r.q80_ms - r.median_ms for r in pts]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[sv], label=str(sv))
                else:
                    ax.plot(xs, ys, marker="o", color=colors[sv], label=str(sv))
            if logx:
                ax.set_xscale("log", base=2)
                ticks = sorted({r.value(x) for r in mine})
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            if panel:
                ax.set_title(f"{panel}={pv}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(textwrap.fill(self.title, width=55 * len(panels)), fontsize=9)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def with_flags(args, defaults: dict) -> dict:
    """A suite's ``defaults`` (sizes, repeats) with each value replaced by its command-line flag where given."""
    return {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in defaults.items()}


def publish(bench: Bench, args, suite: str, *, columns: list[str] | None = None,
            plots: dict[str, dict] | None = None) -> None:
    """Print ``bench``'s report, write ``<json_dir>/<suite>_<device>.json`` and one PNG per ``plots`` entry
    (``<plots_dir>/<suite>_<device><key>.png``, the entry's items passed to :meth:`Bench.plot`)."""
    stem = f"{suite}_{args.device.split(':')[0]}"
    json_path = None if args.json_dir is None else Path(args.json_dir) / f"{stem}.json"
    bench.report(json_path=json_path, columns=columns)
    written = [str(json_path)] if json_path is not None else []
    if args.plots_dir is not None:
        for key, spec in (plots or {}).items():
            path = bench.plot(Path(args.plots_dir) / f"{stem}{key}.png", **spec)
            if path is not None:
                written.append(str(path))
    if written:
        print("wrote " + ", ".join(written) + "\n", flush=True)
