"""The Megatron-style command line, parsed and validated in one place.

``parse_args`` returns an argparse namespace after merging an optional DeepSpeed
JSON config and refusing inconsistent settings before any training starts.
Nothing below this module reads ``sys.argv``.
"""
from __future__ import annotations

import argparse
import difflib

from megatron.core.batch_rampup import BatchRampup
from megatron.core.optimizer.lr_scheduler import DECAY_STYLES, WD_INCR_STYLES
from megatron.core.parallel_state import ParallelDims
from megatron.core.sequence_layout import check_sequence_split
from megatron.deepspeed_config import merge_deepspeed_config


class ConfigError(ValueError):
    """A command line or configuration the run cannot honour; printed as one line by rank 0."""


# Upstream Megatron-DeepSpeed flags of features not built here: refused by name, not as unknown.
UNBUILT_FLAGS = {
    **dict.fromkeys(("--mos", "--kd", "--kd-alpha-ce", "--kd-beta-ce", "--kd-temp", "--load-teacher",
                     "--num-layers-teacher", "--hidden-size-teacher", "--num-attention-heads-teacher",
                     "--reset-iteration"),
                    "mixture-of-students / knowledge distillation is not built here"),
    **dict.fromkeys(("--curriculum-learning-legacy", "--curriculum-seqlen", "--data-efficiency-curriculum-learning"),
                    "curriculum learning is not built here"),
}


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``ConfigError`` (so rank 0 alone reports it, in one line) and
    suggests the closest known flag for an unknown one."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            message = self._suggest(message.split(":", 1)[1].split())
        raise ConfigError(message)

    def _suggest(self, unknown: list[str]) -> str:
        known = [s for a in self._actions for s in a.option_strings]
        parts = []
        for flag in unknown:
            if not flag.startswith("-"):
                continue
            name = flag.split("=", 1)[0]
            if name in UNBUILT_FLAGS:
                parts.append(f"{name} ({UNBUILT_FLAGS[name]})")
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return "unrecognized arguments: " + (", ".join(parts) or " ".join(unknown))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--num-key-value-heads", type=int, default=None, help="GQA; 1 gives MQA")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --mock-data / NullTokenizer")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--normalization", choices=["layernorm", "rmsnorm"], default="layernorm")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "alibi"],
                   default="learned_absolute")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="alias of --position-embedding-type rope")
    g.add_argument("--rotary-base", "--rotary-position-embeddings-theta", dest="rotary_base", type=float,
                   default=10000.0, help="RoPE theta")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--embed-layernorm", action="store_true", help="a norm after the word embedding (BLOOM)")
    g.add_argument("--openai-gelu", action="store_true", help="GeLU's tanh approximation (GPT-2, BLOOM)")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--no-query-key-layer-scaling", dest="apply_query_key_layer_scaling", action="store_false",
                   help="no-op: attention here computes softmax(QK^T/sqrt(d)) directly, which is what this "
                        "flag selects; Megatron's 1/layer-number pre-scaling is the same product, reordered")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--loss-scale", type=float, default=None,
                   help="static loss scale (Megatron: applied whatever the precision). With --deepspeed it is "
                        "not used, as in Megatron-DeepSpeed: the DeepSpeed config's fp16 section governs scaling")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam: AdamW (decoupled weight decay, as Megatron); sgd: SGD with momentum")
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="ZeRO stage (default 1, as Megatron-DeepSpeed)")
    g.add_argument("--ddp-bucket-size", type=int, default=1 << 22, help="elements per DP all-reduce bucket")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate and reduce gradients in fp32 (default: in the model's dtype, as the ZeRO "
                        "paper's memory counts them)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each gradient bucket's DP all-reduce / reduce-scatter from the backward hooks "
                        "as soon as the bucket is complete (bit-identical to the non-overlapped path)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="ZeRO-3: start the next unit's parameter all-gather (the previous one's in backward) "
                        "while the current unit computes (bit-identical to the non-overlapped path)")
    g.add_argument("--zero3-max-live-parameters", type=int, default=10 ** 9, metavar="N",
                   help="ZeRO-3: up to N gathered parameter elements stay whole from a unit's forward to its "
                        "backward, which then gathers nothing (DeepSpeed's stage3_max_live_parameters, same "
                        "default); 0 frees every unit after its forward and gathers it again in backward")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2],
                   help=">= 1: the iteration line also shows the exposed (non-overlapped) gradient-reduction "
                        "time and, under ZeRO-3, the exposed parameter all-gather time")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--log-timers-to-tensorboard", action="store_true", help="iteration-time/iteration-time")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true")
    g.add_argument("--no-log-learnig-rate-to-tensorboard", "--no-log-learning-rate-to-tensorboard",
                   dest="log_learning_rate_to_tensorboard", action="store_false")
    g.add_argument("--no-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard",
                   action="store_false")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true",
                   help="optimizer/{variance,variance_sqrt,momentum,weight}_{l2,l1,abs_max}: Adam's state and "
                        "the fp32 weights over the whole model")
    g.add_argument("--log-memory-to-tensorboard", action="store_true", help="CUDA allocator statistics (GPUs only)")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--wandb-project", default="", help="also log to Weights & Biases (needs the wandb package)")
    g.add_argument("--wandb-exp-name", default="")
    g.add_argument("--wandb-save-dir", default="")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once training has run this long")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, finish the current iteration, save and exit with status 0")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--debug", action="store_true", help="show tracebacks of configuration and checkpoint errors")
    g.add_argument("--distributed-backend", choices=["auto", "gloo", "nccl"], default="auto")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    """Megatron-DeepSpeed's OptimizerParamScheduler flags (counted in samples underneath)."""
    g = p.add_argument_group("learning-rate and weight-decay schedule")
    g.add_argument("--train-samples", type=int, default=None, help="train this many samples (instead of --train-iters)")
    g.add_argument("--train-tokens", type=int, default=None, help="also stop once this many tokens are trained")
    g.add_argument("--lr-decay-style", choices=list(DECAY_STYLES), default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the LR warmup starts from")
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", choices=list(WD_INCR_STYLES), default="constant")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, the command line's schedule replaces the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, keep the checkpoint's schedule whatever the command line says")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples")


def _validate_schedule(args: argparse.Namespace) -> None:
    """Megatron's rules: iteration- or sample-based training, never a mix."""
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give exactly one of --train-iters and --train-samples")
    if args.train_iters is not None:
        mixed = [f for f, v in (("--lr-decay-samples", args.lr_decay_samples), ("--lr-warmup-samples",
                 args.lr_warmup_samples), ("--rampup-batch-size", args.rampup_batch_size)) if v]
        if mixed:
            raise ConfigError(f"--train-iters counts iterations: use --lr-decay-iters / --lr-warmup-iters, "
                             f"not {', '.join(mixed)} (or train by --train-samples)")
        if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
            raise ConfigError("give only one of --lr-warmup-fraction and --lr-warmup-iters")
    else:
        mixed = [f for f, v in (("--lr-decay-iters", args.lr_decay_iters), ("--lr-warmup-iters",
                 args.lr_warmup_iters)) if v]
        if mixed:
            raise ConfigError(f"--train-samples counts samples: use --lr-decay-samples / --lr-warmup-samples, "
                             f"not {', '.join(mixed)}")
        if args.lr_warmup_fraction is not None and args.lr_warmup_samples:
            raise ConfigError("give only one of --lr-warmup-fraction and --lr-warmup-samples")
    if args.weight_decay_incr_style == "constant":
        if args.start_weight_decay is not None or args.end_weight_decay is not None:
            if args.start_weight_decay != args.end_weight_decay:
                raise ConfigError("--start-weight-decay / --end-weight-decay need --weight-decay-incr-style "
                                 "linear or cosine")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    elif args.start_weight_decay is None or args.end_weight_decay is None:
        raise ConfigError(f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay "
                         f"and --end-weight-decay")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    if args.rampup_batch_size:
        BatchRampup(*args.rampup_batch_size, args.global_batch_size)


REQUIRED_MODEL_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
# ModelConfig fields that --use-checkpoint-args takes, with the flag that sets each (and
# whether the flag is the negation of the field).
_CHECKPOINT_MODEL_ARGS = {
    "num_layers": ("num_layers", False), "hidden_size": ("hidden_size", False),
    "num_attention_heads": ("num_attention_heads", False), "seq_length": ("seq_length", False),
    "ffn_hidden_size": ("ffn_hidden_size", False), "num_key_value_heads": ("num_key_value_heads", False),
    "max_position_embeddings": ("max_position_embeddings", False), "normalization": ("normalization", False),
    "swiglu": ("swiglu", False), "position_embedding_type": ("position_embedding_type", False),
    "rotary_base": ("rotary_base", False), "layernorm_epsilon": ("layernorm_epsilon", False),
    "make_vocab_size_divisible_by": ("make_vocab_size_divisible_by", False),
    "tie_embeddings": ("untie_embeddings_and_output_weights", True),
    "add_bias_linear": ("disable_bias_linear", True),
}


def _take_model_args_from_checkpoint(args: argparse.Namespace) -> None:
    """``--use-checkpoint-args``: the model shape of the checkpoint replaces the flags' (as
    Megatron's ``load_args_from_checkpoint``); parallel sizes stay this run's."""
    from megatron.checkpointing.locate import resolve_checkpoint
    from megatron.checkpointing.reader import CheckpointReader

    if not args.load:
        raise ConfigError("--use-checkpoint-args needs --load DIR")
    path = resolve_checkpoint(args.load, args.universal_checkpoint, args.load_tag)
    if path is None:
        raise ConfigError(f"--use-checkpoint-args: no checkpoint under {args.load} (no 'latest' file)")
    saved = CheckpointReader(path).manifest["state"]["model_config"]
    for field, (flag, negated) in _CHECKPOINT_MODEL_ARGS.items():
        if field in saved:
            setattr(args, flag, (not saved[field]) if negated else saved[field])
    if args.use_rotary_position_embeddings and saved.get("position_embedding_type") != "rope":
        args.use_rotary_position_embeddings = False


def planned_train_iters(args: argparse.Namespace) -> int:
    """Iterations the run takes in all (Megatron's ``update_train_iters``)."""
    if args.train_iters is not None:
        return args.train_iters
    if not args.rampup_batch_size:
        return args.train_samples // args.global_batch_size
    rampup, consumed, iters = BatchRampup(*args.rampup_batch_size, args.global_batch_size), 0, 0
    while consumed < args.train_samples:
        consumed += rampup.global_batch(consumed)
        iters += 1
    return iters


def total_train_samples(args: argparse.Namespace) -> int:
    """Samples the run trains in all (sizes the training dataset)."""
    return args.train_samples if args.train_samples is not None else args.train_iters * args.global_batch_size


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--deepspeed", action="store_true",
                   help="take --deepspeed_config as DeepSpeed would (batch sizes, gradient accumulation, "
                        "precision and loss scaling, ZeRO, optimizer, scheduler, clipping)")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="ds_config.json; keys that cannot be honoured here are refused, naming the key")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher; must agree with LOCAL_RANK when both are given")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron-LM's sequence parallelism: outside the TP matmuls (norms, dropout, residuals) "
                        "each TP rank holds 1/TP of the sequence; --seq-length must divide by TP; a no-op at TP 1")
    g.add_argument("--no-async-tensor-model-parallel-allreduce", action="store_true",
                   help="no-op: the TP all-reduce of the input gradient is not overlapped with the weight "
                        "gradient here, which is what this flag asks for upstream; the numbers are the same")
    g.add_argument("--use-flash-attn-triton", action="store_true",
                   help="no-op: attention here is one exact softmax(QK^T/sqrt(d))V (PyTorch's SDPA kernel where "
                        "it applies); a flash kernel changes only speed and memory, not the math")
    g.add_argument("--ds-sequence-parallel-size", type=int, default=1,
                   help="DeepSpeed-Ulysses: split each sample's sequence over this many ranks; attention "
                        "all-to-alls sequence shards into head shards (heads must divide by TP x this)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="ring attention (Megatron-Core's context parallelism): split each sample's sequence "
                        "over this many ranks in 2x as many chunks, K/V passed around a ring")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline: each stage holds num-layers / (PP x this) model chunks of this "
                        "many layers and runs Megatron's interleaved 1F1B schedule; needs PP >= 2 (Megatron: "
                        "> 2) and micro-batches per step divisible by PP")
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="Megatron-DeepSpeed's non-pipelined model; the same model here, so it needs "
                        "--pipeline-model-parallel-size 1")


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    """Mixture of Experts: Megatron-LM's flags, and Megatron-DeepSpeed's aliases where they overlap."""
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=None,
                   help="experts per MoE layer (Megatron-DeepSpeed's list form: one value, or equal values)")
    g.add_argument("--moe-router-topk", "--topk", dest="moe_router_topk", type=int, default=2)
    g.add_argument("--expert-model-parallel-size", "--moe-expert-parallel-size", dest="expert_model_parallel_size",
                   type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1,
                   help="split each expert's hidden units over this many ranks (default 1: whole experts)")
    g.add_argument("--moe-aux-loss-coeff", "--moe-loss-coeff", dest="moe_aux_loss_coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"],
                   default="aux_loss")
    g.add_argument("--moe-expert-capacity-factor", "--moe-train-capacity-factor", dest="moe_expert_capacity_factor",
                   type=float, default=None, help="per-sequence expert capacity; default: dropless")
    g.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="per-sequence expert capacity in evaluation; default: the training one")
    g.add_argument("--create-moe-param-group", action="store_true",
                   help="no-op: expert parameters always sit in optimizer groups of their own here (one per "
                        "expert-data-parallel group, decay and no-decay), which is what this flag creates upstream")
    g.add_argument("--mlp-type", choices=["standard", "residual"], default="standard",
                   help="standard only: PR-MoE's residual MLP (--mlp-type residual) is not built here")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs")
    g.add_argument("--moe-min-capacity", type=int, default=0,
                   help="least capacity per expert and sequence (Megatron-DeepSpeed's default 4 is not assumed)")
    g.add_argument("--disable-moe-token-dropping", action="store_true", help="dropless routing (the default)")
    g.add_argument("--moe-layer-freq", type=int, default=None, help="layer i is an MoE layer when i %% N == 0")
    g.add_argument("--expert-interval", type=int, default=None,
                   help="Megatron-DeepSpeed's: layer i is an MoE layer when (i + 1) %% N == 0")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default="alltoall")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over every expert, then top-k (the default here, as DeepSpeed)")
    g.add_argument("--moe-router-topk-then-softmax", action="store_true",
                   help="top-k logits, then softmax over those k (Mixtral)")


def _validate_moe(args: argparse.Namespace, world_size: int) -> None:
    """Refuse MoE flags that contradict each other or the world size; set ``args.moe_layers``."""
    args.moe_layers = None
    if args.mlp_type != "standard":
        raise ConfigError(f"--mlp-type {args.mlp_type}: PR-MoE's residual MLP is not built here; use --mlp-type "
                          f"standard (plain MoE layers)")
    experts = args.num_experts
    if experts is None or experts == [1]:
        if args.expert_model_parallel_size != 1:
            raise ConfigError(f"--expert-model-parallel-size {args.expert_model_parallel_size} needs "
                              f"--num-experts > 1")
        return
    try:
        ParallelDims(world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(set(experts)) != 1:
        raise ConfigError(f"--num-experts {experts}: a different number of experts per layer is not "
                          f"supported; give one value")
    args.num_experts = experts = experts[0]
    if experts % args.expert_model_parallel_size:
        raise ConfigError(f"--num-experts {experts} is not divisible by --expert-model-parallel-size "
                          f"{args.expert_model_parallel_size}")
    if args.moe_layer_freq is not None and args.expert_interval is not None:
        raise ConfigError("--moe-layer-freq (Megatron-LM) and --expert-interval (Megatron-DeepSpeed) both place "
                          "MoE layers: give one")
    if args.disable_moe_token_dropping and (args.moe_expert_capacity_factor, args.moe_eval_capacity_factor) != (None, None):
        raise ConfigError("--disable-moe-token-dropping with a capacity factor: drop one of them")
    if args.moe_router_pre_softmax and args.moe_router_topk_then_softmax:
        raise ConfigError("--moe-router-pre-softmax and --moe-router-topk-then-softmax are mutually exclusive")
    n = args.num_layers
    if args.expert_interval is not None:
        args.moe_layers = [i for i in range(n) if (i + 1) % args.expert_interval == 0]
    else:
        freq = args.moe_layer_freq or 1
        args.moe_layers = [i for i in range(n) if i % freq == 0]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="built-in deterministic synthetic corpus")
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX, or a blend 'W1 PREFIX1 W2 PREFIX2 ...'")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--train-data-path", nargs="*", default=None, help="train split only (no --split applied)")
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None,
                   help="no-op: sample indices are recomputed from the seed at start-up, nothing is cached on disk")
    g.add_argument("--num-workers", type=int, default=2,
                   help="> 0: the next global batch is read in a background thread while the current one "
                        "trains (the batches do not change); 0: read in the training thread")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart at 0 after every end-of-document token of a sample")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="a token attends only to earlier tokens of its own document within a sample")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="leave out of the loss the positions whose input is an end-of-document token "
                        "(the loss is the mean over the other tokens of the global batch); "
                        "with --mock-data the end-of-document id is --vocab-size - 1")
    g.add_argument("--data-impl", choices=["mmap", "infer"], default="infer",
                   help="no-op: the memory-mapped .bin/.idx format is the only one (as upstream's mmap)")
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
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="exit with an error if --load holds no checkpoint, even a new --save folder")
    g.add_argument("--allow-missing-checkpoint", action="store_true",
                   help="start from scratch when --load holds no checkpoint (upstream Megatron's default); "
                        "without it only a new, empty --save folder given as --load starts fresh")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load optimizer state, loss scaler or LR schedule (Megatron's meaning)")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save weights only: no Adam moments, loss scaler or LR schedule")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--async-save", action="store_true",
                   help="save in the background: the step blocks only to copy the state to host memory; "
                        "the files are written, fsynced and committed while training goes on")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (no optimizer, schedule, RNG or data position)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model shape from the checkpoint under --load")
    g.add_argument("--override-data-position", action="store_true",
                   help="accept a resume whose seed, data or tokenizer differ from the checkpoint's")


def _add_recompute_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation recomputation (losses and gradients are unchanged)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute every --checkpoint-num-layers layers in backward (old Megatron flag)")
    g.add_argument("--checkpoint-num-layers", type=int, default=1)
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="with --checkpoint-activations: DeepSpeed's checkpointing, the same recomputation here")
    g.add_argument("--recompute-activations", action="store_true", help="alias of --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: whole layers; selective: only the core attention")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="uniform: chunks of --recompute-num-layers layers; block: the first "
                        "--recompute-num-layers layers of each stage")
    g.add_argument("--recompute-num-layers", type=int, default=1)


def build_parser(argument_default=None) -> argparse.ArgumentParser:
    p = MegatronArgumentParser(description="Megatron-style GPT pretraining with universal checkpointing",
                               allow_abbrev=False, argument_default=argument_default)
    for add in (_add_model_args, _add_training_args, _add_schedule_args, _add_parallel_args, _add_data_args,
                _add_checkpoint_args, _add_recompute_args, _add_moe_args):
        add(p)
    return p


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The destinations the command line set itself (not defaults), to detect a DeepSpeed
    config that disagrees with a flag the user typed."""
    parser = build_parser(argparse.SUPPRESS)
    for action in parser._actions:
        action.required = False
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def _check_compatibility_flags(args: argparse.Namespace) -> None:
    """Megatron-DeepSpeed flags accepted only where they mean what they say here."""
    if args.no_pipeline_parallel and args.pipeline_model_parallel_size > 1:
        raise ConfigError(f"--no-pipeline-parallel with --pipeline-model-parallel-size "
                          f"{args.pipeline_model_parallel_size}: drop one of them")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.checkpoint_activations and args.recompute_granularity == "selective":
        raise ConfigError("--checkpoint-activations (full layers) and --recompute-granularity selective "
                          "(--recompute-activations) ask for two kinds of recomputation: keep one")
    if args.recompute_granularity == "selective" and args.recompute_method is not None:
        raise ConfigError("--recompute-method applies to --recompute-granularity full only (as in Megatron)")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
    if args.recompute_method is not None and args.recompute_granularity is None:
        raise ConfigError("--recompute-method needs --recompute-granularity full")
    if args.deepspeed_activation_checkpointing and not (args.checkpoint_activations or args.recompute_granularity):
        raise ConfigError("--deepspeed-activation-checkpointing only changes how --checkpoint-activations "
                          "or --recompute-granularity recompute; give one of them (as in Megatron-DeepSpeed, "
                          "it does nothing alone)")
    for flag, value in (("--recompute-num-layers", args.recompute_num_layers),
                        ("--checkpoint-num-layers", args.checkpoint_num_layers)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.loss_scale is not None and args.loss_scale <= 0:
        raise ConfigError(f"--loss-scale must be positive, got {args.loss_scale}")


def validate_args(args: argparse.Namespace, world_size: int, explicit: set[str] | None = None) -> None:
    """Refuse inconsistent settings with a message that names the flags involved.

    ``explicit``: the flags the user typed (``explicit_flags``); a DeepSpeed config may fill
    in the others but must agree with these."""
    _check_compatibility_flags(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp, sp = args.context_parallel_size, args.ds_sequence_parallel_size
    sizes = [("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
             ("--context-parallel-size", cp), ("--ds-sequence-parallel-size", sp)]
    for flag, size in sizes:
        if size < 1:
            raise ConfigError(f"{flag} must be >= 1, got {size}")
    if world_size % (tp * pp * cp * sp):
        named = " x ".join(f"{flag} {size}" for i, (flag, size) in enumerate(sizes) if i < 2 or size > 1)
        raise ConfigError(f"world size {world_size} is not divisible by {named}")
    dp = world_size // (tp * pp * cp * sp)
    args.sequence_parallel = args.sequence_parallel and tp > 1  # as Megatron: nothing to split at TP 1
    if args.sequence_parallel and cp * sp > 1:
        raise ConfigError(f"--sequence-parallel with --context-parallel-size {cp} / --ds-sequence-parallel-size "
                          f"{sp} is not supported: split the sequence one way (leave one of them out)")
    if getattr(args, "num_experts", None) and cp * sp > 1:
        raise ConfigError(f"--num-experts with --context-parallel-size {cp} / --ds-sequence-parallel-size {sp} "
                          f"is not supported: routing statistics are per whole sequence; leave them at 1")
    if args.deepspeed_config:
        merge_deepspeed_config(args, dp, explicit if explicit is not None else set(vars(args)), ConfigError)
    if args.use_checkpoint_args:
        _take_model_args_from_checkpoint(args)
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED_MODEL_ARGS if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or --use-checkpoint-args with --load)")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.zero_stage is None:
        args.zero_stage = 1
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if args.micro_batch_size is None:
        raise ConfigError("--micro-batch-size (or train_micro_batch_size_per_gpu in the DeepSpeed config) is required")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                          f"{args.micro_batch_size} x data-parallel size {dp}")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                          f"{args.num_attention_heads}")
    try:
        check_sequence_split(args.seq_length, args.num_attention_heads, tp, sp, cp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_virtual_pipeline(args, pp, dp)
    if args.zero3_max_live_parameters < 0:
        raise ConfigError(f"--zero3-max-live-parameters {args.zero3_max_live_parameters} is negative: give the "
                          f"number of gathered elements ZeRO-3 may keep from forward to backward (0: none)")
    if args.overlap_param_gather and args.zero_stage != 3:
        raise ConfigError(f"--overlap-param-gather prefetches ZeRO-3 parameter all-gathers, but the ZeRO stage is "
                          f"{args.zero_stage} (its parameters are never gathered); add --zero-stage 3 or drop "
                          f"--overlap-param-gather")
    if args.zero_stage == 3 and pp > 1:
        raise ConfigError("--zero-stage 3 with --pipeline-model-parallel-size > 1 is not supported: "
                          "use ZeRO stage 0-2 with pipeline parallelism, or PP=1 with ZeRO-3")
    split_paths = args.train_data_path or args.valid_data_path or args.test_data_path
    if split_paths and args.data_path:
        raise ConfigError("give --data-path (split by --split) or --train-data-path/--valid-data-path/"
                          "--test-data-path, not both")
    if split_paths and not args.train_data_path:
        raise ConfigError("--valid-data-path / --test-data-path need --train-data-path")
    if split_paths:
        args.data_path = None
    if not args.mock_data and not (args.data_path or args.train_data_path):
        raise ConfigError("give --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")
    real_data = bool(args.data_path or args.train_data_path) and not args.mock_data
    if real_data and args.tokenizer_type is None and args.vocab_file and args.merge_file:
        args.tokenizer_type = "GPT2BPETokenizer"  # upstream pretrain_gpt.py's default, given its two files
    if real_data and args.tokenizer_type is None:
        raise ConfigError("--data-path needs --tokenizer-type (the tokenizer the data was preprocessed with)")
    if args.mock_data and args.vocab_size is None:
        raise ConfigError("--mock-data needs --vocab-size")
    if args.keep_last_k is not None and args.keep_last_k < 1:
        raise ConfigError(f"--keep-last-k must be at least 1, got {args.keep_last_k}")
    if args.exit_on_missing_checkpoint and args.allow_missing_checkpoint:
        raise ConfigError("--exit-on-missing-checkpoint and --allow-missing-checkpoint are mutually exclusive")
    if args.universal_checkpoint and not args.load:
        raise ConfigError("--universal-checkpoint needs --load DIR")
    _validate_schedule(args)
    _validate_moe(args, world_size)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length


def _validate_virtual_pipeline(args: argparse.Namespace, pp: int, dp: int) -> None:
    """Megatron's rules for --num-layers-per-virtual-pipeline-stage; sets
    ``virtual_pipeline_model_parallel_size`` (model chunks per stage, 1 without interleaving)."""
    per = args.num_layers_per_virtual_pipeline_stage
    args.virtual_pipeline_model_parallel_size = 1
    if per is None:
        return
    if pp < 2:
        raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per} needs --pipeline-model-parallel-size "
                          f">= 2, got {pp}")
    if per < 1 or args.num_layers % (per * pp):
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
                          f"x --num-layers-per-virtual-pipeline-stage {per}")
    micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.rampup_batch_size is None and micro_batches % pp:
        raise ConfigError(f"the interleaved pipeline needs the micro-batches per step (--global-batch-size "
                          f"{args.global_batch_size} / (--micro-batch-size {args.micro_batch_size} x data-parallel "
                          f"size {dp}) = {micro_batches}) divisible by --pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = args.num_layers // (per * pp)


def parse_args(argv: list[str] | None, world_size: int) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args, world_size, explicit_flags(argv))
    return args
