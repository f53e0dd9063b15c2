"""python -m slimtune.bench [OP ...] [--device cpu|cuda] [--dtype ...] [--json FILE] [--plot FILE.png] | --traffic"""

import argparse
import sys
from pathlib import Path

import torch

from .harness import Context, default_results_dir, device_name, discover, format_table, run_groups, write_json

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def main(argv=None, prog: str = "python -m slimtune.bench") -> int:
    available = discover()
    p = argparse.ArgumentParser(prog=prog, description="slimtune microbenchmarks")
    p.add_argument("ops", nargs="*", metavar="OP", help=f"benchmarks to run (default: all): {', '.join(available)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory, a <device> folder is added (default: ~/.cache/slimtune/bench-results; "
        "benchmarks/results updates the checked-in figures)",
    )
    p.add_argument("--json", type=Path, default=None, help="results file (default: <out>/<ops>-<dtype>.json)")
    p.add_argument("--plot", type=Path, default=None, help="also draw the ratios to this PNG")
    p.add_argument("--quick", action="store_true", help="smallest shapes and short runs (smoke test)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of timing per provider (default 0.5; 0.05 with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU), 1 to 1024")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument(
        "--traffic",
        action="store_true",
        help="print the memory-traffic model per kernel and shape (bytes the design moves, the floor, their "
        "ratio; with --device cuda also the measured time and achieved GB/s) and exit",
    )
    args = p.parse_args(argv)

    if args.list:
        print("\n".join(available))
        return 0
    unknown = [o for o in args.ops if o not in available]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; available: {list(available)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        p.error(f"--threads must be in [1, 1024], got {args.threads}")
    if args.min_run_time is not None and not 0 < args.min_run_time <= 600:
        p.error(f"--min-run-time must be in (0, 600] seconds, got {args.min_run_time}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.traffic:
        from .traffic import table

        print(table(torch.device(args.device)))
        return 0
    dtype = _DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    ctx = Context(
        device=torch.device(args.device),
        dtype=dtype,
        quick=args.quick,
        min_run_time=args.min_run_time or (0.05 if args.quick else 0.5),
    )
    ops = args.ops or list(available)
    groups = [g for name in ops for g in available[name](ctx)]
    rows = run_groups(groups, ctx, progress=sys.stderr.isatty() or not args.quick)
    print(format_table(rows))
    out_dir = args.out / device_name(ctx.device) if args.out else default_results_dir(ctx)
    out = args.json or out_dir / f"{'+'.join(ops)}-{str(dtype).replace('torch.', '')}.json"
    print(f"results: {write_json(rows, out)}")
    if args.plot:
        from .plot import plot_rows

        print(f"plot: {plot_rows(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
