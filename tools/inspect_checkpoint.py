"""Print a checkpoint's layout, iteration, tensors and sizes, and verify every checksum.

    python tools/inspect_checkpoint.py ckpt/global_step100 [--no-verify]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.checkpointing.inspect import describe_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint folder (global_stepN or global_stepN_universal)")
    p.add_argument("--no-verify", action="store_true", help="skip reading every byte to check checksums")
    args = p.parse_args(argv)
    try:
        print(describe_checkpoint(args.path, verify=not args.no_verify))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
