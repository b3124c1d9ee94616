"""Real DeepSpeed checkpoints for the importer's tests (needs ``deepspeed``: the test extra).

``MegatronDeepSpeedGPT`` holds our TP-1 model's parameters under Megatron-DeepSpeed's names and
fused layouts; its forward maps them back (a differentiable gather) and runs our model's math.
A real DeepSpeed engine trains it on the micro-batches our trainer would use, saves, and trains
on: its losses after the save are what a resumed run must reproduce.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from safetensors.torch import save_file
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


class MegatronDeepSpeedGPT(nn.Module):
    """Our model (any TP) behind Megatron-DeepSpeed's names and per-rank fused layouts."""

    def __init__(self, model: nn.Module, qkv_layout: str = "grouped") -> None:
        super().__init__()
        object.__setattr__(self, "ours", model)  # not a submodule: its parameters are not ours
        self.rows = qkv_rows(model.cfg, qkv_layout, model.topo.tp)
        self.inverse = torch.argsort(self.rows)
        self.names: dict[str, str] = {}  # Megatron-DeepSpeed name -> our name
        self.decay: dict[str, bool] = {}
        for name, p in model.named_parameters():
            theirs = mds_name(name)
            data = p.detach().clone()
            if ".attention.qkv." in name:
                data = data[self.rows]
            holder = self
            *path, leaf = theirs.split(".")
            for part in path:
                if not hasattr(holder, part):
                    holder.add_module(part, _Holder())
                holder = getattr(holder, part)
            param = nn.Parameter(data)
            # DeepSpeed's gradient norm counts a parameter split over TP on every rank, others once.
            param.tensor_model_parallel = "tp" not in p.sharding.replica_groups and model.topo.tp > 1
            holder.register_parameter(leaf, param)
            self.names[theirs], self.decay[theirs] = name, p.sharding.weight_decay

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        params = {}
        for path, holder in self.named_modules():
            for leaf, p in zip(holder._parameters, holder() if holder is not self else (), strict=True):
                ours = self.names[f"{path}.{leaf}"]
                params[ours] = p[self.inverse] if ".attention.qkv." in ours else p
        return functional_call(self.ours, params, (tokens, labels)).float().mean()


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


def _train_and_save(rank: int, world: int, argv: list[str], out: str, ds_config: dict, save_after: int,
                    iterations: int, qkv_layout: str) -> list[float]:
    import deepspeed

    from megatron.core import comm
    from megatron.core.micro_batches import micro_batches
    from megatron.training import build_trainer

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # CPU: no JIT-compiled shared-memory op
    # DeepSpeed joins the process group the test made, but looks for torchrun's variables first.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    trainer = build_trainer(argv)  # our data, our canonical init, the process group
    a, topo = trainer.args, trainer.topo
    ref = MegatronDeepSpeedGPT(trainer.model, qkv_layout)
    groups = [{"params": [p for n, p in ref.named_parameters() if ref.decay[n] == decay],
               "weight_decay": a.weight_decay if decay else 0.0} for decay in (True, False)]
    optimizer = torch.optim.AdamW(groups, lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps)
    config = {"train_micro_batch_size_per_gpu": a.micro_batch_size, "gradient_clipping": a.clip_grad,
              "gradient_accumulation_steps": a.global_batch_size // (a.micro_batch_size * topo.dp),
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6, **ds_config}
    engine, *_ = deepspeed.initialize(model=ref, optimizer=optimizer, config=config,
                                      mpu=MegatronMPU(topo) if topo.tp > 1 else None)
    losses = []
    for it in range(iterations):
        total = torch.zeros(1)
        batches = micro_batches(trainer.datasets[0], it * a.global_batch_size, a.global_batch_size,
                                a.micro_batch_size, topo, torch.device("cpu"))
        for tokens, labels, _ in batches:
            loss = engine(tokens, labels)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / (len(batches) * topo.world_size)  # TP ranks hold equal losses
        torch.distributed.all_reduce(total)
        losses.append(float(total))
        if it + 1 == save_after:
            c = trainer.cfg
            mds_args = argparse.Namespace(  # Megatron-DeepSpeed's names for the model's shape
                num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, ffn_hidden_size=c.ffn_hidden_size,
                seq_length=a.seq_length, max_position_embeddings=c.max_position_embeddings,
                vocab_size=c.vocab_size, padded_vocab_size=trainer.model.padded_vocab,
                normalization=c.normalization, swiglu=c.swiglu,
                use_rotary_position_embeddings=c.position_embedding_type == "rope", rotary_base=c.rotary_base,
                untie_embeddings_and_output_weights=not c.tie_embeddings, add_bias_linear=c.add_bias_linear,
                layernorm_epsilon=c.layernorm_epsilon, tensor_model_parallel_size=topo.tp,
                consumed_train_samples=save_after * a.global_batch_size)
            engine.save_checkpoint(out, client_state={"args": mds_args, "iteration": save_after})
            full = {n: deepspeed.utils.safe_get_full_fp32_param(p).detach().float().contiguous()
                    for n, p in ref.named_parameters()}
            if topo.dp_rank == 0:  # DeepSpeed's view of this TP rank's master weights, to compare the import with
                tag = os.path.join(out, f"global_step{save_after}")
                save_file(full, os.path.join(tag, f"expected_fp32_tp{topo.tp_rank}.safetensors"))
    comm.barrier()
    return losses


def deepspeed_checkpoint(out: str, world: int, argv: list[str], ds_config: dict, save_after: int,
                         iterations: int, qkv_layout: str = "grouped") -> list[float]:
    """Train ``iterations`` steps with a DeepSpeed engine on ``world`` gloo ranks, saving into ``out``
    after ``save_after``; returns the losses of every step (mean over the global batch)."""
    from megatron.testing.distributed import run_distributed
    os.environ["DS_ACCELERATOR"] = "cpu"
    return run_distributed(_train_and_save, world, list(argv), out, ds_config, save_after, iterations,
                           qkv_layout)[0]
