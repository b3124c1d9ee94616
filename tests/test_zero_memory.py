"""Memory-true ZeRO: what a rank holds matches the ZeRO paper's model-state formulas, and a
ZeRO-3 rank builds its model on the meta device and generates only its chunk of the canonical
init, equal to that init element for element."""
from __future__ import annotations

import math

import pytest
import torch

from megatron.core.canonical_init import init_flat_range, init_local
from megatron.core.optimizer.footprint import resident_bytes
from megatron.core.pieces import CanonicalSpec, PieceMap, slice_piece, whole_piece
from megatron.testing.distributed import run_distributed
from megatron.testing.training import inspect_trained

# Hidden 30 over 2 heads (norms of 30 elements pad at DP 4); vocab 97 pads to the TP multiple.
MODEL = ("--num-layers 2 --hidden-size 30 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
         "--global-batch-size 8 --mock-data --vocab-size 97 --hidden-dropout 0 --attention-dropout 0 "
         "--log-interval 1000").split()


def test_flat_range_init_equals_the_slice_of_the_local_init() -> None:
    """Ranges that start and end mid-row, span rows, and cover the zero padding rows."""
    weight = CanonicalSpec("w", (300, 70), "normal", 0.02)
    bias = CanonicalSpec("b", (300,), "normal", 0.02)
    pm = PieceMap((160, 70), [slice_piece(weight, 0, 150, 150)])  # rows 150-299, 10 padding rows
    want = init_local(pm, {"w": weight}, 7).reshape(-1)
    for start, end in [(0, 1), (69, 71), (35, 7035), (7000, 11200), (10499, 10501), (0, 11200)]:
        got = init_flat_range(pm, {"w": weight}, 7, start, end)
        assert torch.equal(got, want[start:end]), f"elements [{start}, {end})"
    vector = PieceMap((300,), [whole_piece(bias)])
    assert torch.equal(init_flat_range(vector, {"b": bias}, 7, 123, 290), init_local(vector, {"b": bias}, 7)[123:290])


def _zero3_init(rank: int, world: int, argv: list[str]) -> list[str]:
    """Build a ZeRO-3 trainer with the full local init made unreachable; return the fragments
    whose master or shard differs from the canonical init's slice."""
    from megatron.core import tensor_parallel
    from megatron.training import build_trainer

    def refuse(*_):
        raise AssertionError("ZeRO-3 start-up materialised a whole local parameter")
    full_init, tensor_parallel.init_local = tensor_parallel.init_local, refuse
    try:
        trainer = build_trainer(argv)
    finally:
        tensor_parallel.init_local = full_init
    params = dict(trainer.model.named_parameters())
    seed, wrong = trainer.args.seed, []
    for f in trainer.optimizer.fragments():
        record = params[f.name].sharding
        assert params[f.name].numel() == 0, f"{f.name} holds {params[f.name].numel()} elements between units"
        want = init_local(record.piece_map, record.specs, seed).reshape(-1)[f.start:f.end]
        shard = trainer.optimizer.param_shard(f)
        n = f.end - f.start
        if not (torch.equal(trainer.optimizer.fragment_state(f)["fp32"], want)
                and torch.equal(shard[:n], want.to(shard.dtype)) and not shard[n:].any()):
            wrong.append(f.name)
    return wrong


@pytest.mark.parametrize("world,flags", [(4, []), (4, ["--tensor-model-parallel-size", "2", "--bf16"])],
                         ids=["dp4", "tp2-dp2-bf16"])
def test_zero3_init_on_the_meta_device_equals_the_canonical_init(world: int, flags: list[str]) -> None:
    argv = MODEL + flags + ["--zero-stage", "3", "--train-iters", "1"]
    for rank, wrong in enumerate(run_distributed(_zero3_init, world, argv)):
        assert wrong == [], f"rank {rank}: ZeRO-3 init differs from the canonical init in {wrong}"


def _held(trainer) -> dict:
    numel = sum(math.prod(p.sharding.local_shape) for p in trainer.model.parameters())
    return {**resident_bytes(trainer.model, trainer.optimizer).to_json(), "numel": numel}


FORMULA = {1: lambda n, d: 4 * n + 12 * n / d, 2: lambda n, d: 2 * n + 14 * n / d, 3: lambda n, d: 16 * n / d}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_model_states_match_the_zero_formula(stage: int) -> None:
    """bf16 parameters and gradients, fp32 master and Adam moments: the ZeRO paper's bytes
    (within 10%: padding to DP chunks is the only excess), and fp32 accumulation adds exactly
    the gradients' other half."""
    argv = MODEL + ["--bf16", "--zero-stage", str(stage), "--train-iters", "1"]
    held = inspect_trained(2, argv, _held)[0]
    total, want = held["params"] + held["grads"] + held["optimizer"], FORMULA[stage](held["numel"], 2)
    assert 1.0 <= total / want <= 1.1, f"ZeRO-{stage} DP2 holds {total} bytes, formula {want:.0f}"
    fp32 = inspect_trained(2, argv + ["--accumulate-allreduce-grads-in-fp32"], _held)[0]
    assert fp32["grads"] == 2 * held["grads"], f"fp32 gradients {fp32['grads']} vs bf16 {held['grads']}"
