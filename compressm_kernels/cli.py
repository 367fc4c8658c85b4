"""The ``compressm`` command line: ``compressm demo``, ``compressm backends``, ``compressm --version``."""

from __future__ import annotations

import argparse
import time

from ._version import __version__


def _median_ms(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> None:
    """CompreSSM on the built-in digits: full N vs cut at 10 % by Hankel energy vs born small."""
    from .digits_demo import run_demo

    run_demo(d_state=args.dstate, d_model=args.d_model, steps=args.steps, seeds=args.seeds, tau=args.tau,
             out_dir=args.out)


def scan_demo(args: argparse.Namespace) -> None:
    """Masked vs compacted selective scans on CPU: they agree, and the compacted one is faster."""
    import torch

    from . import compact_scan_args, selective_scan_fn

    torch.manual_seed(0)
    bt, d, length, n, keep = args.batch, args.dim, args.seqlen, args.dstate, args.keep
    u, delta, z = (torch.randn(bt, d, length) for _ in range(3))
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(bt, n, length), torch.randn(bt, n, length)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n)[:keep]] = True
    A_c, B_c, C_c = compact_scan_args(A, B, C, mask)

    def run_masked():
        return selective_scan_fn(u, delta, A, B, C, z=z, delta_softplus=True, state_mask=mask, backend=args.backend)

    def run_compacted():
        return selective_scan_fn(u, delta, A_c, B_c, C_c, z=z, delta_softplus=True, backend=args.backend)

    diff = (run_masked() - run_compacted()).abs().max().item()
    t_full = _median_ms(
        lambda: selective_scan_fn(u, delta, A, B, C, z=z, delta_softplus=True, backend=args.backend)
    )
    t_masked, t_compact = _median_ms(run_masked), _median_ms(run_compacted)
    print(f"selective scan on CPU, Bt={bt} D={d} L={length}, N={n} -> keep {keep} states, backend={args.backend}")
    print(f"max |masked - compacted| = {diff:.3e}")
    print(f"{'run':<22}{'median ms':>12}{'vs full':>10}")
    for name, t in (("full N", t_full), ("masked", t_masked), ("compacted", t_compact)):
        print(f"{name:<22}{t:>12.2f}{t_full / t:>9.2f}x")


def backends(args: argparse.Namespace) -> None:
    """Which scan backends can run on a device, and why the others cannot."""
    from . import backend_status

    try:
        status = backend_status(args.device)
    except ValueError as err:
        raise SystemExit(f"compressm backends: {err}") from None
    for name, reason in status.items():
        print(f"{name:<10} {'available' if reason is None else 'unavailable: ' + reason}")


def _help(fn) -> str:
    """A command's help from its docstring (argparse formats help with %, so a literal % is doubled)."""
    return fn.__doc__.replace("%", "%%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="compressm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"compressm_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=_help(demo))
    p.add_argument("--dstate", type=int, default=64, help="full state size N")
    p.add_argument("--d-model", type=int, default=64, help="model width (the scan has 2·d_model channels)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, default=1, help="seeds per run kind (mean ± sd when > 1)")
    p.add_argument("--tau", type=float, default=0.05, help="CompreSSM's tolerance on the Hankel spectrum")
    p.add_argument("--out", default="demo_out", help="folder for the PNG plots")
    p.set_defaults(func=demo)
    p = sub.add_parser("scan-demo", help=_help(scan_demo))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dstate", type=int, default=64)
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=scan_demo)
    p = sub.add_parser("backends", help=_help(backends))
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=backends)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
