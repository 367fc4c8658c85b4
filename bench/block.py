"""One Mamba block's training step (fwd + bwd + AdamW step) before and after surgery, N=64 → {32, 16, 8}.

    python -m bench block --device cpu [--quick] [--d-model 256 --batch 4 --seqlen 256 --cuts 32,16,8]

The block is ``compressm_kernels.Mamba(d_model, d_state=N)`` (fp32, its fused inner path) with loss
``mean(out²)``. Rows, all in one group against the full-size step measured in the same run:
  * ``full N=64``: the baseline.
  * ``compacted N=k``: a copy of the block after ``compress_model(block, calib, rank=k, optimizer=opt)``
    (Hankel-ranked states; A_log, x_proj and AdamW's moments physically sliced), i.e. training after a cut.
  * ``masked k/64``: the full block with ``set_state_mask`` keeping the same number of states: what a cut
    costs if the states are only switched off rather than removed.
``--backend`` sets ``COMPRESSM_BACKEND`` for the scans inside the block (default: auto).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from compressm_kernels import Mamba, compress_model
from compressm_kernels.ops.selective_scan import check_scan_inputs, resolve_backend

from .harness import Bench, publish, with_flags

SIZES = {
    ("cpu", True): dict(d_model=64, batch=2, seqlen=128, dstate=64, cuts="16,8", warmup=2, repeats=10),
    ("cpu", False): dict(d_model=256, batch=4, seqlen=256, dstate=64, cuts="32,16,8", warmup=2, repeats=10),
    ("cuda", True): dict(d_model=512, batch=4, seqlen=1024, dstate=64, cuts="16,8", warmup=3, repeats=10),
    ("cuda", False): dict(d_model=1024, batch=8, seqlen=2048, dstate=64, cuts="32,16,8", warmup=3, repeats=10),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", dest="d_model", type=int, help="d_inner = 2·d_model")
    p.add_argument("--batch", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--dstate", type=int, help="N before surgery")
    p.add_argument("--cuts", help="comma list of N after surgery")
    p.add_argument("--backend", default="auto", help="scan backend inside the block (COMPRESSM_BACKEND)")


def train_step(block: Mamba, opt: torch.optim.Optimizer, x: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        block(x).square().mean().backward()
        opt.step()

    return step


def run(args: argparse.Namespace) -> Bench:
    sizes = SIZES[("cuda" if args.device.startswith("cuda") else "cpu", args.quick)]
    opt_ = with_flags(args, sizes)
    d_model, batch, seqlen, n = opt_["d_model"], opt_["batch"], opt_["seqlen"], opt_["dstate"]
    cuts = sorted({int(k) for k in opt_["cuts"].split(",")}, reverse=True)
    previous = os.environ.get("COMPRESSM_BACKEND")
    os.environ["COMPRESSM_BACKEND"] = args.backend
    try:
        torch.manual_seed(0)
        base = Mamba(d_model, d_state=n, device=args.device)
        x = torch.randn(batch, seqlen, d_model, device=args.device)
        probe = check_scan_inputs(*(torch.zeros(1, 2, 4, device=args.device) for _ in range(2)),
                                  -torch.ones(2, 2, device=args.device), *(torch.zeros(1, 2, 4, device=args.device)
                                                                          for _ in range(2)))
        scan_backend = resolve_backend(probe)[0]
        bench = Bench(f"Mamba block training step, d_model={d_model} (d_inner={2 * d_model}) Bt={batch} L={seqlen} "
                      f"fp32, scan backend {scan_backend}, baseline full N={n}",
                      device=args.device, warmup=opt_["warmup"], repeats=opt_["repeats"])

        def fresh() -> tuple[Mamba, torch.optim.Optimizer]:
            block = copy.deepcopy(base)
            opt = torch.optim.AdamW(block.parameters(), lr=1e-3)
            train_step(block, opt, x)()  # Adam moments exist, so surgery slices real optimizer state
            return block, opt

        steps, extras = {}, {}  # every variant's training step, timed round-robin in one group

        def add(name: str, block: Mamba, opt: torch.optim.Optimizer, **extra: object) -> None:
            steps[name], extras[name] = train_step(block, opt, x), extra

        add(f"full N={n}", *fresh(), variant="full", N=n)
        for k in cuts:
            block, opt = fresh()
            compress_model(block, [x], rank=k, optimizer=opt)
            if block.d_state != k:
                raise RuntimeError(f"compress_model(rank={k}) left N={block.d_state}")
            add(f"compacted N={k}", block, opt, variant="compacted", N=k)
            block, opt = fresh()
            mask = torch.zeros(n, dtype=torch.bool, device=args.device)
            mask[:k] = True
            block.set_state_mask(mask)
            add(f"masked {k}/{n}", block, opt, variant="masked", N=k)
        bench.compare("train step", steps, baseline=f"full N={n}", extras=extras)
    finally:
        if previous is None:
            os.environ.pop("COMPRESSM_BACKEND")
        else:
            os.environ["COMPRESSM_BACKEND"] = previous
    publish(bench, args, "block", columns=["N"], plots={
        "": dict(x="N", series="variant"),
    })
    return bench
