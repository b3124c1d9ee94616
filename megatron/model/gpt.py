"""The GPT / Llama decoder: this rank's pipeline stage of it.

The first stage holds the embeddings, the last the final norm and output layer. With
tied embeddings and PP > 1, the last stage holds a replica of the word embedding
(``owner=False`` in its piece map); their gradients are summed over the embedding group.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron.core.documents import DocumentLayout
from megatron.core.dropout import DropoutRNG
from megatron.core.parallel_state import Topology
from megatron.core.sequence_layout import SequenceLayout, check_sequence_split
from megatron.core.pieces import CanonicalSpec, whole_piece
from megatron.core.sharding import PartialSum
from megatron.core.tensor_parallel import (VocabParallelEmbedding, column_parallel_linear, gather_from_tp,
                                           make_param, vocab_parallel_cross_entropy)
from megatron.core.tp_sequence_parallel import SequenceParallel, check_divisible
from megatron.model.config import ModelConfig
from megatron.model.moe import MoEStats
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
    """``sequence_parallel``: Megatron's ``--sequence-parallel`` (meaningful with TP > 1): the
    hidden states between stages and layers are this TP rank's slice of the sequence.
    ``virtual_chunks`` > 1: the interleaved pipeline's model chunks of this stage (see
    ``stage_layer_chunks``); the first stage's chunk 0 embeds, the last stage's last chunk
    holds the head."""

    def __init__(self, cfg: ModelConfig, topo: Topology, seed: int, sequence_parallel: bool = False,
                 virtual_chunks: int = 1) -> None:
        super().__init__()
        cfg.check_parallel(topo.tp, topo.pp)
        self.sp = sp = SequenceParallel.of(topo, sequence_parallel)
        if sp.enabled:
            check_divisible(cfg.seq_length, sp.size)
        self.recompute = RecomputeConfig()
        self.cfg, self.topo = cfg, topo
        check_sequence_split(cfg.seq_length, cfg.num_attention_heads, topo.tp, topo.dims.sp, topo.dims.cp)
        self.layout = SequenceLayout.of(topo)  # this rank's share of each sample's tokens (Ulysses, ring)
        self.dropout_rng = DropoutRNG(seed, layout=self.layout)  # shared by every layer; the schedule sets its sample
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pre_process, self.post_process = topo.is_first_stage, topo.is_last_stage
        self.padded_vocab = cfg.padded_vocab_size(topo.tp)
        word = CanonicalSpec(WORD_EMBEDDING, (cfg.vocab_size, cfg.hidden_size), "normal", cfg.init_method_std)
        self.embedding = None
        if self.pre_process:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(word, self.padded_vocab, topo, seed, sp=sp)
            if cfg.position_embedding_type == "learned_absolute":
                pos = CanonicalSpec("embedding.position_embeddings.weight",
                                    (cfg.max_position_embeddings, cfg.hidden_size), "normal", cfg.init_method_std)
                self.embedding.position_embeddings = nn.Module()
                self.embedding.position_embeddings.weight = make_param(
                    pos.shape, [whole_piece(pos, owner=topo.tp_rank == 0)], [pos], seed, replicated_over=("tp",))
                sp.mark_partial_sum(self.embedding.position_embeddings.weight)
            if cfg.embed_layernorm:
                self.embedding.layernorm = Norm("embedding.layernorm", cfg, topo, seed, sp)
        self.chunks = stage_layer_chunks(cfg.num_layers, topo.pp_rank, topo.pp, virtual_chunks)
        self.moe_stats = MoEStats(cfg.moe) if cfg.moe is not None else None  # shared by the MoE layers
        self.layers = nn.ModuleDict({str(i): TransformerLayer(i, cfg, topo, seed, self.dropout_rng, self.moe_stats, sp)
                                     for chunk in self.chunks for i in chunk})
        self.final_norm = self.output_layer = None
        if self.post_process:
            self.final_norm = Norm("final_norm", cfg, topo, seed, sp)
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
        units += [unit for layer in self.layers.values() for unit in layer.units()]
        if self.post_process:
            units.append((self, "head", [*self.final_norm.parameters(), self.output_weight()]))
        return units

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def stage_output_shape(self, micro: int, seq: int) -> tuple[int, int, int]:
        """The hidden states one stage sends the next: this TP rank's sequence slice under SP."""
        return micro, seq // self.sp.size, self.cfg.hidden_size

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` (``--reset-position-ids``): ``[b, s]`` aligned with ``tokens``."""
        x = self.embedding.word_embeddings(tokens)  # this rank's sequence slice under SP
        local = x.shape[1]
        start = self.sp.seq_start(local)
        if self.cfg.position_embedding_type == "learned_absolute":
            if position_ids is not None:
                positions = position_ids[:, start:start + local] if self.sp.enabled else position_ids
            elif self.sp.enabled:
                positions = torch.arange(start, start + local, device=x.device)  # Megatron-SP slice
            else:
                positions = self.layout.positions(local, x.device)  # Ulysses / ring share
            x = x + self.embedding.position_embeddings.weight[positions]
        if self.cfg.embed_layernorm:
            x = self.embedding.layernorm(x)
        return self.dropout_rng.hidden(x, self.cfg.hidden_dropout if self.training else 0.0, -1, "embedding",
                                       *self.sp.dropout_window(local))

    def rope(self, seq: int, x: torch.Tensor, position_ids: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables: made once per (length, dtype, device) for the fixed positions, per
        batch for per-sample ``position_ids`` (``--reset-position-ids``)."""
        if self.cfg.position_embedding_type != "rope":
            return None
        if position_ids is not None:
            return rope_cos_sin(seq, self.cfg.head_dim, self.cfg.rotary_base, x.dtype, x.device, position_ids)
        key = (seq, x.dtype, x.device)
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_cos_sin(seq, self.cfg.head_dim, self.cfg.rotary_base, x.dtype, x.device,
                                                  self.layout.positions(seq, x.device))
        return self._rope_tables[key]

    def forward(self, tokens_or_hidden: torch.Tensor, labels: torch.Tensor | None = None,
                documents: DocumentLayout | None = None, chunk: int = 0) -> torch.Tensor:
        """Model chunk ``chunk`` of this stage (the only one without interleaving). The first
        virtual stage takes token ids, later ones hidden states. The last returns the per-token
        loss when ``labels`` are given, else the full (unpadded) logits. ``documents``
        (``--reset-position-ids`` / ``--reset-attention-mask``) restarts positions and blocks
        attention at document ends; ALiBi, as in Megatron, has no positions to reset."""
        positions = documents.position_ids if documents is not None else None
        segments = documents.segment_ids if documents is not None else None
        first, last = self.pre_process and chunk == 0, self.post_process and chunk == len(self.chunks) - 1
        x = self.embed(tokens_or_hidden, positions) if first else tokens_or_hidden
        rope = self.rope(self.sp.seq_length(x.shape[1]), x, positions)
        x = run_layers([self.layers[str(i)] for i in self.chunks[chunk]], x, rope, self.recompute, segments)
        if not last:
            return x
        return self.head(x, labels)

    def head(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.final_norm(x)
        logits = column_parallel_linear(x, self.output_weight(), None, self.topo.tp_group, self.sp)
        vocab_start = self.topo.tp_rank * (self.padded_vocab // self.topo.tp)
        if labels is None:
            return gather_from_tp(logits, self.topo.tp_group)[..., : self.cfg.vocab_size]
        return vocab_parallel_cross_entropy(logits, labels, vocab_start, self.cfg.vocab_size, self.topo.tp_group)
