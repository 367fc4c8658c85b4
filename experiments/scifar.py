"""Sequential CIFAR-10 with a Mamba classifier, trained three ways (MATH.md §2): a GPU-scale experiment.

Each image is read pixel by pixel as a length-1024 sequence of RGB triples. Per seed:

  (a) full      every layer at N = ``--n-state`` for the whole run;
  (b) compressm the same model with :class:`compressm_kernels.CompreSSM`: Hankel-energy cuts by the τ rule at
                ``--attempts`` equally spaced points up to ``--cut-end`` (10 %) of training, then trained small;
  (c) small     born at (b)'s final per-layer state sizes and trained from scratch.

It prints the final N per layer, test accuracy and the wall time of a training step before/after the cut, and
writes every run's numbers to ``--out`` (JSON). Needs torchvision for the data (``pip install torchvision``;
``--download`` fetches CIFAR-10 into ``--data-dir`` once). Not run in CI; at the defaults it is hours of GPU
time. ``--fake-data`` swaps in random images so the script can be checked anywhere in seconds::

    python experiments/scifar.py --device cuda --download                 # defaults: N=64, tau=0.1, 20k steps
    python experiments/scifar.py --device cuda --n-state 128 --tau 0.05 --seeds 0,1,2 --steps 50000
    python experiments/scifar.py --fake-data --steps 2 --batch 2 --d-model 8 --layers 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Runs from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressm_kernels import CompreSSM, Mamba

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
RUNS = ("full", "compressm", "small")


class SeqClassifier(nn.Module):
    """Pre-norm residual stack of Mamba mixers over ``(Bt, L, d_in)``, mean-pooled into class logits."""

    def __init__(self, d_in: int, d_model: int, d_states: list[int], n_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in d_states)
        self.layers = nn.ModuleList(Mamba(d_model, d_state=n, layer_idx=i) for i, n in enumerate(d_states))
        self.norm_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(Bt, L, d_in)`` → logits ``(Bt, n_classes)``."""
        h = self.embed(x)
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(norm(h))
        return self.head(self.norm_f(h).mean(dim=1))

    def state_sizes(self) -> list[int]:
        return [layer.d_state for layer in self.layers]


def load_cifar(data_dir: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 as uint8 ``(n, 32, 32, 3)`` images and int64 labels: train images, labels, test images, labels."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise SystemExit("experiments/scifar.py reads CIFAR-10 through torchvision, which is not installed: "
                         "run `pip install torchvision` (or pass --fake-data to check the script)") from err
    out = []
    for train in (True, False):
        ds = CIFAR10(data_dir, train=train, download=download)
        out += [torch.from_numpy(ds.data), torch.tensor(ds.targets, dtype=torch.long)]
    return tuple(out)


def fake_cifar(n_train: int, n_test: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random images and labels with CIFAR-10's shapes and dtypes (for checking the script, not for results)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n_train, 32, 32, 3), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n_train,), generator=gen),
            torch.randint(0, 256, (n_test, 32, 32, 3), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n_test,), generator=gen))


def to_sequence(images: Tensor, device: str) -> Tensor:
    """uint8 ``(Bt, 32, 32, 3)`` → normalised float ``(Bt, 1024, 3)``: pixels in raster order."""
    x = images.to(device).float().div_(255.0)
    x = (x - torch.tensor(CIFAR_MEAN, device=device)) / torch.tensor(CIFAR_STD, device=device)
    return x.reshape(x.shape[0], -1, 3)


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over the first ``warmup`` steps (the cut window), then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch: int, device: str) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_sequence(images[i:i + batch], device))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch]).sum())
    model.train()
    return correct / len(images)


def train(run: str, d_states: list[int], data, args: argparse.Namespace, seed: int) -> dict:
    """One training run; returns its final sizes, accuracy, step times and the cut log."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = SeqClassifier(3, args.d_model, d_states).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, round(args.cut_end * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, warmup))
    cutter = CompreSSM(model, opt, args.steps, tau=args.tau, attempts=args.attempts, end=args.cut_end) \
        if run == "compressm" else None
    gen = torch.Generator().manual_seed(seed)
    step_times, losses, last_cut = [], [], 0
    cuda = args.device.startswith("cuda")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=gen)
        x, y = to_sequence(x_train[idx], args.device), y_train[idx].to(args.device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        sched.step()
        losses.append(loss.item())
        if cutter is not None and cutter.step() is not None:
            last_cut = step
            print(f"  [{run} seed {seed}] step {step}: cut to N = {model.state_sizes()}", flush=True)
        if step % args.log_every == 0 or step == args.steps:
            recent = losses[-args.log_every:]
            print(f"  [{run} seed {seed}] step {step}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                  f"N = {model.state_sizes()}", flush=True)
    if cutter is not None:
        cutter.close()
    # The first step (and the first after a cut) carries one-off costs (allocation, kernel selection).
    before = (step_times[1:last_cut] if last_cut else step_times[1:]) or step_times[:1]
    after = step_times[last_cut + 1:] if last_cut else []
    return {
        "run": run, "seed": seed, "n_start": d_states, "n_final": model.state_sizes(),
        "test_acc": evaluate(model, x_test, y_test, args.eval_batch, args.device),
        "step_ms_before_cut": 1e3 * statistics.median(before),  # every step when there was no cut
        "step_ms_after_cut": 1e3 * statistics.median(after) if after else None,
        "cut_step": last_cut or None, "final_loss": losses[-1],
        "cut_log": [{k: v for k, v in e.items() if k != "plan"} for e in (cutter.log if cutter else [])],
    }


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def summary(results: list[dict]) -> str:
    lines = [f"{'run':<11}{'final N per layer':<24}{'test acc':>18}{'step ms (before cut)':>22}"
             f"{'step ms after cut':>20}"]
    for run in RUNS:
        mine = [r for r in results if r["run"] == run]
        if not mine:
            continue
        sizes = "; ".join(",".join(map(str, r["n_final"])) for r in mine)
        after = [r["step_ms_after_cut"] for r in mine if r["step_ms_after_cut"] is not None]
        lines.append(f"{run:<11}{sizes:<24}{mean_sd([100 * r['test_acc'] for r in mine]) + ' %':>18}"
                     f"{mean_sd([r['step_ms_before_cut'] for r in mine]):>22}{mean_sd(after) if after else '-':>20}")
    cut = [r for r in results if r["run"] == "compressm" and r["step_ms_after_cut"]]
    if cut:
        before = statistics.mean(r["step_ms_before_cut"] for r in cut)
        lines.append(f"compressm training step after the cut vs before: "
                     f"{before / statistics.mean(r['step_ms_after_cut'] for r in cut):.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-state", type=int, default=64, help="state size N of the full model (default 64)")
    p.add_argument("--tau", type=float, default=0.1, help="CompreSSM's τ: drop HSV mass up to τ (default 0.1)")
    p.add_argument("--attempts", type=int, default=4, help="reduction attempts (default 4)")
    p.add_argument("--cut-end", type=float, default=0.1, help="last attempt at this fraction of training (0.1)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2 (mean ± sd over them)")
    p.add_argument("--runs", default=",".join(RUNS), help="which of full,compressm,small to train")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    p.add_argument("--fake-data", action="store_true", help="random images (checks the script; no accuracy)")
    p.add_argument("--out", default="experiments/results/scifar.json", help="JSON results ('' for none)")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    if any(r not in RUNS for r in runs) or ("small" in runs and "compressm" not in runs):
        p.error(f"--runs takes a subset of {','.join(RUNS)}; 'small' needs 'compressm' (it uses its final sizes)")
    if args.steps < 1 or args.batch < 1 or args.n_state < 1:
        p.error("--steps, --batch and --n-state must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    data = fake_cifar(64, 32) if args.fake_data else load_cifar(args.data_dir, args.download)
    print(f"sCIFAR-10: {len(data[0])} train / {len(data[2])} test sequences of length 1024, device {args.device}, "
          f"{args.layers} layers d_model={args.d_model}, N={args.n_state}, tau={args.tau}, {args.steps} steps of "
          f"{args.batch}" + (" (FAKE DATA)" if args.fake_data else ""), flush=True)
    runs = args.runs.split(",")
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        full_sizes = [args.n_state] * args.layers
        results.extend(train(run, full_sizes, data, args, seed) for run in ("full", "compressm") if run in runs)
        if "small" in runs:
            cut = next(r for r in results if r["run"] == "compressm" and r["seed"] == seed)["n_final"]
            results.append(train("small", cut, data, args, seed))
    print(summary(results), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
