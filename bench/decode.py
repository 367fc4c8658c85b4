"""Decode step: tokens/s of ``selective_state_update`` per backend against the torch reference step, over N.

    python -m bench decode --device cpu [--quick] [--batch 2 --dim 1536 --dstates 64,32,16,8 --steps 100]
    python -m bench decode --device cpu --headdim 64 --dstates 128,64,16     # Mamba-2's multi-head step

One timed call advances a ``(Bt, D, N)`` state by ``--steps`` tokens in place (fp32; z, D, dt_bias, softplus:
the Mamba block's configuration), so a step of a few microseconds is not lost in timer overhead. With
``--headdim P``, Mamba-2's step instead: a ``(Bt, D/P, P, N)`` state whose heads of P channels share one A, dt,
D and dt_bias, as ``Mamba2.step`` passes them (expanded views, no z: its gate goes to the norm); ``cpu`` then
runs the route ``integrations.mamba_ssm.install()`` gives that step.
``tok/s`` = Bt / (time per step): the tokens one layer of this width decodes per second. Backends:
``reference`` (our torch ``selective_state_update_ref``), ``cpu`` (the C++ kernel), ``triton`` (our Triton
kernel, CUDA only), ``mamba_ref``
(mamba_ssm's torch ``selective_state_update_ref``), ``hf`` (transformers' torch
``mamba_selective_state_update``) and ``mamba`` (mamba_ssm's Triton ``selective_state_update``, CUDA only).
Ratios are to the baseline measured in the same run: the first of mamba, mamba_ref, reference that can run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from compressm_kernels import selective_state_update, selective_state_update_ref
from compressm_kernels.integrations.mamba_ssm_ssd import multi_head_state_update
from compressm_kernels.ops.selective_scan import cpu as cpu_backend
from compressm_kernels.ops.selective_scan import triton as triton_backend

from .harness import Bench, publish, with_flags
from .scan import allow_mamba_ssm_import

BACKENDS = ("reference", "cpu", "triton", "mamba_ref", "hf", "mamba")
STEP_ARGS = ("state", "x", "dt", "A", "B", "C", "D")
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
    p.add_argument("--headdim", type=int, default=0, help="Mamba-2's multi-head step with heads of this size")


def step_fn(backend: str, t: dict) -> Callable[[], object] | str:
    """One in-place decode step on tensors ``t`` for ``backend``, or the reason it cannot run."""
    args = (t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"])
    multi_head = t["state"].dim() == 4
    if backend == "reference":
        flat = flat_heads(t) if multi_head else t  # views of the same state, built before the timing
        return lambda: selective_state_update_ref(*(flat[k] for k in STEP_ARGS), flat["z"], flat["dt_bias"], True)
    if backend in ("cpu", "triton"):
        if backend == "triton" and t["state"].device.type != "cuda":  # on a CPU only the interpreter, for tests
            return "our Triton step needs a CUDA device"
        reason = {"cpu": cpu_backend, "triton": triton_backend}[backend].state_update_unavailable_reason(t)
        if reason or not multi_head:
            return reason or (lambda: selective_state_update(*args, t["z"], t["dt_bias"], True, backend=backend))
        return lambda: multi_head_state_update(*args, t["z"], t["dt_bias"], True)  # auto: this backend
    if backend == "mamba_ref":
        allow_mamba_ssm_import()
        try:
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref as mamba_ref
        except ImportError as err:
            return f"mamba_ssm is not importable ({err})"
        return lambda: mamba_ref(*args, z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True)
    if backend == "hf":
        if multi_head:
            return "transformers' Mamba-2 decode step is inline in its mixer, not a function of its own"
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


def make_tensors(batch: int, dim: int, dstate: int, device: str, headdim: int = 0) -> dict:
    """One step's arguments: Mamba-1's ``(Bt, D, N)`` step, or with ``headdim`` Mamba-2's ``(Bt, H, P, N)``."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    if not headdim:
        return {"state": randn(batch, dim, dstate), "x": randn(batch, dim), "dt": randn(batch, dim) - 2.0,
                "A": -torch.rand(dim, dstate, generator=gen).to(device) - 0.5, "B": randn(batch, dstate),
                "C": randn(batch, dstate), "D": randn(dim), "z": randn(batch, dim), "dt_bias": 0.1 * randn(dim)}
    if dim % headdim:
        raise SystemExit(f"--headdim {headdim} must divide --dim {dim}")
    heads = dim // headdim
    A = -torch.rand(heads, generator=gen).to(device) - 0.5
    return {"state": randn(batch, heads, headdim, dstate), "x": randn(batch, heads, headdim),
            "dt": (randn(batch, heads) - 2.0)[..., None].expand(-1, -1, headdim),
            "A": A[:, None, None].expand(-1, headdim, dstate), "B": randn(batch, 1, dstate),
            "C": randn(batch, 1, dstate), "D": randn(heads)[:, None].expand(-1, headdim), "z": None,
            "dt_bias": (0.1 * randn(heads))[:, None].expand(-1, headdim)}


def flat_heads(t: dict) -> dict:
    """Mamba-2's step arguments as Mamba-1's: the heads' channels flattened, A materialised."""
    batch, heads, headdim, dstate = t["state"].shape
    dim = heads * headdim
    return {"state": t["state"].view(batch, dim, dstate), "x": t["x"].reshape(batch, dim),
            "dt": t["dt"].reshape(batch, dim), "A": t["A"].reshape(dim, dstate), "B": t["B"], "C": t["C"],
            "D": t["D"].reshape(dim), "z": None, "dt_bias": t["dt_bias"].reshape(dim)}


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    batch, dim, steps = opt["batch"], opt["dim"], opt["steps"]
    dstates = sorted({int(v) for v in opt["dstates"].split(",")}, reverse=True)
    requested = list(dict.fromkeys(["reference", *args.backends.split(",")]))
    headdim = args.headdim
    probe = {b: step_fn(b, make_tensors(1, 8, 8, args.device, 4 if headdim else 0)) for b in requested}
    runnable = [b for b in requested if not isinstance(probe[b], str)]
    baseline = next(b for b in BASELINE_ORDER if b in runnable)  # reference always runs
    kind = f"Mamba-2 heads of {headdim}" if headdim else "Mamba-1"
    bench = Bench(f"decode step ({kind}) Bt={batch} D={dim} fp32, {steps} steps per call, baseline {baseline}",
                  device=args.device, warmup=opt["warmup"], repeats=opt["repeats"])
    for backend in requested:
        if backend not in runnable:
            bench.note(f"skipped backend {backend!r}: {probe[backend]}")
    order = [baseline, *(b for b in runnable if b != baseline)]
    for n in dstates:
        t = make_tensors(batch, dim, n, args.device, headdim)
        step_fns = {b: step_fn(b, t) for b in order}
        fns = {f"{b} step N={n}": lambda fn=step_fns[b]: [fn() for _ in range(steps)] for b in order}
        rows = bench.compare(f"N={n}", fns, baseline=f"{baseline} step N={n}",
                             extras={f"{b} step N={n}": dict(backend=b, N=n) for b in order})
        for row in rows.values():
            row.extra["us/step"] = row.median_ms * 1e3 / steps
            row.extra["tok/s"] = batch / (row.median_ms * 1e-3 / steps)
    publish(bench, args, "decode_mamba2" if headdim else "decode", columns=["N", "us/step", "tok/s"], plots={
        "": dict(x="N", y="tok/s", series="backend"),
    })
    return bench
