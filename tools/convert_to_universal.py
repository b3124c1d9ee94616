"""Convert a native checkpoint (DIR/global_stepN) into a universal one (DIR/global_stepN_universal).

    python tools/convert_to_universal.py --input_folder ckpt/global_step100 \
        --output_folder ckpt/global_step100_universal [--num_workers 4] [--replica-policy first] [--overwrite]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError, convert_to_universal  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_folder", "--input-folder", required=True)
    p.add_argument("--output_folder", "--output-folder", default=None,
                   help="default: INPUT_FOLDER with a _universal suffix")
    p.add_argument("--num_workers", "--num-workers", type=int, default=4)
    p.add_argument("--replica-policy", "--replica_policy", choices=["first", "mean", "strict"], default="first",
                   help="how replicated tensors (norms over TP, tied embeddings over PP) are merged: "
                        "first = take the owner's copy, mean = average, strict = refuse any disagreement")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing universal checkpoint in OUTPUT_FOLDER (never a native one)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    output = args.output_folder or args.input_folder.rstrip("/") + "_universal"
    start = time.perf_counter()
    try:
        report = convert_to_universal(args.input_folder, output, args.num_workers, args.replica_policy,
                                      progress=not args.no_progress, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {report.tensors} canonical tensors ({report.bytes_written / 2**20:.1f} MiB in "
          f"{len(report.files)} files) to {report.output} in {seconds:.2f} s; read "
          f"{report.bytes_read / 2**20:.1f} MiB")
    where = f" in {report.max_replica_tensor}" if report.max_replica_tensor else ""
    print(f"replicas: largest disagreement {report.max_replica_diff:.3e}{where} (policy {args.replica_policy})")
    print(f"latest_universal -> {os.path.basename(output.rstrip('/'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
