"""Convert a checkpoint into a universal one (DIR/global_stepN_universal), or a universal/native
one into a PyTorch DCP.

    python tools/convert_to_universal.py --input_folder ckpt/global_step100 \
        --output_folder ckpt/global_step100_universal [--num_workers 4] [--replica-policy first] [--overwrite]
    python tools/convert_to_universal.py --input-format dcp   --input_folder DCP_DIR  --output_folder ckpt/global_step0_universal
    python tools/convert_to_universal.py --input-format mcore --input_folder megatron_ckpt/iter_0000100 \
        --output_folder ckpt/global_step100_universal
    python tools/convert_to_universal.py --input-format deepspeed --input_folder ds_ckpt/global_step100 \
        --output_folder ckpt/global_step100_universal [--qkv-layout grouped|blocked]
    python tools/convert_to_universal.py --output-format dcp  --input_folder ckpt/global_step100_universal \
        --output_folder DCP_DIR
    torchrun --nproc_per_node 4 tools/convert_to_universal.py --input_folder ckpt/global_step100 \
        --output_folder ckpt/global_step100_universal     # native only: the tensors split over the ranks

Under torchrun the max(--num_workers, ranks) output files are dealt to the ranks by bytes, each rank
reads only its tensors' bytes and writes its files, and rank 0 commits once all have finished (the
ranks share one file system); the output is byte for byte the one-process output with that many workers.

DeepSpeed's ds_to_universal.py flags --num_extract_workers (= --num_workers), --num_merge_workers
and --keep_temp_folder are accepted too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import CheckpointError, convert_to_universal  # noqa: E402
from megatron.checkpointing.agree import process_group  # noqa: E402
from megatron.checkpointing.convert import CHUNK_BYTES  # noqa: E402


def _model_config(path: str | None):
    if path is None:
        return None
    from megatron.model.config import ModelConfig
    with open(path) as f:
        return ModelConfig.from_json(json.load(f))


def _rank0() -> bool:
    return process_group() is None or process_group().get_rank() == 0


def _convert_native(args: argparse.Namespace, output: str) -> None:
    start = time.perf_counter()
    report = convert_to_universal(args.input_folder, output, args.num_workers, args.replica_policy,
                                  progress=args.progress, overwrite=args.overwrite,
                                  chunk_bytes=int(args.chunk_size_mb * 2**20))
    seconds = time.perf_counter() - start
    if not _rank0():
        return
    if process_group() is not None:
        print(f"{process_group().get_world_size()} ranks; totals over all of them:")
    print(f"wrote {report.tensors} canonical tensors ({report.bytes_written / 2**20:.1f} MiB in "
          f"{len(report.files)} files) to {report.output} in {seconds:.2f} s "
          f"({report.bytes_written / 2**20 / max(seconds, 1e-9):.1f} MiB/s); read and verified "
          f"{report.bytes_read / 2**20:.1f} MiB")
    where = f" in {report.max_replica_tensor}" if report.max_replica_tensor else ""
    print(f"replicas: largest disagreement {report.max_replica_diff:.3e}{where} (policy {args.replica_policy})")


def _convert_interop(args: argparse.Namespace, output: str) -> None:
    """Formats of other tools; their code needs the model's shapes, so it lives in megatron.interop."""
    if args.output_format == "dcp":
        from megatron.interop.dcp import export_dcp
        count = export_dcp(args.input_folder, output)
        print(f"wrote {count} canonical tensors with their Adam state as a PyTorch DCP to {output}")
        return
    if args.input_format == "dcp":
        from megatron.interop.dcp import import_dcp as importer
    elif args.input_format == "deepspeed":
        from megatron.interop.deepspeed import import_deepspeed
        importer = partial(import_deepspeed, qkv_layout=args.qkv_layout)
    else:
        from megatron.interop.mcore import import_mcore as importer
    count = importer(args.input_folder, output, _model_config(args.model_config), args.overwrite)
    print(f"wrote {count} canonical tensors from the {args.input_format} checkpoint {args.input_folder} "
          f"to {output}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_folder", "--input-folder", required=True)
    p.add_argument("--output_folder", "--output-folder", default=None,
                   help="default: INPUT_FOLDER with a _universal suffix")
    p.add_argument("--input-format", "--input_format", choices=["native", "dcp", "mcore", "deepspeed"],
                   default="native",
                   help="native: our rank files; dcp: a PyTorch DCP keyed by canonical names; mcore: a "
                        "Megatron-LM torch_dist checkpoint folder; deepspeed: a DeepSpeed ZeRO 1-3 save "
                        "(global_stepN) of a Megatron-DeepSpeed GPT model, any TP")
    p.add_argument("--qkv-layout", "--qkv_layout", choices=["grouped", "blocked"], default="grouped",
                   help="--input-format deepspeed: how query_key_value fuses q, k and v on each TP rank: grouped = "
                        "per KV group [q..., k, v] (Megatron-DeepSpeed before its FPDT change, Megatron-LM); "
                        "blocked = [q | k | v] (Megatron-DeepSpeed since)")
    p.add_argument("--output-format", "--output_format", choices=["universal", "dcp"], default="universal",
                   help="dcp: write a PyTorch DCP from a native or universal checkpoint")
    p.add_argument("--model-config", "--model_config", default=None,
                   help="JSON file of the model's shape, for dcp/mcore inputs that do not record it")
    p.add_argument("--num_workers", "--num-workers", "--num_extract_workers", "--num-extract-workers",
                   dest="num_workers", type=int, default=4,
                   help="tensors converted in parallel (ds_to_universal.py's --num_extract_workers: each worker "
                        "reads and merges one canonical tensor at a time)")
    p.add_argument("--chunk-size-mb", "--chunk_size_mb", type=float, default=CHUNK_BYTES / 2**20,
                   help="tensor data held in memory at once by all workers together (MiB): tensors larger than "
                        "this are streamed through in chunks, so peak memory does not grow with the model")
    p.add_argument("--num_merge_workers", "--num-merge-workers", type=int, default=None,
                   help="accepted for ds_to_universal.py command lines; no effect: there is no separate merge "
                        "stage here (extraction and merging are one pass per tensor, see --num_workers)")
    p.add_argument("--keep_temp_folder", "--keep-temp-folder", action="store_true",
                   help="accepted for ds_to_universal.py command lines; no effect: no temporary files are written")
    p.add_argument("--replica-policy", "--replica_policy", choices=["first", "mean", "strict"], default="first",
                   help="how replicated tensors (norms over TP, tied embeddings over PP) are merged: "
                        "first = take the owner's copy, mean = average, strict = refuse any disagreement")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing universal checkpoint in OUTPUT_FOLDER (never a native one)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar even when stderr is not a terminal (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")
    args = p.parse_args(argv)
    if args.output_format == "dcp" and args.input_format != "native":
        p.error("--output-format dcp reads our own checkpoints (native or universal); leave --input-format out")
    if args.output_format == "dcp" and args.output_folder is None:
        p.error("--output-format dcp needs --output_folder")
    output = args.output_folder or args.input_folder.rstrip("/") + "_universal"
    native = args.input_format == "native" and args.output_format == "universal"
    dist = process_group()
    ranks = dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and not native:
        p.error(f"under torchrun ({ranks} ranks) only native -> universal conversions are "
                f"split over ranks; run --input-format {args.input_format} --output-format {args.output_format} "
                f"as one process: python tools/convert_to_universal.py ...")
    started = ranks > 1 and dist is None
    if started:  # torch only under torchrun: one process converts without importing it
        import torch.distributed as dist

        dist.init_process_group("gloo")
    first = _rank0()
    try:
        if native:
            _convert_native(args, output)
        else:
            _convert_interop(args, output)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    if args.output_format == "universal" and first:
        print(f"latest_universal -> {os.path.basename(output.rstrip('/'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
