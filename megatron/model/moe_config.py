"""The Mixture-of-Experts part of the model config (DESIGN §1): which layers are MoE layers,
how tokens are routed, and which auxiliary losses are added. Parallel sizes are not part of it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
SCORE_ORDERS = ("softmax_topk", "topk_softmax")
DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("alltoall", "allgather")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    layers: tuple[int, ...]  # global indices of the MoE layers
    topk: int = 1
    ffn_hidden_size: int | None = None  # each expert's; None: the model's
    shared_expert_ffn_hidden_size: int | None = None  # None: no shared expert
    score_order: str = "softmax_topk"  # softmax over all experts, then top-k; or top-k logits, then softmax (Mixtral)
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    capacity_factor: float | None = None  # None: dropless
    eval_capacity_factor: float | None = None  # in evaluation; None: capacity_factor's
    min_capacity: int = 0
    drop_policy: str = "probs"
    dispatcher: str = "alltoall"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        checks = [
            (self.num_experts >= 1, f"--num-experts must be >= 1, got {self.num_experts}"),
            (1 <= self.topk <= self.num_experts,
             f"--moe-router-topk {self.topk} must be between 1 and --num-experts {self.num_experts}"),
            (self.load_balancing in LOAD_BALANCING,
             f"--moe-router-load-balancing-type must be one of {LOAD_BALANCING}, got {self.load_balancing!r}"),
            (self.score_order in SCORE_ORDERS, f"MoE score order must be one of {SCORE_ORDERS}"),
            (self.drop_policy in DROP_POLICIES,
             f"--moe-token-drop-policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}"),
            (self.dispatcher in DISPATCHERS,
             f"--moe-token-dispatcher-type must be one of {DISPATCHERS}, got {self.dispatcher!r}"),
            (self.capacity_factor is None or self.capacity_factor > 0,
             f"--moe-expert-capacity-factor must be positive, got {self.capacity_factor}"),
            (self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
             f"--moe-eval-capacity-factor must be positive, got {self.eval_capacity_factor}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    SHAPE_FIELDS = ("num_experts", "layers", "ffn_hidden_size", "shared_expert_ffn_hidden_size")

    def first_shape_difference(self, other: "MoEConfig | None") -> str | None:
        if other is None:
            return "num_experts: checkpoint has a dense model, this run has experts"
        for name in self.SHAPE_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"moe.{name}: checkpoint has {b!r}, this run has {a!r}"
        return None

    @staticmethod
    def from_json(d: dict) -> "MoEConfig":
        names = {f.name for f in fields(MoEConfig)}
        return MoEConfig(**{k: v for k, v in d.items() if k in names})


def moe_config_from_args(args: argparse.Namespace) -> MoEConfig | None:
    """The MoE settings the (validated) flags give, or None for a dense model."""
    if not getattr(args, "moe_layers", None):
        return None
    return MoEConfig(
        num_experts=args.num_experts, layers=tuple(args.moe_layers), topk=args.moe_router_topk,
        ffn_hidden_size=args.moe_ffn_hidden_size, shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size,
        score_order="topk_softmax" if args.moe_router_topk_then_softmax else "softmax_topk",
        load_balancing=args.moe_router_load_balancing_type, aux_loss_coeff=args.moe_aux_loss_coeff,
        z_loss_coeff=args.moe_z_loss_coeff or 0.0, capacity_factor=args.moe_expert_capacity_factor,
        eval_capacity_factor=args.moe_eval_capacity_factor,
        min_capacity=args.moe_min_capacity, drop_policy=args.moe_token_drop_policy,
        dispatcher=args.moe_token_dispatcher_type)
