"""Mamba-2's scan (SSD): our route (``integrations.mamba_ssm_ssd.ssd_scan``, the selective scan with one A per head)
against mamba_ssm's, forward and forward+backward, over N.

    python -m bench ssd --device cpu [--quick] [--batch 1 --seqlen 512 --heads 24 --headdim 64 --dstates 128,64,16]

Rows per N (x ``(Bt, L, H, P)``, dt ``(Bt, L, H)``, A ``(H,)``, one B/C group; dt_bias and softplus, no D or z):
  * ``minimal``: mamba_ssm's ``ssd_minimal_discrete`` (its pure-PyTorch chunked SSD, 64-step chunks), Δ applied
    the same way; the baseline on a CPU, where mamba_ssm has nothing else.
  * ``ours``: ``ssd_scan``, what ``install()`` runs for mamba_ssm's ``mamba_chunk_scan_combined`` on CPU tensors
    (the C++ scan on a CPU, our GPU scans on a GPU).
  * ``mamba``: mamba_ssm's Triton ``mamba_chunk_scan_combined`` (CUDA only); the baseline on a GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from compressm_kernels.integrations.mamba_ssm_ssd import ssd_scan

from .harness import Bench, publish, with_flags
from .scan import allow_mamba_ssm_import

SIZES = {
    ("cpu", True): dict(batch=1, seqlen=128, heads=8, headdim=32, dstates="64,16", warmup=1, repeats=5),
    ("cpu", False): dict(batch=1, seqlen=512, heads=24, headdim=64, dstates="128,64,16", warmup=1, repeats=7),
    ("cuda", True): dict(batch=2, seqlen=1024, heads=24, headdim=64, dstates="128,64", warmup=3, repeats=10),
    ("cuda", False): dict(batch=4, seqlen=2048, heads=48, headdim=64, dstates="128,64,16", warmup=3, repeats=20),
}
CHUNK = 64  # ssd_minimal_discrete's block length (it needs L to be a multiple of it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int)
    p.add_argument("--seqlen", type=int, help=f"L, a multiple of {CHUNK}")
    p.add_argument("--heads", type=int)
    p.add_argument("--headdim", type=int)
    p.add_argument("--dstates")


def implementations(device: str) -> tuple[dict, list[str]]:
    """``{name: fn(x, dt, A, B, C, dt_bias) -> y}`` that can run here, and notes on those that cannot."""

    def ours(x, dt, A, B, C, dt_bias):
        return ssd_scan(x, dt, A, B, C, dt_bias=dt_bias, dt_softplus=True)

    fns, notes = {"ours": ours}, []
    allow_mamba_ssm_import()
    try:
        from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete  # pure PyTorch, imports on any machine
    except ImportError as err:
        notes.append(f"skipped 'minimal': mamba_ssm is not importable ({err})")
    else:
        def minimal(x, dt, A, B, C, dt_bias):
            delta = F.softplus(dt + dt_bias)
            return ssd_minimal_discrete(x * delta[..., None], A * delta, B, C, CHUNK)[0]

        fns["minimal"] = minimal
    if not device.startswith("cuda"):
        notes.append("skipped 'mamba': mamba_ssm's Triton mamba_chunk_scan_combined needs a CUDA device")
        return fns, notes
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        notes.append(f"skipped 'mamba': mamba_ssm's Triton SSD is not importable ({err})")
    else:
        def mamba(x, dt, A, B, C, dt_bias):
            return mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, dt_bias=dt_bias, dt_softplus=True)

        fns["mamba"] = mamba
    return fns, notes


def time_dstate(bench: Bench, fns: dict, baseline: str, shape: tuple[int, ...], dev: str,
                gen: torch.Generator) -> None:
    """The fwd and fwd+bwd groups of one N."""
    batch, seqlen, heads, headdim, n = shape
    t = {"x": torch.randn(batch, seqlen, heads, headdim, generator=gen),
         "dt": torch.randn(batch, seqlen, heads, generator=gen) - 2.0,
         "A": -torch.rand(heads, generator=gen) - 0.5,
         "B": torch.randn(batch, seqlen, 1, n, generator=gen),
         "C": torch.randn(batch, seqlen, 1, n, generator=gen),
         "dt_bias": 0.1 * torch.randn(heads, generator=gen)}
    t = {k: v.to(dev).requires_grad_(k != "dt_bias") for k, v in t.items()}
    dy = torch.randn(t["x"].shape, generator=gen).to(dev)
    leaves = [t[k] for k in ("x", "dt", "A", "B", "C")]
    # The minimal SSD takes per-head B/C: the one group expanded (a view), outside the timed calls.
    inputs = {name: {**t, "B": t["B"].expand(-1, -1, heads, -1), "C": t["C"].expand(-1, -1, heads, -1)}
              if name == "minimal" else t for name in fns}

    def fwd(name):
        def call():
            with torch.no_grad():
                fns[name](**inputs[name])
        return call

    def fwd_bwd(name):
        return lambda: torch.autograd.grad(fns[name](**inputs[name]), leaves, dy)

    for op, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        group = f"{op} N={n}"
        bench.compare(group, {f"{name} {group}": make(name) for name in fns}, baseline=f"{baseline} {group}",
                      extras={f"{name} {group}": dict(impl=name, N=n, op=op) for name in fns})


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    batch, seqlen, heads, headdim = opt["batch"], opt["seqlen"], opt["heads"], opt["headdim"]
    if seqlen % CHUNK:
        raise SystemExit(f"--seqlen must be a multiple of {CHUNK} (ssd_minimal_discrete's chunk), got {seqlen}")
    fns, notes = implementations(args.device)
    baseline = next(name for name in ("mamba", "minimal", "ours") if name in fns)
    bench = Bench(f"Mamba-2 scan, Bt={batch} L={seqlen} H={heads} P={headdim} fp32, baseline {baseline}",
                  device=args.device, warmup=opt["warmup"], repeats=opt["repeats"])
    for note in notes:
        bench.note(note)
    gen = torch.Generator().manual_seed(0)
    for n in sorted((int(v) for v in opt["dstates"].split(",")), reverse=True):
        time_dstate(bench, fns, baseline, (batch, seqlen, heads, headdim, n), args.device, gen)
    publish(bench, args, "ssd", columns=["op", "N"], plots={
        "": dict(x="N", series="impl", panel="op"),
    })
    return bench
