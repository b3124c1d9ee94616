"""Import a local Hugging Face transformers model folder as a universal checkpoint.

    python tools/import_hf.py --input_folder hf_model --output_folder ckpt/global_step0_universal
    python pretrain_gpt.py ... --load ckpt --universal-checkpoint --finetune

Writes ckpt/latest_universal too. Optimizer state is fresh (zero moments, step 0).
GPT-2, Llama (GQA) and BLOOM folders with safetensors weights.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.interop.canonical import imported_state, write_imported  # noqa: E402
from megatron.interop.hf import read_hf_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_folder", "--input-folder", required=True)
    p.add_argument("--output_folder", "--output-folder", required=True,
                   help="DIR/global_step0_universal; DIR/latest_universal is written to name it")
    p.add_argument("--seq-length", "--seq_length", type=int, default=None,
                   help="the training sequence length to record (default: the model's maximum)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing universal checkpoint there")
    args = p.parse_args(argv)
    try:
        cfg, tensors, family = read_hf_folder(args.input_folder, args.seq_length)
        state = imported_state(cfg, tokenizer={"type": "huggingface", "path": os.path.abspath(args.input_folder),
                                               "vocab_size": cfg.vocab_size})
        files = write_imported(args.output_folder, cfg, {n: {"fp32": t} for n, t in tensors.items()},
                               {"imported_from": "huggingface", "model_type": family.model_type,
                                "folder": os.path.abspath(args.input_folder)}, args.input_folder, state,
                               overwrite=args.overwrite)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {family.model_type} model from {args.input_folder}: {len(tensors)} canonical tensors")
    print(f"wrote universal checkpoint {args.output_folder} ({', '.join(files)}) with fresh optimizer state")
    print(f"latest_universal -> {os.path.basename(args.output_folder.rstrip('/'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
