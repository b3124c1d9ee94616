"""The Megatron-style command line, parsed and validated in one place.

``parse_args`` returns an argparse namespace after merging an optional DeepSpeed
JSON config and refusing inconsistent settings before any training starts.
Nothing below this module reads ``sys.argv``.
"""
from __future__ import annotations

import argparse
import json


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-key-value-heads", type=int, default=None, help="GQA; 1 gives MQA")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --mock-data / NullTokenizer")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--normalization", choices=["layernorm", "rmsnorm"], default="layernorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="alias of --position-embedding-type rope")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3])
    g.add_argument("--ddp-bucket-size", type=int, default=1 << 22, help="elements per DP all-reduce bucket")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--distributed-backend", choices=["auto", "gloo", "nccl"], default="auto")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--deepspeed", action="store_true", help="accepted for Megatron-DeepSpeed compatibility")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="ds_config.json: batch sizes, precision, ZeRO stage and clipping")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="built-in deterministic synthetic corpus")
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX, or a blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default=None,
                   choices=["GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                            "HuggingFaceTokenizer", "HFTokenizer", "NullTokenizer"])
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_model", default=None,
                   help="sentencepiece model, or a local HuggingFace directory")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--load-tag", default=None, help="a checkpoint folder name under --load, e.g. global_step100")
    g.add_argument("--universal-checkpoint", action="store_true",
                   help="resume from the universal checkpoint named by LOAD/latest_universal")
    g.add_argument("--keep-last-k", type=int, default=None,
                   help="after each save keep only the newest K native checkpoints (never the one 'latest' names)")
    g.add_argument("--debug", action="store_true", help="show the full traceback of checkpoint and flag errors")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="exit with an error if --load holds no checkpoint, even a new --save folder")
    g.add_argument("--allow-missing-checkpoint", action="store_true",
                   help="start from scratch when --load holds no checkpoint (upstream Megatron's default); "
                        "without it only a new, empty --save folder given as --load starts fresh")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--override-global-batch-size", action="store_true",
                   help="allow resuming with a different global batch size: consumed samples and the "
                        "iteration count continue, so later iterations see more (or fewer) samples each "
                        "and the LR schedule, counted in iterations, no longer lines up with samples")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Megatron-style GPT pretraining with universal checkpointing",
                                allow_abbrev=False)
    for add in (_add_model_args, _add_training_args, _add_parallel_args, _add_data_args, _add_checkpoint_args):
        add(p)
    return p


def _merge_deepspeed_config(args: argparse.Namespace) -> None:
    """Take batch sizes, precision, ZeRO stage and clipping from ds_config.json; flags given
    on the command line must agree with it."""
    with open(args.deepspeed_config) as f:
        ds = json.load(f)
    taken = {
        "global_batch_size": ds.get("train_batch_size"),
        "micro_batch_size": ds.get("train_micro_batch_size_per_gpu"),
        "zero_stage": ds.get("zero_optimization", {}).get("stage"),
        "clip_grad": ds.get("gradient_clipping"),
    }
    for name, value in taken.items():
        if value is None:
            continue
        current = getattr(args, name)
        if current is not None and name != "clip_grad" and current != value:
            raise ValueError(f"--{name.replace('_', '-')} {current} disagrees with {args.deepspeed_config} ({value})")
        setattr(args, name, value)
    if ds.get("bf16", {}).get("enabled"):
        args.bf16 = True
    fp16 = ds.get("fp16", {})
    if fp16.get("enabled"):
        args.fp16 = True
        if "initial_scale_power" in fp16:
            args.initial_loss_scale = 2.0 ** fp16["initial_scale_power"]
        args.loss_scale_window = fp16.get("loss_scale_window", args.loss_scale_window)
        args.hysteresis = fp16.get("hysteresis", args.hysteresis)


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Refuse inconsistent settings with a message that names the flags involved."""
    if args.deepspeed_config:
        _merge_deepspeed_config(args)
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.zero_stage is None:
        args.zero_stage = 0
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    if args.micro_batch_size is None:
        raise ValueError("--micro-batch-size (or train_micro_batch_size_per_gpu in the DeepSpeed config) is required")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                         f"{args.num_attention_heads}")
    if args.zero_stage == 3 and pp > 1:
        raise ValueError("--zero-stage 3 with --pipeline-model-parallel-size > 1 is not supported: "
                         "use ZeRO stage 0-2 with pipeline parallelism, or PP=1 with ZeRO-3")
    if not args.mock_data and not args.data_path:
        raise ValueError("give --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")
    if args.data_path and not args.mock_data and args.tokenizer_type is None:
        raise ValueError("--data-path needs --tokenizer-type (the tokenizer the data was preprocessed with)")
    if args.mock_data and args.vocab_size is None:
        raise ValueError("--mock-data needs --vocab-size")
    if args.keep_last_k is not None and args.keep_last_k < 1:
        raise ValueError(f"--keep-last-k must be at least 1, got {args.keep_last_k}")
    if args.exit_on_missing_checkpoint and args.allow_missing_checkpoint:
        raise ValueError("--exit-on-missing-checkpoint and --allow-missing-checkpoint are mutually exclusive")
    if args.universal_checkpoint and not args.load:
        raise ValueError("--universal-checkpoint needs --load DIR")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length


def parse_args(argv: list[str] | None, world_size: int) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args, world_size)
    return args
