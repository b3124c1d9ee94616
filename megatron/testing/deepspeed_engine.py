"""Real DeepSpeed checkpoints for the importer's tests (needs ``deepspeed``: the test extra).

``MegatronDeepSpeedGPT`` holds our TP-1 model's parameters under Megatron-DeepSpeed's names and
fused layouts; its forward maps them back (a differentiable gather) and runs our model's math.
A real DeepSpeed engine trains it on the micro-batches our trainer would use, saves, and trains
on: its losses after the save are what a resumed run must reproduce. The ``*Pipe`` layers do the
same per pipeline layer, as Megatron-DeepSpeed's ``GPTModelPipe`` lays a model out.
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch
from safetensors.torch import save_file
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from megatron.model.config import ModelConfig


def qkv_rows(cfg: ModelConfig, layout: str, tp: int) -> torch.Tensor:
    """Row ``i`` of a TP rank's Megatron-DeepSpeed query_key_value is row ``rows[i]`` of our local
    ``[q; k; v]``: grouped = per KV group its query heads, then its k head, then its v head;
    blocked = q, k, v one after another (our own order)."""
    hd, heads, kv = cfg.head_dim, cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
    if layout == "blocked":
        return torch.arange((heads + 2 * kv) * hd)
    per, rows = heads // kv, []
    for g in range(kv):
        for head in range(g * per, (g + 1) * per):
            rows += range(head * hd, (head + 1) * hd)
        rows += range((heads + g) * hd, (heads + g + 1) * hd)
        rows += range((heads + kv + g) * hd, (heads + kv + g + 1) * hd)
    return torch.tensor(rows)


_LAYER = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
          "attention.qkv": "self_attention.query_key_value", "attention.dense": "self_attention.dense",
          "mlp.fc1": "mlp.dense_h_to_4h", "mlp.fc2": "mlp.dense_4h_to_h"}
_GLOBAL = {"embedding.word_embeddings": "embedding.word_embeddings",
           "embedding.position_embeddings": "embedding.position_embeddings",
           "final_norm": "encoder.final_layernorm", "output_layer": "output_layer"}


def mds_name(ours: str) -> str:
    """Our TP-1 parameter name -> Megatron-DeepSpeed's (``language_model.`` prefixed)."""
    module, kind = ours.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, part = module.split(".", 2)
        return f"language_model.encoder.layers.{index}.{_LAYER[part]}.{kind}"
    return f"language_model.{_GLOBAL[module]}.{kind}"


class _Holder(nn.Module):
    """A module of Megatron-DeepSpeed's tree; calling it hands out copies of its own parameters,
    so ZeRO-3's hooks gather them around the call as they do for any layer."""

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.clone() for p in self._parameters.values())


class _Renamed(nn.Module):
    """One of our modules (``ours``) behind Megatron-DeepSpeed's parameter names (``rename``) and
    its per-rank fused query_key_value row order; ``our_params()`` maps them back, differentiably."""

    def __init__(self, ours: nn.Module, rename, qkv_layout: str, cfg: ModelConfig, tp: int) -> None:
        super().__init__()
        object.__setattr__(self, "ours", ours)  # not a submodule: its parameters are not ours
        self.rows = qkv_rows(cfg, qkv_layout, tp)
        self.inverse = torch.argsort(self.rows)
        self.names: dict[str, str] = {}  # Megatron-DeepSpeed name -> our name
        self.decay: dict[str, bool] = {}
        for name, p in ours.named_parameters():
            self._add(rename(name), name, p.detach().clone()[self.rows] if "attention.qkv." in name else
                      p.detach().clone(), p.sharding.weight_decay,
                      # DeepSpeed's gradient norm counts a parameter split over TP on every rank, others once.
                      "tp" not in p.sharding.replica_groups and tp > 1)

    def _add(self, theirs: str, ours: str | None, data: torch.Tensor, decay: bool, split: bool = False) -> None:
        holder = self
        *path, leaf = theirs.split(".")
        for part in path:
            if not hasattr(holder, part):
                holder.add_module(part, _Holder())
            holder = getattr(holder, part)
        param = nn.Parameter(data)
        param.tensor_model_parallel = split
        holder.register_parameter(leaf, param)
        self.decay[theirs] = decay
        if ours is not None:
            self.names[theirs] = ours

    def our_params(self) -> dict[str, torch.Tensor]:
        params = {}
        for path, holder in self.named_modules():
            own = holder() if holder is not self else tuple(self._parameters.values())
            for leaf, p in zip(holder._parameters, own, strict=True):
                ours = self.names.get(f"{path}.{leaf}" if path else leaf)
                if ours is not None:
                    params[ours] = p[self.inverse] if "attention.qkv." in ours else p
        return params


class MegatronDeepSpeedGPT(_Renamed):
    """Our model (any TP) as Megatron-DeepSpeed's ``GPTModel``."""

    def __init__(self, model: nn.Module, qkv_layout: str = "grouped") -> None:
        super().__init__(model, mds_name, qkv_layout, model.cfg, model.topo.tp)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return functional_call(self.ours, self.our_params(), (tokens, labels)).float().mean()


class EmbeddingPipe(_Renamed):
    """Megatron-DeepSpeed's ``EmbeddingPipe`` (TP 1) over our first stage's embedding, or, tied on the
    last stage, over its replica of the word embedding (the position table there is unused)."""

    def __init__(self, model: nn.Module, qkv_layout: str) -> None:
        holder = model.embedding if model.embedding is not None else model.output_layer
        rename = {"word_embeddings.weight": "word_embeddings.weight", "weight": "word_embeddings.weight",
                  "position_embeddings.weight": "position_embeddings.weight"}.__getitem__
        super().__init__(holder, rename, qkv_layout, model.cfg, 1)
        if "position_embeddings.weight" not in self.decay and model.cfg.position_embedding_type == "learned_absolute":
            shape = (model.cfg.max_position_embeddings, model.cfg.hidden_size)
            self._add("position_embeddings.weight", None, torch.zeros(shape), True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.word_embeddings.weight)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings.weight[: tokens.shape[1]]
        return x


class TransformerPipe(_Renamed):
    """Megatron-DeepSpeed's ``ParallelTransformerLayerPipe`` (TP 1) over our layer ``index``."""

    def __init__(self, model: nn.Module, index: int, qkv_layout: str) -> None:
        def rename(name: str) -> str:
            module, kind = name.rsplit(".", 1)
            return f"{_LAYER[module]}.{kind}"
        super().__init__(model.layers[str(index)], rename, qkv_layout, model.cfg, 1)
        object.__setattr__(self, "model", model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.ours, self.our_params(), (x, self.model.rope(x.shape[1], x)))


class FinalNormPipe(_Renamed):
    def __init__(self, model: nn.Module, qkv_layout: str) -> None:
        super().__init__(model.final_norm, str, qkv_layout, model.cfg, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.ours, self.our_params(), (x,))


class MegatronMPU:
    """The model-parallel unit DeepSpeed asks for its groups (Megatron's ``mpu`` interface)."""

    def __init__(self, topo) -> None:
        self.topo = topo

    def get_model_parallel_group(self):
        return self.topo.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.topo.tp_ranks[0]

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topo.dp_ranks


def build_for_deepspeed(rank: int, world: int, argv: list[str]):
    """Our trainer (data, canonical init, process group), made ready for DeepSpeed to join."""
    from megatron.training import build_trainer

    # CPU: no JIT-compiled shared-memory op
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # DeepSpeed joins the process group the caller made, but looks for torchrun's variables first.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    trainer = build_trainer(argv)
    # DeepSpeed's engine brings its own optimizer: ours (master weights, gradient buffers, Adam
    # state; ~3 GiB a rank at 250M parameters) would only take memory.
    trainer.optimizer.detach_from_model()
    trainer.optimizer = None
    return trainer


def _adamw(modules: list[_Renamed], args: argparse.Namespace) -> torch.optim.AdamW:
    """Our optimizer's groups and hyperparameters: weights decay, norms and biases do not."""
    groups = [{"params": [p for m in modules for n, p in m.named_parameters() if m.decay[n] == decay],
               "weight_decay": args.weight_decay if decay else 0.0} for decay in (True, False)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


def _config(trainer, ds_config: dict) -> dict:
    a = trainer.args
    return {"train_micro_batch_size_per_gpu": a.micro_batch_size, "gradient_clipping": a.clip_grad,
            "gradient_accumulation_steps": a.global_batch_size // (a.micro_batch_size * trainer.topo.dp),
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6, **ds_config}


def _client_state(trainer, save_after: int) -> dict:
    """What Megatron-DeepSpeed saves beside the engine's state: its args (the model's shape) and iteration."""
    a, c, topo = trainer.args, trainer.cfg, trainer.topo
    args = argparse.Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, ffn_hidden_size=c.ffn_hidden_size, seq_length=a.seq_length,
        max_position_embeddings=c.max_position_embeddings, vocab_size=c.vocab_size,
        padded_vocab_size=trainer.model.padded_vocab, normalization=c.normalization, swiglu=c.swiglu,
        use_rotary_position_embeddings=c.position_embedding_type == "rope", rotary_base=c.rotary_base,
        untie_embeddings_and_output_weights=not c.tie_embeddings, add_bias_linear=c.add_bias_linear,
        layernorm_epsilon=c.layernorm_epsilon, tensor_model_parallel_size=topo.tp,
        pipeline_model_parallel_size=topo.pp, consumed_train_samples=save_after * a.global_batch_size)
    return {"args": args, "iteration": save_after}


def _batches(trainer, it: int) -> list:
    from megatron.core.micro_batches import micro_batches
    a = trainer.args
    return micro_batches(trainer.datasets[0], it * a.global_batch_size, a.global_batch_size, a.micro_batch_size,
                         trainer.topo, torch.device("cpu"))


def deepspeed_engine(trainer, ds_config: dict, qkv_layout: str = "grouped"):
    """A DeepSpeed engine over ``trainer``'s model under Megatron-DeepSpeed's names, with our
    optimizer's groups and hyperparameters and the trainer's batch sizes."""
    import deepspeed

    ref = MegatronDeepSpeedGPT(trainer.model, qkv_layout)
    engine, *_ = deepspeed.initialize(model=ref, optimizer=_adamw([ref], trainer.args),
                                      config=_config(trainer, ds_config),
                                      mpu=MegatronMPU(trainer.topo) if trainer.topo.tp > 1 else None)
    return engine


def deepspeed_train_step(engine, trainer, it: int) -> float:
    """One global batch (iteration ``it`` of the trainer's data) through the engine; returns the
    mean loss over the global batch."""
    total = torch.zeros(1)
    batches = _batches(trainer, it)
    for tokens, labels, *_ in batches:
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        total += loss.detach().float() / (len(batches) * trainer.topo.world_size)  # TP ranks hold equal losses
    torch.distributed.all_reduce(total)
    return float(total)


def _train_and_save(rank: int, world: int, argv: list[str], out: str, ds_config: dict, save_after: int,
                    iterations: int, qkv_layout: str) -> list[float]:
    import deepspeed

    trainer = build_for_deepspeed(rank, world, argv)
    topo = trainer.topo
    engine = deepspeed_engine(trainer, ds_config, qkv_layout)
    losses = []
    for it in range(iterations):
        losses.append(deepspeed_train_step(engine, trainer, it))
        if it + 1 == save_after:
            engine.save_checkpoint(out, client_state=_client_state(trainer, save_after))
            full = {n: deepspeed.utils.safe_get_full_fp32_param(p).detach().float().contiguous()
                    for n, p in engine.module.named_parameters()}
            if topo.dp_rank == 0:  # DeepSpeed's view of this TP rank's master weights, to compare the import with
                tag = os.path.join(out, f"global_step{save_after}")
                save_file(full, os.path.join(tag, f"expected_fp32_tp{topo.tp_rank}.safetensors"))
    torch.distributed.barrier()
    return losses


def _train_and_save_pipeline(rank: int, world: int, argv: list[str], out: str, ds_config: dict,
                             save_after: int, iterations: int, qkv_layout: str) -> list[float]:
    """As ``_train_and_save`` with Megatron-DeepSpeed's ``GPTModelPipe`` layer list (TP 1): embedding,
    transformer layers, final norm, and the tied embedding again as the output layer; DeepSpeed's
    pipeline engine places the layers where our stages hold them."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    trainer = build_for_deepspeed(rank, world, argv)
    model, cfg, topo = trainer.model, trainer.cfg, trainer.topo
    if topo.tp > 1 or not cfg.tie_embeddings:
        raise ValueError("the pipeline harness builds tied-embedding TP-1 models only")

    def logits(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, embedding.word_embeddings.weight)[..., : cfg.vocab_size]

    def loss_fn(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float().reshape(-1, cfg.vocab_size), labels.reshape(-1))

    specs = [TiedLayerSpec("embed", EmbeddingPipe, model, qkv_layout, tied_weight_attr="word_embeddings.weight"),
             *[LayerSpec(TransformerPipe, model, i, qkv_layout) for i in range(cfg.num_layers)],
             LayerSpec(FinalNormPipe, model, qkv_layout),
             TiedLayerSpec("embed", EmbeddingPipe, model, qkv_layout, forward_fn=logits,
                           tied_weight_attr="word_embeddings.weight")]
    deepspeed.init_distributed(dist_backend="gloo")
    pipe = PipelineModule(specs, topology=PipeDataParallelTopology(num_pp=topo.pp, num_dp=topo.dp),
                          loss_fn=loss_fn, partition_method="type:TransformerPipe")
    modules = [m for m in pipe.modules() if isinstance(m, _Renamed)]
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=_adamw(modules, trainer.args),
                                      config=_config(trainer, ds_config))
    losses = []
    for it in range(iterations):
        batches = iter([(tokens, labels) for tokens, labels, *_ in _batches(trainer, it)])
        losses.append(float(engine.train_batch(batches)))
        if it + 1 == save_after:
            engine.save_checkpoint(out, client_state=_client_state(trainer, save_after))
    torch.distributed.barrier()
    return losses


def deepspeed_checkpoint(out: str, world: int, argv: list[str], ds_config: dict, save_after: int,
                         iterations: int, qkv_layout: str = "grouped", pipeline: bool = False) -> list[float]:
    """Train ``iterations`` steps with a DeepSpeed engine (its pipeline engine with ``pipeline``, as
    ``--pipeline-model-parallel-size`` in ``argv`` says) on ``world`` gloo ranks, saving into ``out``
    after ``save_after``; returns the losses of every step (mean over the global batch)."""
    from megatron.testing.distributed import run_distributed
    os.environ["DS_ACCELERATOR"] = "cpu"
    train = _train_and_save_pipeline if pipeline else _train_and_save
    return run_distributed(train, world, list(argv), out, ds_config, save_after, iterations, qkv_layout)[0]
