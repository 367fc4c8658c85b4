"""CPU benchmark: our C++ scan (backend="cpu") against mamba_ssm's ``selective_scan_ref`` and HF transformers'
torch scan, forward and forward+backward, on the same shapes in one run; the decode step against the torch
reference step; and a compacted N=8 scan against N=64.

What each baseline is, exactly:
- mamba_ssm: ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` (materialises (Bt, D, L, N), then a
  Python loop over L).
- HF: ``transformers.models.mamba.modeling_mamba.mamba_selective_scan.__wrapped__``, the torch function HF's
  MambaMixer falls back to without kernels (same math as its per-token slow path: materialised
  exp(Δ·A) and Δ·B·u, a Python loop over tokens). The wrapper itself would dispatch to mamba_ssm's CUDA op.
- decode: ``selective_state_update_ref`` (our torch step) and HF's torch ``mamba_selective_state_update``.
All inputs fp32, delta_softplus with delta_bias, D and z (the Mamba block's configuration).

    PYTHONPATH=. python bench/bench_cpu.py [--quick] [--json bench/results/cpu.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types

import torch

from harness import Bench

from compressm_kernels import selective_scan_fn, selective_state_update, selective_state_update_ref


def _mamba_ref():
    # mamba_ssm imports selective_scan_cuda at import time; its reference path never calls it.
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except ImportError as err:
        print(f"mamba_ssm not importable ({err}); skipping that baseline")
        return None
    return selective_scan_ref


def _hf():
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError as err:
        print(f"transformers not importable ({err}); skipping that baseline")
        return None, None
    return modeling_mamba.mamba_selective_scan.__wrapped__, modeling_mamba.mamba_selective_state_update.__wrapped__


def scan_inputs(batch: int, dim: int, seqlen: int, dstate: int, grad: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    t = {
        "u": torch.randn(batch, dim, seqlen, generator=gen),
        "delta": 0.5 * torch.randn(batch, dim, seqlen, generator=gen) - 1.0,
        "A": -torch.exp(0.5 * torch.randn(dim, dstate, generator=gen)),
        "B": torch.randn(batch, dstate, seqlen, generator=gen),
        "C": torch.randn(batch, dstate, seqlen, generator=gen),
        "D": torch.randn(dim, generator=gen),
        "z": torch.randn(batch, dim, seqlen, generator=gen),
        "delta_bias": 0.3 * torch.randn(dim, generator=gen),
    }
    return {k: v.requires_grad_(grad) for k, v in t.items()}


def fwd(fn, x: dict, **kw):
    def run():
        with torch.no_grad():
            return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, **kw)

    return run


def fwd_bwd(fn, x: dict, **kw):
    def run():
        out = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for t in x.values():
            t.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    mamba_ref = _mamba_ref()
    hf_scan, hf_step = _hf()
    # The torch baselines materialise (Bt, D, L, N) and loop over L in Python; their backward is slow
    # (tens of seconds at N=64 here), so fwd+bwd uses a shorter sequence and fewer repeats.
    fwd_shape, bwd_shape = ((2, 512, 128), (2, 256, 128)) if args.quick else ((2, 512, 256), (2, 512, 128))
    bench = Bench("CPU selective scan", device="cpu", warmup=1, repeats=5)
    slow = Bench("CPU selective scan, fwd+bwd", device="cpu", warmup=1, repeats=3)

    for target, mode, make, (batch, dim, seqlen) in ((bench, "fwd", fwd, fwd_shape),
                                                      (slow, "fwd+bwd", fwd_bwd, bwd_shape)):
        for dstate in (64, 32, 16, 8):
            x = scan_inputs(batch, dim, seqlen, dstate, grad=mode != "fwd")
            group = f"{mode} Bt{batch} D{dim} L{seqlen} N{dstate}"
            if mamba_ref is not None:
                target.time(f"mamba_ssm ref {mode} N={dstate}", make(mamba_ref, x), group=group, baseline=True)
            if hf_scan is not None:
                target.time(f"HF torch scan {mode} N={dstate}", make(hf_scan, x), group=group)
            target.time(f"ours cpu {mode} N={dstate}", make(selective_scan_fn, x, backend="cpu"), group=group)

    # Compaction: the same layer after a cut from 64 to 8 states.
    batch, dim, seqlen = (2, 1024, 512)
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        group = f"compact {mode} Bt{batch} D{dim} L{seqlen}"
        for dstate in (64, 8):
            x = scan_inputs(batch, dim, seqlen, dstate, grad=mode != "fwd")
            bench.time(f"ours cpu {mode} N={dstate}", make(selective_scan_fn, x, backend="cpu"), group=group,
                       baseline=dstate == 64)

    # Decode: one token of a Mamba-130m-sized layer (D = 1536), state updated in place; 100 steps per call.
    for dstate in (16, 8):
        gen = torch.Generator().manual_seed(1)
        batch, dim = 2, 1536
        state = torch.randn(batch, dim, dstate, generator=gen)
        x, dt, z = (torch.randn(batch, dim, generator=gen) for _ in range(3))
        A, B, C = -torch.rand(dim, dstate, generator=gen), *(torch.randn(batch, dstate, generator=gen) for _ in "BC")
        D, dt_bias = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
        steps = {
            "torch ref": lambda: selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, True),
            "HF torch": (lambda: hf_step(state, x, dt, A, B, C, D, dt_bias, True, z)) if hf_step else None,
            "ours cpu": lambda: selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, backend="cpu"),
        }
        group = f"decode x100 Bt{batch} D{dim} N{dstate}"
        for name, step in steps.items():
            if step is not None:
                bench.time(f"{name} step x100 N={dstate}", lambda step=step: [step() for _ in range(100)],
                           group=group, baseline=name == "torch ref")

    slow.report()
    bench.report(json_path=args.json)


if __name__ == "__main__":
    main()
