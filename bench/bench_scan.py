"""Selective-scan benchmark: fwd, bwd and fwd+bwd per backend and state size N, masked vs compacted.

    python bench/bench_scan.py --device cuda --backends triton,cuda,mamba --dstates 128,64,32,16,12,8 \
        [--batch 8 --dim 2048 --seqlen 2048 --dtype bf16] [--json bench/results/scan.json]
    TRITON_INTERPRET=1 python bench/bench_scan.py --device cpu --backends reference,cpu,triton \
        --batch 1 --dim 8 --seqlen 64 --dstates 16,8 --repeats 2     # smoke test without a GPU

Backends: ``triton``, ``cuda``, ``cpu``, ``reference`` (this package) and ``mamba`` (mamba_ssm's CUDA
kernel, when its ``selective_scan_cuda`` extension is importable). Unavailable ones are skipped with
the reason. Ratios (``vs base``: baseline time / this time, >1 is faster) are to the baseline measured
in the same run: mamba when present, else our cuda backend, else the first backend listed.

Rows:
  * ``<pass> N=<n>``: plain scans (variable B/C, D, z, delta_bias, softplus), all backends.
  * ``mask <k>/<Nmax>``: fwd+bwd of the full-size scan with a shared mask keeping k states against the
    same scan physically compacted to N=k (the ratio column is then compacted vs masked-full).
  * ``ranks ~<r>/<Nmax>``: a per-channel mask with ranks averaging r against the unmasked full scan.

GB/s counts the bytes a fused kernel must move (activations in the input dtype): forward reads u,
delta, z, B, C and writes out, ``(8·D + 4·N)·Bt·L`` bytes in bf16; backward reads u, delta, z, dout,
the saved pre-gate y, B, C and writes du, ddelta, dz, dB, dC, ``(16·D + 8·N)·Bt·L`` (dB/dC counted in
the input dtype).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench  # noqa: E402

from compressm_kernels import selective_scan_fn  # noqa: E402
from compressm_kernels.ops.selective_scan import check_scan_inputs, interface  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(batch: int, dim: int, seqlen: int, dstate: int, dtype: torch.dtype, device: str,
                seed: int = 0) -> dict:
    """Mamba-like inputs: A = -(1..N) per channel, delta around softplus' useful range."""
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


def mamba_reason(device: str) -> str | None:
    if not device.startswith("cuda"):
        return "mamba_ssm's kernel needs a CUDA device"
    if importlib.util.find_spec("selective_scan_cuda") is None:
        return "mamba_ssm's CUDA extension selective_scan_cuda is not installed"
    return None


def scan_callable(backend: str) -> Callable[..., torch.Tensor]:
    if backend == "mamba":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan

        return lambda state_mask=None, **kw: mamba_scan(**kw, delta_softplus=True)
    return lambda **kw: selective_scan_fn(**kw, delta_softplus=True, backend=backend)


def our_reason(backend: str, inputs: dict) -> str | None:
    x = check_scan_inputs(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    return interface._reason(backend, x)[1]


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="triton,cuda,mamba")
    p.add_argument("--dstates", default="128,64,32,16,12,8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rank", type=int, default=12, help="average per-channel rank for the ranks rows")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--triton-config", default=None, metavar="BLOCK_D,CHUNK,FWD_WARPS,BWD_WARPS",
                   help="force the Triton tile sizes (to sweep them)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device, dtype = args.device, DTYPES[args.dtype]
    dstates = sorted({int(n) for n in args.dstates.split(",")}, reverse=True)
    n_max = dstates[0]
    shape = (args.batch, args.dim, args.seqlen)
    probe = make_inputs(1, 2, 4, 2, dtype, device)

    backends: list[str] = []
    for name in args.backends.split(","):
        reason = mamba_reason(device) if name == "mamba" else our_reason(name, probe)
        if reason is not None:
            print(f"skipping backend {name!r}: {reason}")
        else:
            backends.append(name)
    if not backends:
        raise SystemExit("no requested backend can run here")
    baseline = next((b for b in ("mamba", "cuda") if b in backends), backends[0])
    order = [baseline] + [b for b in backends if b != baseline]
    maskable = [b for b in order if b != "mamba"]

    config = contextlib.nullcontext()
    if args.triton_config:
        from compressm_kernels.ops.selective_scan import triton as triton_backend

        block_d, chunk, fwd_warps, bwd_warps = (int(v) for v in args.triton_config.split(","))
        config = triton_backend.forced_config(triton_backend.LaunchConfig(block_d, chunk, fwd_warps, bwd_warps))

    bench = Bench(f"selective scan Bt={args.batch} D={args.dim} L={args.seqlen} {args.dtype}, baseline {baseline}",
                  device=device, warmup=args.warmup, repeats=args.repeats)
    elt = torch.finfo(dtype).bits // 8

    def gbps(nbytes: int, row) -> float:
        return nbytes / (row.median_ms * 1e-3) / 1e9

    with config:
        for n in dstates:
            inputs = make_inputs(*shape, n, dtype, device)
            nbytes = bytes_moved(*shape, n, elt)
            for backend in order:
                run = Runner(scan_callable(backend), inputs)
                for pass_name, fn in (("fwd", run.fwd), ("bwd", run.make_bwd()), ("fwd+bwd", run.fwd_bwd)):
                    row = bench.time(f"{backend} {pass_name} N={n}", fn, group=f"{pass_name} N={n}",
                                     baseline=backend == baseline, N=n)
                    row.extra["GB/s"] = gbps(nbytes[pass_name], row)
                del run
            del inputs

        full = make_inputs(*shape, n_max, dtype, device)
        gen = torch.Generator().manual_seed(0)
        for k in (n for n in dstates if n < n_max):
            keep = torch.randperm(n_max, generator=gen)[:k].sort().values
            mask = torch.zeros(n_max, dtype=torch.bool)
            mask[keep] = True
            compact = {**full, "A": full["A"][:, keep], "B": full["B"][:, keep], "C": full["C"][:, keep]}
            for backend in maskable:
                fn = scan_callable(backend)
                masked = Runner(fn, full, state_mask=mask.to(device))
                bench.time(f"{backend} masked {k}/{n_max}", masked.fwd_bwd, group=f"{backend} mask {k}/{n_max}",
                           baseline=True, N=n_max)
                bench.time(f"{backend} compacted N={k}", Runner(fn, compact).fwd_bwd,
                           group=f"{backend} mask {k}/{n_max}", N=k)

        ranks = torch.randint(max(1, args.rank // 3), 2 * args.rank - max(1, args.rank // 3) + 1, (args.dim,),
                              generator=gen).clamp(1, n_max)
        per_channel = torch.arange(n_max)[None, :] < ranks[:, None]
        per_channel = torch.stack([row[torch.randperm(n_max, generator=gen)] for row in per_channel])
        for backend in maskable:
            fn = scan_callable(backend)
            group = f"{backend} ranks ~{ranks.float().mean():.1f}/{n_max}"
            bench.time(f"{backend} full N={n_max}", Runner(fn, full).fwd_bwd, group=group, baseline=True,
                       N=n_max)
            bench.time(f"{backend} per-channel ranks", Runner(fn, full, per_channel.to(device)).fwd_bwd,
                       group=group, N=n_max)

    bench.report(json_path=args.json)


if __name__ == "__main__":
    main()
