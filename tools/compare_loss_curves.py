"""Check that a resumed run's loss curve continues the reference run's.

    python tools/compare_loss_curves.py --reference runs/reference --resumed runs/resumed \
        [--tag "lm-loss-training/lm loss"] [--precision fp32|bf16|fp16 | --tolerance T]
        [--resume-iteration N] [--plot out.png]

It lists the event files read for each side, and refuses (exit 2) a comparison that
cannot mean anything: the same folder or files on both sides (a folder inside the other,
byte-identical copies), a resumed run that logged iterations at or before the resume point
(it did not start from the checkpoint), or no iteration after the resume point in both.
Exit status: 0 PASS, 1 FAIL, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from any folder without installing the package: the repo root holds `megatron`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.loss_curves import compare_runs, plot_comparison, tolerance_for

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_TAG = "lm-loss-training/lm loss"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="run folder of the uninterrupted run")
    parser.add_argument("--resumed", required=True, help="run folder of the run resumed from a checkpoint")
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"scalar to compare (default {DEFAULT_TAG!r})")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="training precision; sets the default tolerance (fp32 1e-4, bf16 3e-2, fp16 1e-2)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed |difference| (default: from --precision)")
    parser.add_argument("--resume-iteration", type=int, default=None,
                        help="checkpoint iteration the resumed run started from "
                             "(default: inferred from the resumed run's first logged iteration)")
    parser.add_argument("--plot", default=None, help="write a PNG of both curves and their difference here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tolerance = args.tolerance if args.tolerance is not None else tolerance_for(args.precision)
    try:
        run = compare_runs(args.reference, args.resumed, args.tag, tolerance, args.resume_iteration)
    except ValueError as exc:  # unreadable runs, the same run twice, not resumed, no overlap, bad tolerance
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(run.sources())
    print(f"tag:       {args.tag}")
    if args.plot:
        print(f"plot:      {plot_comparison(run.reference, run.resumed, run.result, args.plot, tag=args.tag)}")
    print(run.result.report())
    return EXIT_PASS if run.result.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
