"""The GPT / Llama decoder: this rank's pipeline stage of it.

The first stage holds the embeddings, the last the final norm and output layer. With
tied embeddings and PP > 1, the last stage holds a replica of the word embedding
(``owner=False`` in its piece map); their gradients are summed over the embedding group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.documents import DocumentLayout
from megatron.core.dropout import DropoutRNG
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, whole_piece
from megatron.core.sharding import PartialSum
from megatron.core.tensor_parallel import (VocabParallelEmbedding, copy_to_tp, gather_from_tp,
                                           make_param, vocab_parallel_cross_entropy)
from megatron.model.config import ModelConfig
from megatron.model.recompute import RecomputeConfig, run_layers
from megatron.model.transformer import Norm, TransformerLayer, rope_cos_sin

WORD_EMBEDDING = "embedding.word_embeddings.weight"


def stage_layer_chunks(num_layers: int, pp_rank: int, pp: int, virtual_chunks: int = 1) -> list[range]:
    """Global layer indices of each model chunk of stage ``pp_rank``. Without interleaving the
    stage holds one contiguous block; with ``virtual_chunks`` V > 1 the layers form ``pp * V``
    virtual stages of equal size and chunk ``c`` of stage ``s`` is virtual stage ``c * pp + s``
    (Megatron's interleaved placement), so canonical names stay global on every layout."""
    stages = pp * virtual_chunks
    if num_layers % stages:
        raise ValueError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
                         f"x {virtual_chunks} model chunks per stage")
    per = num_layers // stages
    return [range((c * pp + pp_rank) * per, (c * pp + pp_rank + 1) * per) for c in range(virtual_chunks)]


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, seed: int, virtual_chunks: int = 1) -> None:
        """``virtual_chunks`` > 1: the interleaved pipeline's model chunks of this stage (see
        ``stage_layer_chunks``); the first stage's chunk 0 embeds, the last stage's last chunk
        holds the head."""
        super().__init__()
        cfg.check_parallel(topo.tp, topo.pp)
        self.recompute = RecomputeConfig()
        self.cfg, self.topo = cfg, topo
        self.dropout_rng = DropoutRNG(seed)  # shared by every layer; the schedule sets its sample
        self.pre_process, self.post_process = topo.is_first_stage, topo.is_last_stage
        self.padded_vocab = cfg.padded_vocab_size(topo.tp)
        word = CanonicalSpec(WORD_EMBEDDING, (cfg.vocab_size, cfg.hidden_size), "normal", cfg.init_method_std)
        self.embedding = None
        if self.pre_process:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(word, self.padded_vocab, topo, seed)
            if cfg.position_embedding_type == "learned_absolute":
                pos = CanonicalSpec("embedding.position_embeddings.weight",
                                    (cfg.max_position_embeddings, cfg.hidden_size), "normal", cfg.init_method_std)
                self.embedding.position_embeddings = nn.Module()
                self.embedding.position_embeddings.weight = make_param(
                    pos.shape, [whole_piece(pos, owner=topo.tp_rank == 0)], [pos], seed, replicated_over=("tp",))
            if cfg.embed_layernorm:
                self.embedding.layernorm = Norm("embedding.layernorm", cfg, topo, seed)
        self.chunks = stage_layer_chunks(cfg.num_layers, topo.pp_rank, topo.pp, virtual_chunks)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(i, cfg, topo, seed, self.dropout_rng)
                                     for chunk in self.chunks for i in chunk})
        self.final_norm = self.output_layer = None
        if self.post_process:
            self.final_norm = Norm("final_norm", cfg, topo, seed)
            if not cfg.tie_embeddings:
                out = CanonicalSpec("output_layer.weight", (cfg.vocab_size, cfg.hidden_size), "normal",
                                    cfg.init_method_std)
                self.output_layer = VocabParallelEmbedding(out, self.padded_vocab, topo, seed)
            elif not self.pre_process:  # tied, on another stage: a replica of the word embedding
                self.output_layer = VocabParallelEmbedding(word, self.padded_vocab, topo, seed, owner=False)
        if cfg.tie_embeddings and topo.pp > 1 and (self.pre_process or self.post_process):
            w = self.output_weight()  # both copies get the summed gradient
            w.sharding = w.sharding.with_partial_sum(PartialSum("embedding"), replica_group="embedding")

    def set_recompute(self, cfg: RecomputeConfig) -> None:
        """Which activations to recompute in backward (losses and gradients do not change)."""
        self.recompute = cfg
        for layer in self.layers.values():
            layer.attention.recompute_core = cfg.granularity == "selective"

    def units(self) -> list[tuple[object, str, list[nn.Parameter]]]:
        """The steps of ``forward`` as (object, method name, parameters the method reads), in
        order. ZeRO-3 gathers a unit's parameters around that call; with tied embeddings the
        word embedding is read by the first and the last unit."""
        units: list[tuple[object, str, list[nn.Parameter]]] = []
        if self.pre_process:
            units.append((self, "embed", list(self.embedding.parameters())))
        units += [(layer, "forward", list(layer.parameters())) for layer in self.layers.values()]
        if self.post_process:
            units.append((self, "head", [*self.final_norm.parameters(), self.output_weight()]))
        return units

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding.word_embeddings(tokens)
        if self.cfg.position_embedding_type == "learned_absolute":
            table = self.embedding.position_embeddings.weight
            x = x + (table[: tokens.shape[1]] if position_ids is None else table[position_ids])
        if self.cfg.embed_layernorm:
            x = self.embedding.layernorm(x)
        return self.dropout_rng.hidden(x, self.cfg.hidden_dropout if self.training else 0.0, -1, "embedding")

    def rope(self, seq: int, x: torch.Tensor, position_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.position_embedding_type != "rope":
            return None
        return rope_cos_sin(seq, self.cfg.head_dim, self.cfg.rotary_base, x.dtype, x.device, position_ids)

    def forward(self, tokens_or_hidden: torch.Tensor, labels: torch.Tensor | None = None,
                documents: DocumentLayout | None = None, chunk: int = 0) -> torch.Tensor:
        """Model chunk ``chunk`` of this stage (the only one without interleaving). The first
        virtual stage takes token ids, later ones hidden states. The last returns the per-token
        loss when ``labels`` are given, else the full (unpadded) logits. ``documents``
        (``--reset-position-ids`` / ``--reset-attention-mask``) restarts positions and blocks
        attention at document ends; ALiBi, as in Megatron, has no positions to reset."""
        positions = documents.position_ids if documents is not None else None
        mask = documents.attention_mask() if documents is not None else None
        first, last = self.pre_process and chunk == 0, self.post_process and chunk == len(self.chunks) - 1
        x = self.embed(tokens_or_hidden, positions) if first else tokens_or_hidden
        rope = self.rope(x.shape[1], x, positions)
        x = run_layers([self.layers[str(i)] for i in self.chunks[chunk]], x, rope, self.recompute, mask)
        if not last:
            return x
        return self.head(x, labels)

    def head(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.final_norm(x)
        logits = F.linear(copy_to_tp(x, self.topo.tp_group), self.output_weight())
        vocab_start = self.topo.tp_rank * (self.padded_vocab // self.topo.tp)
        if labels is None:
            return gather_from_tp(logits, self.topo.tp_group)[..., : self.cfg.vocab_size]
        return vocab_parallel_cross_entropy(logits, labels, vocab_start, self.cfg.vocab_size, self.topo.tp_group)
