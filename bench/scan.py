"""Selective scan: fwd, bwd and fwd+bwd per backend and state size N, masked vs compacted, per-channel ranks.

    python -m bench scan --device cuda --backends cuda,triton,mamba --dstates 128,64,32,16,12,8 \
        [--batch 8 --dim 2048 --seqlen 2048 --dtype bf16] [--triton-config 2,256,4,4]
    python -m bench scan --device cpu [--quick]       # reference, C++ cpu, mamba_ssm's and HF's torch scans

Backends: this package's ``cuda``, ``triton``, ``cpu``, ``reference`` (``selective_scan_fn(backend=...)``),
and three outside ones: ``mamba`` (mamba_ssm's CUDA kernel, when its ``selective_scan_cuda`` extension is
importable), ``mamba_ref`` (mamba_ssm's torch ``selective_scan_ref``: materialises (Bt, D, L, N), a Python
loop over L) and ``hf`` (transformers' torch ``mamba_selective_scan``, the path HF's MambaMixer takes
without kernels). Unavailable ones are skipped with the reason. Ratios (``vs base``: baseline time / this
time, > 1 is faster) are to the baseline measured in the same run: the first of mamba, mamba_ref, cuda,
reference that runs (else the first backend listed).

Rows:
  * ``<backend> <pass> N=<n>``: plain scans (variable B/C, D, z, delta_bias, softplus), every backend.
  * ``<backend> masked k/Nmax`` and ``compacted N=k``: fwd+bwd of the full-size scan with a shared mask keeping
    k states and of the same scan physically compacted, against the unmasked scan (``full N=Nmax (mask k)``)
    timed round-robin with them.
  * ``<backend> per-channel ranks``: a per-channel mask with ranks averaging ``--rank``, vs the unmasked scan.
  The masked rows run on this package's kernels (on the reference only when no kernel is listed).

GB/s counts the bytes a fused kernel must move (activations in the input dtype): forward reads u, delta,
z, B, C and writes out, ``(4·D + 2·N)·Bt·L`` elements; backward reads u, delta, z, dout, B, C and writes
du, ddelta, dz, dB, dC, ``(8·D + 4·N)·Bt·L``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable

import torch

from compressm_kernels import selective_scan_fn
from compressm_kernels.ops.selective_scan import check_scan_inputs, interface

from .harness import Bench, publish, with_flags

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OURS = ("cuda", "triton", "cpu", "reference")
OUTSIDE = ("mamba", "mamba_ref", "hf")
BASELINE_ORDER = ("mamba", "mamba_ref", "cuda", "reference")
# (device, quick) -> defaults. The torch baselines' backward is an autograd graph over L Python steps: ~2 s per
# fwd+bwd call at Bt=1 D=256 L=128 N=64 on one core here, so the CPU sizes stay small.
SIZES = {
    ("cpu", True): dict(batch=1, dim=64, seqlen=64, dstates="64,16", backends="reference,cpu,mamba_ref,hf",
                        dtype="fp32", rank=8, warmup=1, repeats=5),
    ("cpu", False): dict(batch=1, dim=256, seqlen=128, dstates="64,32,16,8", backends="reference,cpu,mamba_ref,hf",
                         dtype="fp32", rank=12, warmup=1, repeats=3),
    ("cuda", True): dict(batch=2, dim=1024, seqlen=1024, dstates="64,16", backends="cuda,triton,mamba,reference",
                         dtype="bf16", rank=12, warmup=3, repeats=10),
    ("cuda", False): dict(batch=8, dim=2048, seqlen=2048, dstates="128,64,32,16,12,8", backends="cuda,triton,mamba",
                          dtype="bf16", rank=12, warmup=3, repeats=10),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", help="comma list of " + ",".join(OURS + OUTSIDE))
    p.add_argument("--dstates", help="comma list of N; the largest is the masked/ranks rows' full size")
    p.add_argument("--batch", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--rank", type=int, help="average per-channel rank of the ranks rows")
    p.add_argument("--passes", default="fwd,bwd,fwd+bwd",
                   help="comma list of fwd, bwd, fwd+bwd; the masked/compacted and ranks rows (fwd+bwd) run only "
                        "with fwd+bwd")
    p.add_argument("--triton-config", default=None, metavar="BLOCK_D,CHUNK,FWD_WARPS,BWD_WARPS",
                   help="force the Triton tile sizes (to sweep them)")


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, dtype: torch.dtype, device: str,
                seed: int = 0) -> dict:
    """Mamba-like inputs: A = -(1..N) per channel (S4D-real), delta around softplus' useful range."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dt)

    return {
        "u": randn(batch, dim, seqlen),
        "delta": randn(batch, dim, seqlen, scale=0.5, shift=-2.0),
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32, device=device).repeat(dim, 1),
        "B": randn(batch, dstate, seqlen),
        "C": randn(batch, dstate, seqlen),
        "D": randn(dim, dt=torch.float32),
        "z": randn(batch, dim, seqlen),
        "delta_bias": randn(dim, scale=0.1, dt=torch.float32),
    }


def allow_mamba_ssm_import() -> None:
    """mamba_ssm imports selective_scan_cuda at import time; its torch reference paths never call it."""
    if "selective_scan_cuda" not in sys.modules and importlib.util.find_spec("selective_scan_cuda") is None:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")


def _mamba_ref() -> Callable | str:
    allow_mamba_ssm_import()
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except ImportError as err:
        return f"mamba_ssm is not importable ({err})"
    return selective_scan_ref


def outside_scan(name: str, device: str) -> Callable | str:
    """The outside implementation ``name`` as ``f(u, delta, A, B, C, D, z, delta_bias, softplus)``, or why not."""
    if name == "mamba":
        if not device.startswith("cuda"):
            return "mamba_ssm's kernel needs a CUDA device"
        if importlib.util.find_spec("selective_scan_cuda") is None:
            return "mamba_ssm's CUDA extension selective_scan_cuda is not installed"
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

        return mamba_scan
    if name == "mamba_ref":
        return _mamba_ref()
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError as err:
        return f"transformers is not importable ({err})"
    return modeling_mamba.mamba_selective_scan.__wrapped__  # the torch body, not the kernel dispatcher


def scan_callable(backend: str, device: str) -> Callable[..., torch.Tensor] | str:
    """``f(**inputs, state_mask=None)`` for a backend, or the reason it cannot run here."""
    if backend in OUTSIDE:
        fn = outside_scan(backend, device)
        if isinstance(fn, str):
            return fn
        return lambda u, delta, A, B, C, D, z, delta_bias, state_mask=None: fn(u, delta, A, B, C, D, z, delta_bias,
                                                                               True)
    if backend not in OURS:
        raise SystemExit(f"unknown backend {backend!r}; choose from {', '.join(OURS + OUTSIDE)}")
    probe = make_inputs(1, 2, 4, 2, torch.float32, device)
    reason = interface._reason(backend, check_scan_inputs(*(probe[k] for k in ["u", "delta", "A", "B", "C"])))[1]
    if reason is not None:
        return reason
    return lambda **kw: selective_scan_fn(**kw, delta_softplus=True, backend=backend)


class Runner:
    """Times fwd / bwd / fwd+bwd of one backend on one set of inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict, state_mask=None) -> None:
        self.fn, self.state_mask = fn, state_mask
        self.inputs = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
        self.grad = torch.randn_like(self.inputs["u"])

    def forward(self) -> torch.Tensor:
        return self.fn(**self.inputs, state_mask=self.state_mask)

    def fwd(self) -> None:
        with torch.no_grad():
            self.forward()

    def fwd_bwd(self) -> None:
        torch.autograd.grad(self.forward(), list(self.inputs.values()), self.grad)

    def make_bwd(self) -> Callable[[], None]:
        out = self.forward()
        leaves = list(self.inputs.values())
        return lambda: torch.autograd.grad(out, leaves, self.grad, retain_graph=True)


def bytes_moved(batch: int, dim: int, seqlen: int, dstate: int, elt: int) -> dict[str, int]:
    fwd = (4 * dim + 2 * dstate) * batch * seqlen * elt
    bwd = (8 * dim + 4 * dstate) * batch * seqlen * elt
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt = with_flags(args, sizes)
    device, dtype = args.device, DTYPES[opt["dtype"]]
    dstates = sorted({int(n) for n in opt["dstates"].split(",")}, reverse=True)
    passes = args.passes.split(",")
    if unknown := set(passes) - {"fwd", "bwd", "fwd+bwd"}:
        raise SystemExit(f"unknown --passes {sorted(unknown)}; choose from fwd, bwd, fwd+bwd")
    n_max = dstates[0]
    shape = (opt["batch"], opt["dim"], opt["seqlen"])

    fns: dict[str, Callable] = {}
    skipped = []
    for name in opt["backends"].split(","):
        fn = scan_callable(name, device)
        if isinstance(fn, str):
            skipped.append(f"skipped backend {name!r}: {fn}")
        else:
            fns[name] = fn
    if not fns:
        raise SystemExit("no requested backend can run here:\n" + "\n".join(skipped))
    baseline = next((b for b in BASELINE_ORDER if b in fns), next(iter(fns)))
    order = [baseline] + [b for b in fns if b != baseline]
    # The reference is the correctness oracle; its masked timings are only worth their (slow) run alone.
    maskable = [b for b in order if b in OURS and b != "reference"] or [b for b in order if b == "reference"]

    config = contextlib.nullcontext()
    if args.triton_config:
        from compressm_kernels.ops.selective_scan import triton as triton_backend

        block_d, chunk, fwd_warps, bwd_warps = (int(v) for v in args.triton_config.split(","))
        config = triton_backend.forced_config(triton_backend.LaunchConfig(block_d, chunk, fwd_warps, bwd_warps))

    bench = Bench(f"selective scan Bt={shape[0]} D={shape[1]} L={shape[2]} {opt['dtype']}, baseline {baseline}",
                  device=device, warmup=opt["warmup"], repeats=opt["repeats"])
    for line in skipped:
        bench.note(line)
    elt = torch.finfo(dtype).bits // 8

    with config:
        for n in dstates:
            inputs = make_inputs(*shape, n, dtype, device)
            nbytes = bytes_moved(*shape, n, elt)
            runners = {backend: Runner(fns[backend], inputs) for backend in order}
            for pass_name in (p for p in ("fwd", "bwd", "fwd+bwd") if p in passes):
                names = {backend: f"{backend} {pass_name} N={n}" for backend in order}
                timed = {names[b]: {"fwd": r.fwd, "fwd+bwd": r.fwd_bwd}.get(pass_name) or r.make_bwd()
                         for b, r in runners.items()}
                rows = bench.compare(f"{pass_name} N={n}", timed, baseline=names[baseline], extras={
                    names[b]: {"kind": "plain", "backend": b, "N": n, "pass": pass_name} for b in order})
                for row in rows.values():
                    row.extra["GB/s"] = nbytes[pass_name] / (row.median_ms * 1e-3) / 1e9
                del timed, rows  # bwd closures hold a graph each
            del runners, inputs

        if "fwd+bwd" in passes:  # the masked/compacted and ranks rows time fwd+bwd
            full = make_inputs(*shape, n_max, dtype, device)
            gen = torch.Generator().manual_seed(0)
            for k in (n for n in dstates if n < n_max):
                keep = torch.randperm(n_max, generator=gen)[:k].sort().values
                mask = torch.zeros(n_max, dtype=torch.bool)
                mask[keep] = True
                compact = {**full, "A": full["A"][:, keep], "B": full["B"][:, keep], "C": full["C"][:, keep]}
                for backend in maskable:  # against the unmasked N = n_max scan, timed round-robin with them
                    plain = f"{backend} full N={n_max} (mask {k})"
                    masked, compacted = f"{backend} masked {k}/{n_max}", f"{backend} compacted N={k}"
                    bench.compare(f"{backend} mask {k}/{n_max}", {
                        plain: Runner(fns[backend], full).fwd_bwd,
                        masked: Runner(fns[backend], full, mask.to(device)).fwd_bwd,
                        compacted: Runner(fns[backend], compact).fwd_bwd,
                    }, baseline=plain, extras={
                        plain: dict(kind="mask baseline", backend=backend, variant="full", N=n_max),
                        masked: dict(kind="mask", backend=backend, variant="masked-full", kept=k, N=n_max),
                        compacted: dict(kind="mask", backend=backend, variant="compacted", kept=k, N=k),
                    })

            low = max(1, opt["rank"] // 3)
            ranks = torch.randint(low, 2 * opt["rank"] - low + 1, (shape[1],), generator=gen).clamp(1, n_max)
            per_channel = torch.arange(n_max)[None, :] < ranks[:, None]
            per_channel = torch.stack([row[torch.randperm(n_max, generator=gen)] for row in per_channel])
            for backend in maskable:
                plain, ranked = f"{backend} full N={n_max}", f"{backend} per-channel ranks"
                extra = dict(kind="ranks", backend=backend, N=n_max)
                bench.compare(f"{backend} ranks ~{ranks.float().mean():.1f}/{n_max}", {
                    plain: Runner(fns[backend], full).fwd_bwd,
                    ranked: Runner(fns[backend], full, per_channel.to(device)).fwd_bwd,
                }, baseline=plain, extras={plain: extra, ranked: extra})

    publish(bench, args, "scan", columns=["N", "GB/s"], plots={
        "": dict(x="N", series="backend", panel="pass", where=lambda r: r.extra.get("kind") == "plain"),
        "_gbps": dict(x="N", y="GB/s", series="backend", panel="pass", where=lambda r: r.extra.get("kind") == "plain"),
        "_mask": dict(x="kept", series="variant", panel="backend", where=lambda r: r.extra.get("kind") == "mask"),
    })
    return bench
