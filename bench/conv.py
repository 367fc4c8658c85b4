"""Mamba's causal depthwise conv1d + SiLU: our kernel against the PyTorch path, forward, forward+backward and the
one-token decode step.

    python -m bench conv --device cpu [--quick] [--batch 4 --dims 512,1536 --seqlen 256 --width 4]

Rows per D (x the first half of an in_proj-shaped ``(Bt, 2D, L)`` tensor, as the Mamba layer passes it):
  * ``torch``: ``causal_conv1d_torch``, i.e. ``F.conv1d`` on a padded copy then ``F.silu`` (the baseline; its
    decode step is ``causal_conv1d_update_torch``).
  * ``ours``: ``causal_conv1d`` / ``causal_conv1d_update`` as the layer calls them: the C++ op on a CPU,
    causal-conv1d's CUDA kernels where installed (else the same PyTorch path) on a GPU.
The decode step runs under ``torch.no_grad()`` on a ``(Bt, D)`` token and a ``(Bt, D, W)`` conv state.
"""

from __future__ import annotations

import argparse

import torch

from compressm_kernels.ops.conv1d import (
    causal_conv1d,
    causal_conv1d_torch,
    causal_conv1d_update,
    causal_conv1d_update_torch,
)

from .harness import Bench, publish, with_flags

SIZES = {
    ("cpu", True): dict(batch=2, dims="256", seqlen=128, width=4, warmup=2, repeats=10),
    ("cpu", False): dict(batch=4, dims="512,1536", seqlen=256, width=4, warmup=3, repeats=15),
    ("cuda", True): dict(batch=4, dims="1536", seqlen=1024, width=4, warmup=3, repeats=10),
    ("cuda", False): dict(batch=8, dims="1536,5120", seqlen=2048, width=4, warmup=3, repeats=20),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int)
    p.add_argument("--dims", help="comma list of D (channels)")
    p.add_argument("--seqlen", type=int)
    p.add_argument("--width", type=int, help="taps W (Mamba's d_conv)")


def time_dim(bench: Bench, dim: int, batch: int, seqlen: int, width: int, dev: str, gen: torch.Generator) -> None:
    """The fwd, fwd+bwd and decode-step groups of one D."""
    xz = torch.randn(batch, 2 * dim, seqlen, generator=gen).to(dev)
    x = xz[:, :dim]
    x_leaf = x.detach().requires_grad_(True)
    weight = torch.randn(dim, width, generator=gen).to(dev).requires_grad_(True)
    bias = torch.randn(dim, generator=gen).to(dev).requires_grad_(True)
    dout = torch.randn(batch, dim, seqlen, generator=gen).to(dev)
    fns = {"torch": causal_conv1d_torch, "ours": causal_conv1d}

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(x, weight, bias, "silu")
        return call

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x_leaf, weight, bias, "silu"), [x_leaf, weight, bias], dout)

    token = torch.randn(batch, dim, generator=gen).to(dev)
    states = {name: torch.randn(batch, dim, width, generator=gen).to(dev) for name in fns}
    steps = {"torch": causal_conv1d_update_torch, "ours": causal_conv1d_update}

    def step(name):
        def call():
            with torch.no_grad():
                steps[name](token, states[name], weight, bias, "silu")
        return call

    for op, make in (("fwd", lambda name: fwd(fns[name])), ("fwd+bwd", lambda name: fwd_bwd(fns[name])),
                     ("decode step", step)):
        group = f"{op} D={dim}"
        bench.compare(group, {f"{name} {group}": make(name) for name in fns}, baseline=f"torch {group}",
                      extras={f"{name} {group}": dict(impl=name, D=dim, op=op) for name in fns})


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    batch, seqlen, width = opt["batch"], opt["seqlen"], opt["width"]
    bench = Bench(f"causal conv1d + SiLU, Bt={batch} L={seqlen} W={width} fp32, baseline torch", device=args.device,
                  warmup=opt["warmup"], repeats=opt["repeats"])
    gen = torch.Generator().manual_seed(0)
    for dim in sorted(int(v) for v in opt["dims"].split(",")):
        time_dim(bench, dim, batch, seqlen, width, args.device, gen)
    publish(bench, args, "conv", columns=["op", "D"], plots={
        "": dict(x="D", series="impl", panel="op", logx=False),
    })
    return bench
