"""Export a native or universal checkpoint as a Hugging Face transformers model folder.

    python tools/export_hf.py --input_folder ckpt/global_step100_universal --output_folder hf_model \
        [--dtype bf16|fp32] [--tokenizer TOKENIZER_DIR] [--max-shard-size-mb 5000]

GPT-2, Llama (GQA) and BLOOM-shaped models; the architecture follows from the model config.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.interop.canonical import checkpoint_config, open_checkpoint, read_tensors  # noqa: E402
from megatron.interop.hf import DTYPES, family_of, write_hf_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_folder", "--input-folder", required=True,
                   help="a checkpoint folder, or a save directory (its latest_universal, else latest)")
    p.add_argument("--output_folder", "--output-folder", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokenizer", default=None, help="a transformers tokenizer folder to copy alongside")
    p.add_argument("--max-shard-size-mb", "--max_shard_size_mb", type=float, default=5000.0)
    args = p.parse_args(argv)
    try:
        reader = open_checkpoint(args.input_folder)
        cfg = checkpoint_config(reader)
        family = family_of(cfg)
        tensors = {n: s["fp32"] for n, s in read_tensors(reader).items()}
        files = write_hf_folder(args.output_folder, cfg, tensors, args.dtype,
                                int(args.max_shard_size_mb * 2**20), args.tokenizer)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {len(tensors)} canonical tensors from {reader.path} (iteration "
          f"{reader.manifest['state']['iteration']})")
    print(f"wrote {family.model_type} model ({args.dtype}) to {args.output_folder}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
