"""Decode step: tokens/s of ``selective_state_update`` per backend against the torch reference step, over N.

    python -m bench decode --device cpu [--quick] [--batch 2 --dim 1536 --dstates 64,32,16,8 --steps 100]

One timed call advances a ``(Bt, D, N)`` state by ``--steps`` tokens in place (fp32; z, D, dt_bias, softplus:
the Mamba block's configuration), so a step of a few microseconds is not lost in timer overhead.
``tok/s`` = Bt / (time per step): the tokens one layer of this width decodes per second. Backends:
``reference`` (our torch ``selective_state_update_ref``), ``cpu`` (the C++ kernel), ``mamba_ref``
(mamba_ssm's torch ``selective_state_update_ref``), ``hf`` (transformers' torch
``mamba_selective_state_update``) and ``mamba`` (mamba_ssm's Triton ``selective_state_update``, CUDA only).
Ratios are to the baseline measured in the same run: the first of mamba, mamba_ref, reference that can run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from compressm_kernels import selective_state_update, selective_state_update_ref
from compressm_kernels.ops.selective_scan import cpu as cpu_backend

from .harness import Bench, publish, with_flags
from .scan import allow_mamba_ssm_import

BACKENDS = ("reference", "cpu", "mamba_ref", "hf", "mamba")
BASELINE_ORDER = ("mamba", "mamba_ref", "reference")
SIZES = {
    ("cpu", True): dict(batch=2, dim=1536, dstates="64,16", steps=20, warmup=1, repeats=5),
    ("cpu", False): dict(batch=2, dim=1536, dstates="64,32,16,8", steps=100, warmup=2, repeats=10),
    ("cuda", True): dict(batch=16, dim=5120, dstates="64,16", steps=20, warmup=3, repeats=10),
    ("cuda", False): dict(batch=64, dim=5120, dstates="128,64,32,16,8", steps=100, warmup=3, repeats=10),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--batch", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--dstates")
    p.add_argument("--steps", type=int, help="decode steps per timed call")


def step_fn(backend: str, t: dict) -> Callable[[], object] | str:
    """One in-place decode step on tensors ``t`` for ``backend``, or the reason it cannot run."""
    args = (t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"])
    if backend == "reference":
        return lambda: selective_state_update_ref(*args, t["z"], t["dt_bias"], True)
    if backend == "cpu":
        reason = cpu_backend.state_update_unavailable_reason(t)
        return reason or (lambda: selective_state_update(*args, t["z"], t["dt_bias"], True, backend="cpu"))
    if backend == "mamba_ref":
        allow_mamba_ssm_import()
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref as mamba_ref
        except ImportError as err:
            return f"mamba_ssm is not importable ({err})"
        return lambda: mamba_ref(*args, z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    if backend == "hf":
        try:
            from transformers.models.mamba import modeling_mamba
        except ImportError as err:
            return f"transformers is not importable ({err})"
        hf_step = modeling_mamba.mamba_selective_state_update.__wrapped__  # the torch body
        return lambda: hf_step(*args, t["dt_bias"], True, t["z"])
    if backend == "mamba":
        if t["state"].device.type != "cuda":
            return "mamba_ssm's Triton step needs a CUDA device"
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update as mamba_step
        except ImportError as err:
            return f"mamba_ssm's Triton selective_state_update is not importable ({err})"
        return lambda: mamba_step(*args, t["z"], t["dt_bias"], True)
    raise SystemExit(f"unknown decode backend {backend!r}; choose from {', '.join(BACKENDS)}")


def make_tensors(batch: int, dim: int, dstate: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return {"state": randn(batch, dim, dstate), "x": randn(batch, dim), "dt": randn(batch, dim) - 2.0,
            "A": -torch.rand(dim, dstate, generator=gen).to(device) - 0.5, "B": randn(batch, dstate),
            "C": randn(batch, dstate), "D": randn(dim), "z": randn(batch, dim), "dt_bias": 0.1 * randn(dim)}


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    batch, dim, steps = opt["batch"], opt["dim"], opt["steps"]
    dstates = sorted({int(v) for v in opt["dstates"].split(",")}, reverse=True)
    requested = list(dict.fromkeys(["reference", *args.backends.split(",")]))
    probe = {b: step_fn(b, make_tensors(1, 8, 8, args.device)) for b in requested}
    runnable = [b for b in requested if not isinstance(probe[b], str)]
    baseline = next(b for b in BASELINE_ORDER if b in runnable)  # reference always runs
    bench = Bench(f"decode step Bt={batch} D={dim} fp32, {steps} steps per call, baseline {baseline}",
                  device=args.device, warmup=opt["warmup"], repeats=opt["repeats"])
    for backend in requested:
        if backend not in runnable:
            bench.note(f"skipped backend {backend!r}: {probe[backend]}")
    order = [baseline, *(b for b in runnable if b != baseline)]
    for n in dstates:
        t = make_tensors(batch, dim, n, args.device)
        step_fns = {b: step_fn(b, t) for b in order}
        fns = {f"{b} step N={n}": lambda fn=step_fns[b]: [fn() for _ in range(steps)] for b in order}
        rows = bench.compare(f"N={n}", fns, baseline=f"{baseline} step N={n}",
                             extras={f"{b} step N={n}": dict(backend=b, N=n) for b in order})
        for row in rows.values():
            row.extra["us/step"] = row.median_ms * 1e3 / steps
            row.extra["tok/s"] = batch / (row.median_ms * 1e-3 / steps)
    publish(bench, args, "decode", columns=["N", "us/step", "tok/s"], plots={
        "": dict(x="N", y="tok/s", series="backend"),
    })
    return bench
