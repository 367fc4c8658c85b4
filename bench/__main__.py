"""``python -m bench <suite>``: one CLI for every benchmark suite (see bench/README.md).

    python -m bench all --device cpu --quick                  # every suite, small sizes (~2-3 min on 2 cores)
    python -m bench scan --device cuda --backends cuda,triton,mamba --dstates 128,64,32,16 --json-dir out
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import block, conv, decode, hankel, hf, scan, ssd

SUITES = {"scan": scan, "decode": decode, "block": block, "conv": conv, "hankel": hankel, "hf": hf,
          "ssd": ssd}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke runs, CI-sized)")
    p.add_argument("--json-dir", default="bench/results", help="where <suite>_<device>.json goes ('' for none)")
    p.add_argument("--plots-dir", default="bench/results", help="where the PNG plots go ('' for none)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: torch's choice)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: per suite and size)")
    p.add_argument("--repeats", type=int, help="timed calls per row (default: per suite and size)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="suite", required=True)
    for name, module in SUITES.items():
        sp = sub.add_parser(name, help=module.__doc__.split("\n")[0], description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(sp)
        module.add_arguments(sp)
    _common(sub.add_parser("all", help="every suite with its defaults for the device"))
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    # "all" re-parses the same common flags once per suite, so each suite gets its own defaults.
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = [p.parse_args([name, *argv[1:]]) for name in SUITES] if args.suite == "all" else [args]
    for run_args in runs:
        run_args.json_dir = run_args.json_dir or None
        run_args.plots_dir = run_args.plots_dir or None
        start = time.perf_counter()
        SUITES[run_args.suite].run(run_args)
        print(f"[{run_args.suite}: {time.perf_counter() - start:.1f} s]\n", flush=True)


if __name__ == "__main__":
    main()
