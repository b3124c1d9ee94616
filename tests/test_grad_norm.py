"""The global gradient norm counts every canonical element exactly once, on every layout.

The reference is one process's norm of its whole fp32 gradient accumulator (no
replicas, no partitions). Each layout's optimizer computes its norm from the sharding
records (owned pieces, ZeRO partitions); they must agree to 1e-6 relative.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron.core.schedules import forward_backward, micro_batches
from megatron.testing.distributed import run_distributed

MODEL = ("--num-layers 2 --hidden-size 48 --num-attention-heads 6 --seq-length 16 --micro-batch-size 2 "
         "--global-batch-size 12 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
         "--attention-dropout 0 --log-interval 1000 --train-iters 1 --clip-grad 1e9").split()
LLAMA = "--normalization rmsnorm --swiglu --ffn-hidden-size 96 --position-embedding-type rope --disable-bias-linear".split()


def _reference_norm(rank: int, world: int, argv: list[str]) -> float:
    from megatron.training import build_trainer
    t = build_trainer(argv)
    a = t.args
    batches = micro_batches(t.datasets[0], 0, a.global_batch_size, a.micro_batch_size, t.topo, t.device)
    t.optimizer.zero_grad()
    forward_backward(t.model, batches, t.topo, 1.0, a.global_batch_size * a.seq_length, t.device)
    return math.sqrt(sum(float(g.main_grad_flat.double().pow(2).sum()) for g in t.optimizer.groups))


def _layout_norm(rank: int, world: int, argv: list[str]) -> float:
    from megatron.training import build_trainer
    _, norm, ok = build_trainer(argv).train_step()
    assert ok
    return norm


# name: (world size, flags that shape the model (given to the reference too), parallel flags)
LAYOUTS = {
    "tp2": (2, [], "--tensor-model-parallel-size 2"),
    "tp3_llama_repeated_kv": (3, LLAMA + ["--num-key-value-heads", "1"], "--tensor-model-parallel-size 3"),
    "tp3_llama_gqa": (3, LLAMA + ["--num-key-value-heads", "3"], "--tensor-model-parallel-size 3"),
    "pp2_tied_embeddings": (2, [], "--pipeline-model-parallel-size 2"),
    "dp2_zero0": (2, [], "--zero-stage 0"),
    "dp3_zero1": (3, [], "--zero-stage 1"),
    "dp2_zero2": (2, [], "--zero-stage 2"),
    "dp3_zero3": (3, [], "--zero-stage 3"),
    "tp2_dp2_zero1_untied": (4, ["--untie-embeddings-and-output-weights"],
                             "--tensor-model-parallel-size 2 --zero-stage 1"),
    "pp2_dp2_zero2_tied": (4, [], "--pipeline-model-parallel-size 2 --zero-stage 2"),
    # Megatron SP: replicated norms / biases / position table hold TP partial sums, counted once
    "tp2_sequence_parallel": (2, [], "--tensor-model-parallel-size 2 --sequence-parallel"),
    "tp2_dp2_zero2_sequence_parallel_llama_gqa": (4, LLAMA + ["--num-key-value-heads", "2"],
                                                  "--tensor-model-parallel-size 2 --zero-stage 2 --sequence-parallel"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grad_norm_equals_single_process(layout: str) -> None:
    world, model, parallel = LAYOUTS[layout]
    reference = run_distributed(_reference_norm, 1, MODEL + model)[0]
    norms = run_distributed(_layout_norm, world, MODEL + model + parallel.split())
    for rank, norm in enumerate(norms):
        assert norm == pytest.approx(reference, rel=1e-6), f"{layout} rank {rank}: {norm} vs {reference}"


def test_reference_sees_a_real_gradient() -> None:
    """Guards the comparison above against a vacuous zero norm."""
    assert run_distributed(_reference_norm, 1, MODEL)[0] > 1e-3
    assert torch.isfinite(torch.tensor(run_distributed(_reference_norm, 1, MODEL + LLAMA)[0]))
