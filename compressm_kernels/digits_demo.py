"""The main job at CPU scale: CompreSSM on scikit-learn's handwritten digits, read pixel by pixel.

Three runs of the same small Mamba classifier, same seed and steps:
  (a) ``full``      trained at the full state size N,
  (b) ``compressm`` cut by Hankel energy at the 10 % mark, then trained small,
  (c) ``small``     born at (b)'s final state size.
The digits ship inside scikit-learn (no download). ``compressm demo`` runs this.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .modules.mamba import Mamba


@dataclass
class DigitsData:
    x_train: torch.Tensor  # (n, 64, 1) pixel intensities in [0, 1], row-major
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_sequences(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """The 1,797 8×8 digits as length-64 sequences of one pixel each, split with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError("the demo needs scikit-learn for its built-in digits: pip install scikit-learn") from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 64, 1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


class DigitsMamba(nn.Module):
    """Pixel embedding → pre-norm residual Mamba blocks → the last position's features → 10 classes."""

    def __init__(self, d_model: int = 32, n_layers: int = 2, d_state: int = 32, expand: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(1, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList(
            Mamba(d_model, d_state=d_state, expand=expand, layer_idx=i) for i in range(n_layers)
        )
        self.head_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(norm(h))
        return self.head(self.head_norm(h[:, -1]))  # the last pixel has seen the whole image


@dataclass
class RunResult:
    name: str
    seed: int
    accuracy: float
    final_states: list[int]
    losses: list[float]
    step_ms: float  # median training step of the final model (after the last cut), warm-up excluded
    train_s: float  # wall time of the whole run, calibration and surgery included
    cut_step: int | None = None  # the last cut
    spectra_step: int | None = None  # the first cut, where the spectra were taken at the full N
    spectra: list[torch.Tensor] = field(default_factory=list)  # per layer, mean over channels
    log: list[str] = field(default_factory=list)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item()
                      for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def _progress(name: str, step: int, total: int, loss: float) -> None:
    """A progress bar on a terminal; ten plain lines per run otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    if not tty and step != total and step % max(1, total // 10):
        return
    filled = int(30 * step / total)
    line = f"  {name:<10} [{'#' * filled}{'.' * (30 - filled)}] {step}/{total} loss {loss:.3f}"
    print(("\r" + line) if tty else line, end="\n" if step == total or not tty else "", file=sys.stderr, flush=True)


def train_run(name: str, data: DigitsData, *, d_state: int | list[int], steps: int, seed: int, batch: int = 32,
              lr: float = 5e-3, tau: float | None = None, d_model: int = 32, n_layers: int = 2) -> RunResult:
    """Train one classifier; with ``tau`` set, CompreSSM cuts it at the 10 % mark (4 attempts up to 10 %)."""
    from .schedule import CompreSSM

    torch.manual_seed(seed)
    sizes = d_state if isinstance(d_state, list) else [d_state] * n_layers
    model = DigitsMamba(d_model=d_model, n_layers=n_layers, d_state=max(sizes))
    for layer, n in zip(model.layers, sizes, strict=True):
        if n < layer.d_state:  # born small: a layer built at size n (its first n states' init)
            layer.reduce_state(torch.arange(n))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    compressor = CompreSSM(model, optimizer, steps, tau=tau) if tau is not None else None
    result = RunResult(name, seed, 0.0, [], [], 0.0, 0.0)
    run_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    times: list[float] = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(data.y_train), (batch,), generator=gen)
        start = time.perf_counter()
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        lr_schedule.step()
        result.losses.append(loss.item())
        if compressor is not None:
            report = compressor.step()
            if report is not None and report.changed:
                result.cut_step = step
                if not result.spectra:
                    result.spectra_step = step
                    result.spectra = [lp.energies.sigma.mean(dim=0) for lp in report.plan.layers]
        _progress(name, step, steps, loss.item())
    if compressor is not None:
        compressor.close()
        result.log = [f"step {e['step']}: {e['action']}" for e in compressor.log]
    result.train_s = time.perf_counter() - run_start
    skip = min(5, steps // 4)  # warm-up steps are not timed
    result.step_ms = 1e3 * statistics.median(times[max(result.cut_step or 0, skip):])
    result.accuracy = _accuracy(model, data.x_test, data.y_test)
    result.final_states = [layer.d_state for layer in model.layers]
    return result


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarize(runs: dict[str, list[RunResult]]) -> str:
    """The demo's table: final N per layer, test accuracy, the final model's step time against the full
    model's (measured in the same demo), and each run's wall time."""
    head = (f"{'run':<11}{'final N per layer (per seed)':<31}{'test accuracy':>17}{'ms/step':>10}{'vs full':>9}"
            f"{'run s':>8}")
    lines = [head, "-" * len(head)]
    full_ms = statistics.mean(r.step_ms for r in runs["full"])
    for name, results in runs.items():
        states = " ".join("/".join(map(str, r.final_states)) for r in results)
        step_ms = statistics.mean(r.step_ms for r in results)
        train_s = statistics.mean(r.train_s for r in results)
        lines.append(f"{name:<11}{states:<31}{_mean_sd([r.accuracy for r in results]):>17}{step_ms:>10.1f}"
                     f"{full_ms / step_ms:>8.2f}x{train_s:>8.1f}")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: dict[str, list[RunResult]], out_dir: Path) -> list[Path]:
    """PNG plots: Hankel spectra at the cut, loss curves, accuracy vs state size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cut = runs["compressm"][0]
    if cut.spectra:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for i, spectrum in enumerate(cut.spectra):
            ax.semilogy(range(1, len(spectrum) + 1), spectrum.cpu().numpy(), marker="o", ms=3, label=f"layer {i}")
        ax.set(xlabel="index (descending)", ylabel="Hankel singular value (mean over channels)",
               title=f"Hankel spectra at the first cut (step {cut.spectra_step})")
        ax.legend()
        paths.append(_save(fig, out_dir / "hankel_spectra.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, results in runs.items():
        losses = torch.tensor(results[0].losses)
        window = max(1, len(losses) // 50)
        smooth = losses.unfold(0, window, 1).mean(-1) if len(losses) >= window else losses
        ax.plot(smooth.numpy(), label=name)
    if cut.cut_step:
        ax.axvline(cut.cut_step, color="gray", ls="--", lw=1, label="cut")
    ax.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log", title="Loss curves (seed 0)")
    ax.legend()
    paths.append(_save(fig, out_dir / "loss_curves.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, results in runs.items():
        xs = [statistics.mean(r.final_states) for r in results]
        ax.scatter(xs, [100 * r.accuracy for r in results], label=name)
    ax.set(xlabel="state size N (mean over layers)", ylabel="test accuracy (%)", xscale="log",
           title="Accuracy vs state size")
    ax.legend()
    paths.append(_save(fig, out_dir / "accuracy_vs_state.png"))
    return paths


def run_demo(*, d_state: int = 64, d_model: int = 64, steps: int = 400, seeds: int = 1, tau: float = 0.05,
             out_dir: str | Path = "demo_out") -> dict[str, list[RunResult]]:
    """Full, CompreSSM and born-small runs for each seed; prints the table, writes plots."""
    data = load_digits_sequences()
    runs: dict[str, list[RunResult]] = {"full": [], "compressm": [], "small": []}
    for seed in range(seeds):
        common = {"steps": steps, "seed": seed, "d_model": d_model}
        runs["full"].append(train_run("full", data, d_state=d_state, **common))
        cut = train_run("compressm", data, d_state=d_state, tau=tau, **common)
        runs["compressm"].append(cut)
        runs["small"].append(train_run("small", data, d_state=cut.final_states, **common))
    print(f"\nCompreSSM on digits (64-pixel sequences), d_model={d_model}, N={d_state}, tau={tau}, {steps} steps, "
          f"{seeds} seed(s)")
    print(summarize(runs))
    for line in runs["compressm"][0].log:
        print("  " + line)
    for path in plot(runs, Path(out_dir)):
        print(f"wrote {path}")
    return runs
