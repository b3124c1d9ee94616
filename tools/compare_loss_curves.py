"""Check that a resumed run's loss curve continues the reference run's.

    python tools/compare_loss_curves.py --reference runs/reference --resumed runs/resumed \
        [--tag "lm-loss-training/lm loss"] [--tolerance 1e-4] [--resume-iteration N] [--plot out.png]

Exit status: 0 PASS, 1 FAIL, 2 bad input (missing files or tag, no overlapping iterations).
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from any folder without installing the package: the repo root holds `megatron`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.loss_curves import compare_curves, plot_comparison
from megatron.metrics_io import read_scalars

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_TAG = "lm-loss-training/lm loss"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="run folder of the uninterrupted run")
    parser.add_argument("--resumed", required=True, help="run folder of the run resumed from a checkpoint")
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"scalar to compare (default {DEFAULT_TAG!r})")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |difference| (default 1e-4)")
    parser.add_argument("--resume-iteration", type=int, default=None,
                        help="checkpoint iteration the resumed run started from "
                             "(default: inferred from the resumed run's first logged iteration)")
    parser.add_argument("--plot", default=None, help="write a PNG of both curves and their difference here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        reference = read_scalars(args.reference, args.tag)
        resumed = read_scalars(args.resumed, args.tag)
        result = compare_curves(reference, resumed, args.tolerance, args.resume_iteration)
    except ValueError as exc:  # MetricsReadError, NoOverlapError, or a negative tolerance
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"reference: {args.reference} ({len(reference)} points)")
    print(f"resumed:   {args.resumed} ({len(resumed)} points)")
    print(f"tag:       {args.tag}")
    if args.plot:
        print(f"plot:      {plot_comparison(reference, resumed, result, args.plot, tag=args.tag)}")
    print(result.report())
    return EXIT_PASS if result.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
