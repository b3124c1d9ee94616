"""--overlap-grad-reduce: bucket reductions started from backward hooks give the same bits
as the reductions after the last micro-batch (DP2, two micro-batches per rank, several buckets)."""
from __future__ import annotations

import pytest
import torch

from megatron.testing.training import inspect_trained

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
         "--global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
         "--attention-dropout 0 --log-interval 1 --timing-log-level 1 --train-iters 5 "
         "--ddp-bucket-size 700").split()


def _state(trainer) -> dict:
    opt = trainer.optimizer
    return {"losses": list(trainer.state.losses), "master": [g.master.clone() for g in opt.groups],
            "from_hooks": sum(launcher.launched_from_hooks for launcher in opt.launchers.values())
            + opt.overlapped_buckets}


@pytest.mark.parametrize("stage", [1, 3])
def test_overlapped_reduction_is_bit_identical(stage: int) -> None:
    flags = MODEL + ["--zero-stage", str(stage)]
    plain = inspect_trained(2, flags, _state)
    overlapped = inspect_trained(2, flags + ["--overlap-grad-reduce"], _state)
    assert plain[0]["from_hooks"] == 0
    for rank in range(2):
        assert overlapped[rank]["from_hooks"] > 1, "no bucket was started from a backward hook"
        assert overlapped[rank]["losses"] == plain[rank]["losses"]
        assert len(plain[rank]["losses"]) == 5 and plain[rank]["losses"][-1] < plain[rank]["losses"][0]
        for got, want in zip(overlapped[rank]["master"], plain[rank]["master"], strict=True):
            assert torch.equal(got, want), f"ZeRO-{stage} rank {rank}: master weights differ"
