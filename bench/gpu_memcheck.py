"""The CUDA scan's forward and backward on awkward shapes, for ``compute-sanitizer`` to watch (bench/gpu_check.sh).

    compute-sanitizer --tool memcheck python -m bench.gpu_memcheck
    compute-sanitizer --tool racecheck python -m bench.gpu_memcheck --few

Only our kernels and a few torch ops run (no reference scan, whose thousands of small launches would make the
sanitizer's run take minutes); the values are checked by tests/test_gpu_scans.py, this looks for
out-of-bounds accesses, misaligned loads and shared-memory races.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from compressm_kernels import selective_scan_fn

# (batch, dim, seqlen, dstate, B/C form, dtype): lengths off the 256-step chunk and the vector width,
# N off the power-of-two register blocks, rows misaligned by a one-element offset.
SHAPES = [
    (1, 3, 1, 1, "variable", torch.float32),
    (2, 6, 255, 13, "grouped", torch.bfloat16),
    (2, 4, 257, 12, "invariant", torch.float16),
    (1, 6, 513, 64, "variable", torch.bfloat16),
    (1, 2, 300, 128, "grouped", torch.float32),
    (1, 2, 70, 256, "variable", torch.bfloat16),
]


def _inputs(batch, dim, seqlen, dstate, form, dtype, misaligned):
    gen = torch.Generator().manual_seed(dim * seqlen + dstate)

    def act(*shape):
        t = torch.randn(*shape[:-1], shape[-1] + misaligned, generator=gen).to("cuda", dtype)
        return t[..., misaligned:].requires_grad_()

    bc = {"variable": lambda: act(batch, dstate, seqlen), "grouped": lambda: act(batch, 2, dstate, seqlen),
          "invariant": lambda: torch.randn(dim, dstate, generator=gen).cuda().requires_grad_()}[form]
    return dict(u=act(batch, dim, seqlen), delta=act(batch, dim, seqlen),
                A=(-torch.rand(dim, dstate, generator=gen) - 0.1).cuda().requires_grad_(), B=bc(), C=bc(),
                D=torch.randn(dim, generator=gen).cuda().requires_grad_(), z=act(batch, dim, seqlen),
                delta_bias=torch.randn(dim, generator=gen).cuda().requires_grad_())


def run(few: bool) -> int:
    calls = 0
    shapes = SHAPES[1:3] if few else SHAPES
    for shape, misaligned, mask_kind in itertools.product(shapes, (0, 1), ("none", "shared", "per-channel")):
        if few and (misaligned or mask_kind == "shared"):
            continue
        dim, dstate = shape[1], shape[3]
        x = _inputs(*shape, misaligned=misaligned)
        gen = torch.Generator().manual_seed(calls)
        mask = None
        if mask_kind != "none":
            mask = torch.rand((dstate,) if mask_kind == "shared" else (dim, dstate), generator=gen) < 0.5
            mask[..., 0] = True
            mask = mask.cuda()
        out, last = selective_scan_fn(**x, delta_softplus=True, return_last_state=True, state_mask=mask,
                                      backend="cuda")
        (out.float().sum() + last.sum()).backward()
        torch.cuda.synchronize()
        calls += 1
    return calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--few", action="store_true", help="two shapes, aligned, unmasked and per-channel (racecheck)")
    calls = run(p.parse_args().few)
    print(f"{calls} forward+backward calls of the CUDA scan ran")


if __name__ == "__main__":
    main()
