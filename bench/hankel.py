"""Hankel energies: time to accumulate calibration moments and to turn them into HSVs/energies, vs N and D.

    python -m bench hankel --device cpu [--quick] [--dims 256,1024 --dstates 16,64 --batch 2 --seqlen 256]

Rows per (D, N), from one random calibration batch ``(Bt, D, L)``:
  * ``accumulate``: ``HankelAccumulator.update`` (float64 running sums of ā, M_B, M_C; what every calibration
    batch costs).
  * ``closed form``: ``HankelAccumulator.energies()`` → ``hankel_from_moments``: Gramians in closed form for
    all D channels at once, σ = svdvals(P^½ Q^½), energies sqrt(P_nn Q_nn).
  * ``scipy``: the textbook route it replaces, the baseline where run (D ≤ ``--scipy-max-dim``): per channel,
    ``scipy.linalg.solve_discrete_lyapunov`` for P and Q, then sqrt(eigvals(P Q)).
"""

from __future__ import annotations

import argparse

import torch

from compressm_kernels import HankelAccumulator

from .harness import Bench, publish, with_flags

SIZES = {
    ("cpu", True): dict(dims="64,256", dstates="16,64", batch=2, seqlen=128, scipy_max_dim=64, warmup=1, repeats=3),
    ("cpu", False): dict(dims="256,1024,2048", dstates="8,16,32,64", batch=2, seqlen=256, scipy_max_dim=256,
                         warmup=1, repeats=5),
    ("cuda", True): dict(dims="256,2048", dstates="16,64", batch=4, seqlen=1024, scipy_max_dim=0, warmup=2,
                         repeats=5),
    ("cuda", False): dict(dims="1024,2048,4096", dstates="16,32,64,128", batch=8, seqlen=2048, scipy_max_dim=0,
                          warmup=2, repeats=5),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dims", help="comma list of D (channels)")
    p.add_argument("--dstates", help="comma list of N")
    p.add_argument("--batch", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--scipy-max-dim", dest="scipy_max_dim", type=int,
                   help="run the per-channel scipy baseline up to this D (it is a Python loop over channels)")


def scipy_hsv(a_bar: torch.Tensor, M_B: torch.Tensor, M_C: torch.Tensor) -> list:
    """Per-channel discrete Lyapunov solves and sqrt(eig(P Q)), on the CPU in float64."""
    import numpy as np
    from scipy.linalg import solve_discrete_lyapunov

    a, mb, mc = a_bar.cpu().numpy(), M_B.cpu().numpy(), M_C.cpu().numpy()
    out = []
    for d in range(a.shape[0]):
        A = np.diag(a[d])
        P = solve_discrete_lyapunov(A, mb[d])
        Q = solve_discrete_lyapunov(A, mc)
        out.append(np.sqrt(np.abs(np.linalg.eigvals(P @ Q))))
    return out


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    batch, seqlen, dev = opt["batch"], opt["seqlen"], args.device
    bench = Bench(f"Hankel energies, calibration batch Bt={batch} L={seqlen}, float64 moments", device=dev,
                  warmup=opt["warmup"], repeats=opt["repeats"])
    try:
        import scipy  # noqa: F401 (only probes whether scipy is installed)
    except ImportError:
        opt["scipy_max_dim"] = 0
        bench.note("skipped the scipy baseline: scipy is not installed")
    gen = torch.Generator().manual_seed(0)
    for dim in sorted(int(v) for v in opt["dims"].split(",")):
        for n in sorted(int(v) for v in opt["dstates"].split(",")):
            u = torch.randn(batch, dim, seqlen, generator=gen).to(dev)
            delta = torch.nn.functional.softplus(torch.randn(batch, dim, seqlen, generator=gen) - 2.0).to(dev)
            A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1).to(dev)
            B, C = (torch.randn(batch, n, seqlen, generator=gen).to(dev) for _ in "BC")
            group, info = f"D={dim} N={n}", dict(D=dim, N=n)
            acc = HankelAccumulator()
            acc.update(u, delta, A, B, C)
            scipy_name, closed_name = f"scipy Lyapunov loop {group}", f"closed form {group}"
            timed, extras = {}, {scipy_name: dict(op="scipy", **info), closed_name: dict(op="closed form", **info)}
            if dim <= opt["scipy_max_dim"]:
                moments = (acc.sum_a / acc.count, acc.sum_MB / acc.count, acc.sum_MC / acc.count)
                timed[scipy_name] = lambda m=moments: scipy_hsv(*m)
            timed[closed_name] = acc.energies
            bench.compare(group, timed, baseline=scipy_name if scipy_name in timed else None, extras=extras)
            bench.time(f"accumulate {group}", lambda x=(u, delta, A, B, C): HankelAccumulator().update(*x),
                       group=f"accumulate {group}", op="accumulate", **info)
    publish(bench, args, "hankel", columns=["D", "N"], plots={"": dict(x="N", series="op", panel="D")})
    return bench
