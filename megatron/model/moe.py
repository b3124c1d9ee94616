"""The Mixture-of-Experts MLP: router, top-k routing, experts, auxiliary losses.

Routing is a pure function of the micro-batch's tokens: every TP rank routes all of them
(the router is tiny) with the same stable sort (ties go to the lower expert index), and
capacity is counted per sequence, so which tokens an expert takes or drops does not depend
on the layout. Each TP rank then runs its share of the tokens through the experts
(``core.expert_parallel``); the outputs are gathered back over TP.

Each expert is canonical tensors named by global expert index
(``layers.3.mlp.experts.5.fc1.weight``, or ``gate`` / ``up`` with SwiGLU, ``fc2``); the
router is ``layers.3.mlp.router.weight``. The auxiliary losses (load balancing, z-loss) do
not travel with the activations: their gradient is injected in backward where they were
computed (``_AuxLossGrad``), so any pipeline stage adds its own layers' share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import comm
from megatron.core.expert_parallel import (all_to_all, check_expert_layout, exchange_counts, gather_rows,
                                           local_experts, make_expert_param, reduce_scatter_rows, tp_token_range)
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, shard_range, slice_piece, whole_piece
from megatron.core.sharding import PartialSum
from megatron.core.tensor_parallel import copy_to_tp, make_param
from megatron.model.config import ModelConfig
from megatron.model.mlp_parts import activate, linear_specs
from megatron.model.moe_config import MoEConfig


# --- routing (pure) -------------------------------------------------------------------------

@dataclass
class Routing:
    """Where each token goes: ``experts`` / ``weights`` ``[tokens, k]`` (-1 and 0 where a capacity
    limit dropped the assignment), ``chosen`` the router's top-k before dropping, ``probs`` the
    softmax over every expert (for the load-balancing loss)."""

    experts: torch.Tensor
    weights: torch.Tensor
    chosen: torch.Tensor
    probs: torch.Tensor


def expert_capacity(cfg: MoEConfig, seq_len: int, factor: float) -> int:
    """Assignments one expert accepts from one sequence at capacity ``factor``."""
    return max(cfg.min_capacity, math.ceil(factor * seq_len * cfg.topk / cfg.num_experts))


def capacity_keep(chosen: torch.Tensor, score: torch.Tensor, seq_len: int, capacity: int, policy: str,
                  num_experts: int) -> torch.Tensor:
    """Which assignments ``[tokens, k]`` fit: per sequence and expert, the ``capacity`` first by
    ``policy`` (probs: highest score first; position: earliest token first; ties: earlier first)."""
    n, k = chosen.shape
    e = chosen.reshape(n // seq_len, seq_len * k)
    if policy == "probs":
        order = torch.sort(score.reshape(e.shape), dim=1, descending=True, stable=True).indices
    else:
        order = torch.arange(e.shape[1], device=e.device).expand_as(e)
    onehot = F.one_hot(e.gather(1, order), num_experts)
    rank_in_expert = (onehot.cumsum(1) * onehot).sum(-1) - 1
    keep = torch.empty_like(e, dtype=torch.bool).scatter_(1, order, rank_in_expert < capacity)
    return keep.view(n, k)


def route(logits: torch.Tensor, cfg: MoEConfig, seq_len: int, training: bool = True) -> Routing:
    """Top-k routing of ``logits`` ``[tokens, experts]`` (tokens sequence-major), at the
    training or the evaluation capacity."""
    logits = logits.float()
    probs = logits.softmax(-1)
    chosen = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :cfg.topk]
    if cfg.score_order == "softmax_topk":
        weights = probs.gather(1, chosen)
    else:  # Mixtral: softmax over the k chosen logits
        weights = logits.gather(1, chosen).softmax(-1)
    experts = chosen
    factor = cfg.capacity_factor if training or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
    if factor is not None:
        keep = capacity_keep(chosen, probs.gather(1, chosen).detach(), seq_len, expert_capacity(cfg, seq_len, factor),
                             cfg.drop_policy, cfg.num_experts)
        experts, weights = chosen.masked_fill(~keep, -1), weights * keep
    return Routing(experts, weights, chosen, probs)


def load_balancing_loss(r: Routing, cfg: MoEConfig, start: int, count: int, seq_len: int) -> torch.Tensor:
    """This rank's part (tokens ``[start, start+count)``) of the switch load-balancing loss
    ``E / k * sum_e f_e P_e`` over the micro-batch (aux_loss) or averaged over its sequences
    (seq_aux_loss); the parts of the TP ranks add up to the whole."""
    n, e = r.probs.shape
    group = n if cfg.load_balancing == "aux_loss" else seq_len
    groups = n // group
    counts = F.one_hot(r.chosen, e).sum(1).view(groups, group, e).sum(1).float()  # every token's choice
    member = F.one_hot(torch.arange(start, start + count, device=r.probs.device) // group, groups).float()
    prob_sums = member.t() @ r.probs[start:start + count]  # this rank's tokens only
    return (counts * prob_sums).sum() * (e / (group * group * cfg.topk * groups))


def z_loss(logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """This rank's part of mean(logsumexp(logits)^2) over the micro-batch's ``num_tokens``."""
    return torch.logsumexp(logits.float(), dim=-1).square().sum() / num_tokens


# --- auxiliary losses: gradient and log --------------------------------------------------------

class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; in backward, ``loss`` gets the gradient ``scale`` (the loss scale
    over the micro-batches of a global batch), as if it had been added to the loss."""

    @staticmethod
    def forward(ctx, out, loss, scale):
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return out

    @staticmethod
    def backward(ctx, g):
        (loss,) = ctx.saved_tensors
        return g, torch.full_like(loss, ctx.scale), None


class MoEStats:
    """This rank's auxiliary losses and expert loads of one step, and the gradient scale the
    auxiliary losses are injected with (set by the training loop before each step)."""

    def __init__(self, cfg: MoEConfig) -> None:
        self.cfg, self.grad_scale, self.micro_batches = cfg, 1.0, 1
        self.rows: dict[int, torch.Tensor] = {}

    def begin_step(self, loss_scale: float, micro_batches: int) -> None:
        """``micro_batches``: of the whole global batch, over every DP rank."""
        self.grad_scale, self.micro_batches, self.rows = loss_scale / micro_batches, micro_batches, {}

    def record(self, layer: int, aux: torch.Tensor, z: torch.Tensor, load: torch.Tensor) -> None:
        if torch._C._current_graph_task_id() != -1:  # a recomputation in backward: already counted
            return
        row = torch.cat([aux.detach().float().reshape(1), z.detach().float().reshape(1), load.float()])
        self.rows[layer] = self.rows[layer] + row if layer in self.rows else row

    def summary(self, num_layers: int, device: torch.device) -> dict[str, float]:
        """Collective over the world: the step's mean load-balancing and z losses (as added to the
        loss, averaged over MoE layers) and each MoE layer's tokens per expert, max / mean."""
        table = torch.zeros(num_layers, 2 + self.cfg.num_experts, device=device)
        for layer, row in self.rows.items():
            table[layer] = row.to(device)
        comm.world_all_reduce(table)
        moe = table[list(self.cfg.layers)]
        out = {"load balancing loss": float(moe[:, 0].mean()) / self.micro_batches,
               "z loss": float(moe[:, 1].mean()) / self.micro_batches}
        for layer, row in zip(self.cfg.layers, moe):
            load = row[2:]
            out[f"layer {layer} expert load max/mean"] = float(load.max() / load.mean().clamp_min(1e-12))
        return out


# --- layers -----------------------------------------------------------------------------------

class Router(nn.Module):
    """``[experts, hidden]`` logits; a replica on every TP rank, each of which routes its own
    tokens' gradient into it, so the replicas' gradients are summed over TP."""

    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        spec = CanonicalSpec(f"{prefix}.router.weight", (cfg.moe.num_experts, cfg.hidden_size), "normal",
                             cfg.init_method_std)
        self.weight = make_param(spec.shape, [whole_piece(spec, owner=topo.tp_rank == 0)], [spec], seed,
                                 replicated_over=("tp",))
        self.weight.sharding = self.weight.sharding.with_partial_sum(PartialSum("tp"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Expert(nn.Module):
    """One expert MLP (fc1 or fused gate/up, activation, fc2) on the tokens routed to it; with
    expert-TP, this rank's slice of its hidden units (fc1 rows, fc2 columns), so its output is a
    partial sum over etp (fc2's bias is added on etp rank 0 only, and its gradient summed)."""

    def __init__(self, prefix: str, cfg: ModelConfig, ffn: int, topo: Topology, seed: int) -> None:
        super().__init__()
        h, std, bias = cfg.hidden_size, cfg.init_method_std, cfg.add_bias_linear
        self.swiglu, self.gelu_approximate = cfg.swiglu, "tanh" if cfg.openai_gelu else "none"
        etp_rank = topo.expert_coords["etp"]
        start, n = shard_range(ffn, etp_rank, topo.dims.etp, f"{prefix} hidden units (--moe-ffn-hidden-size, "
                                                               f"over --expert-tensor-parallel-size)")
        names = (f"{prefix}.gate", f"{prefix}.up") if cfg.swiglu else (f"{prefix}.fc1",)
        specs = [linear_specs(name, ffn, h, std, bias) for name in names]
        self.fc1, self.fc2 = nn.Module(), nn.Module()
        self.fc1.weight = make_expert_param((n * len(names), h), [
            slice_piece(w, 0, start, n, i * n) for i, (w, _) in enumerate(specs)], [w for w, _ in specs], seed)
        self.fc1.bias = make_expert_param((n * len(names),), [
            slice_piece(b, 0, start, n, i * n) for i, (_, b) in enumerate(specs)], [b for _, b in specs],
            seed) if bias else None
        w2, b2 = linear_specs(f"{prefix}.fc2", h, ffn, std / math.sqrt(2 * cfg.num_layers), bias)
        self.fc2.weight = make_expert_param((h, n), [slice_piece(w2, 1, start, n)], [w2], seed)
        self.fc2.bias = None
        if bias:
            self.fc2.bias = make_expert_param((h,), [whole_piece(b2, owner=etp_rank == 0)], [b2], seed)
            self.fc2.bias.sharding = self.fc2.bias.sharding.with_partial_sum(PartialSum("etp"), "etp")
        self.adds_bias = etp_rank == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = activate(F.linear(x, self.fc1.weight, self.fc1.bias), self.swiglu, self.gelu_approximate)
        return F.linear(y, self.fc2.weight, self.fc2.bias if self.adds_bias else None)


class Experts(nn.ModuleDict):
    """This rank's experts, keyed by global expert index, and the dispatch of a rank's tokens to
    every expert of the layer over the ep group."""

    def __init__(self, prefix: str, cfg: ModelConfig, ffn: int, topo: Topology, seed: int) -> None:
        super().__init__({str(g): Expert(f"{prefix}.experts.{g}", cfg, ffn, topo, seed)
                          for g in local_experts(cfg.moe.num_experts, topo)})
        self.num_experts, self.dispatcher = cfg.moe.num_experts, cfg.moe.dispatcher
        self.group, self.ep, self.etp_group = topo.group("ep"), topo.dims.ep, topo.group("etp")

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` ``[tokens, hidden]`` with their ``experts`` / ``weights`` ``[tokens, k]``: the
        weighted sum of their experts' outputs. With expert-TP, the etp group pools its tokens
        (each member holds a slice of every expert), and the partial outputs are summed back."""
        x, experts = gather_rows(x, self.etp_group, True), gather_rows(experts, self.etp_group, False)
        weights = gather_rows(weights, self.etp_group, True)
        if self.dispatcher == "allgather":
            out = self._all_gather(x, experts, weights)
        else:
            out = self._all_to_all(x, experts, weights)
        return reduce_scatter_rows(out, self.etp_group)

    def _all_to_all(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = experts.shape
        per_rank = self.num_experts // self.ep
        flat = experts.reshape(-1)
        kept = (flat >= 0).nonzero().squeeze(1)  # assignments in (token, slot) order
        order = kept[torch.sort(flat[kept], stable=True).indices]  # by expert, then token
        counts = torch.bincount(flat[kept], minlength=self.num_experts).view(self.ep, per_rank)
        received = exchange_counts(counts, self.group)  # [source, local expert]
        send_splits, recv_splits = counts.sum(1).tolist(), received.sum(1).tolist()
        rows = all_to_all(x[order // k], recv_splits, send_splits, self.group)  # by source, then expert
        got = received.tolist()
        starts = [sum(recv_splits[:i]) + sum(got[i][:l]) for i in range(self.ep) for l in range(per_rank)]
        by_expert = [torch.arange(starts[i * per_rank + l], starts[i * per_rank + l] + got[i][l], device=x.device)
                     for l in range(per_rank) for i in range(self.ep)]
        perm = torch.cat(by_expert)
        grouped, outs, offset = rows[perm], [], 0
        for l, expert in enumerate(self.values()):
            size = sum(got[i][l] for i in range(self.ep))
            outs.append(expert(grouped[offset:offset + size]))
            offset += size
        done = torch.cat(outs)[torch.argsort(perm)]  # back to (source, expert) order
        back = all_to_all(done, send_splits, recv_splits, self.group)
        out = x.new_zeros(n * k, x.shape[1]).index_copy(0, order, back)
        return (out.view(n, k, -1) * weights.unsqueeze(-1).to(x.dtype)).sum(1)

    def _all_gather(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every rank sees every token of the ep group, runs its experts, and the partial outputs
        are summed back onto the tokens' own ranks (simple; moves ep x more bytes)."""
        everyone = gather_rows(x, self.group, partial_grads=True)
        chosen = gather_rows(experts, self.group, partial_grads=False)
        w = gather_rows(weights, self.group, partial_grads=True)
        n, k = chosen.shape
        flat = chosen.reshape(-1)
        out = everyone.new_zeros(n * k, x.shape[1])
        for g, expert in self.items():
            slots = (flat == int(g)).nonzero().squeeze(1)
            out = out.index_copy(0, slots, expert(everyone[slots // k]))
        return reduce_scatter_rows((out.view(n, k, -1) * w.unsqueeze(-1).to(x.dtype)).sum(1), self.group)


class MoELayer(nn.Module):
    """Router, experts (and an optional shared expert) in place of a transformer layer's MLP."""

    def __init__(self, prefix: str, index: int, cfg: ModelConfig, topo: Topology, seed: int, stats: MoEStats,
                 shared_expert: nn.Module | None) -> None:
        super().__init__()
        moe = cfg.moe
        check_expert_layout(moe.num_experts, topo)
        self.cfg, self.topo, self.index, self.stats = moe, topo, index, stats
        self.router = Router(prefix, cfg, topo, seed)
        self.experts = Experts(prefix, cfg, moe.ffn_hidden_size or cfg.ffn_hidden_size, topo, seed)
        self.shared_expert = shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        # Each TP rank's routed tokens get gradients only there: sum them over TP for the input.
        flat = copy_to_tp(x, self.topo.tp_group).reshape(b * s, h)
        logits = self.router(flat)
        r = route(logits, self.cfg, s, self.training)
        start, count = tp_token_range(b * s, self.topo)
        mine = slice(start, start + count)
        out = self.experts(flat[mine], r.experts[mine], r.weights[mine])
        aux = logits.new_zeros((), dtype=torch.float32)
        if self.cfg.load_balancing != "none" and self.cfg.aux_loss_coeff:
            aux = self.cfg.aux_loss_coeff * load_balancing_loss(r, self.cfg, start, count, s)
        z = self.cfg.z_loss_coeff * z_loss(logits[mine], b * s) if self.cfg.z_loss_coeff else torch.zeros_like(aux)
        kept = r.experts[mine][r.experts[mine] >= 0]
        self.stats.record(self.index, aux, z, torch.bincount(kept, minlength=self.cfg.num_experts))
        if torch.is_grad_enabled() and (aux + z).requires_grad:
            out = _AuxLossGrad.apply(out, aux + z, self.stats.grad_scale)
        out = gather_rows(out, self.topo.tp_group, partial_grads=False).view(b, s, h)
        return out if self.shared_expert is None else out + self.shared_expert(x)

    def expert_units(self) -> list[tuple[object, str, list[nn.Parameter]]]:
        """ZeRO-3 units: the experts (partitioned over edp) apart from the dense parameters."""
        return [(self.experts, "forward", list(self.experts.parameters()))]
