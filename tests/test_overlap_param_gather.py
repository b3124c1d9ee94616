"""--overlap-param-gather: ZeRO-3 units whose all-gather was prefetched while the previous unit
computed give the same bits as synchronous gathers (DP2 and the odd DP3, two micro-batches per
rank, a validation pass between steps, MoE experts gathered inside their layer), the prefetch
is really used, and a prefetch whose shards changed after it started is dropped."""
from __future__ import annotations

import pytest
import torch

from megatron.arguments import ConfigError, parse_args
from megatron.testing.training import inspect_trained

MODEL = ("--num-layers 3 --hidden-size 32 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
         "--lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 --attention-dropout 0 --log-interval 1 "
         "--timing-log-level 1 --train-iters 4 --eval-interval 2 --eval-iters 1 --zero-stage 3").split()
MOE = ["--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-aux-loss-coeff", "0.01"]


def _state(trainer) -> dict:
    gatherer = trainer.param_gather
    return {"losses": list(trainer.state.losses), "valid": trainer.evaluate(),
            "master": [g.master.clone() for g in trainer.optimizer.groups],
            "hits": gatherer.hits, "dropped": gatherer.dropped}


@pytest.mark.parametrize("dp,extra", [(2, []), (3, []), (2, MOE)], ids=["dp2", "dp3", "dp2-moe-ep2"])
def test_prefetched_gathers_are_bit_identical(dp: int, extra: list[str]) -> None:
    flags = MODEL + ["--global-batch-size", str(4 * dp)] + extra  # two micro-batches per rank
    plain = inspect_trained(dp, flags, _state)
    overlapped = inspect_trained(dp, flags + ["--overlap-param-gather"], _state)
    for rank in range(dp):
        want, got = plain[rank], overlapped[rank]
        assert want["hits"] == want["dropped"] == 0
        assert got["hits"] > 0, "no unit used its prefetched gather"
        if not extra:  # dense units run in the predicted order: nothing is thrown away
            assert got["dropped"] == 0
        assert len(want["losses"]) == 4 and want["losses"][-1] < want["losses"][0]
        assert got["losses"] == want["losses"], f"rank {rank}: losses differ"
        assert got["valid"] == want["valid"], f"rank {rank}: validation loss differs"
        for mine, theirs in zip(got["master"], want["master"], strict=True):
            assert torch.equal(mine, theirs), f"rank {rank}: master weights differ"


def _stale_prefetch(trainer) -> dict:
    """Start a unit's prefetch, then write its shards (as an optimizer step does): the unit
    must gather again rather than take the old values."""
    gatherer = trainer.param_gather
    gatherer.overlap = False  # only the prefetch started here
    unit = next(u for u in gatherer.units if u.params)
    gatherer.pending = unit.start_gather(async_op=True)
    for shard in unit.shards:
        shard.add_(1.0)
    dropped = gatherer.dropped
    with gatherer.gathered(unit, backward=False):
        fresh = [p.detach().clone() for p in unit.params]
    with gatherer.gathered(unit, backward=False):  # nothing pending now: a plain gather
        want = [p.detach().clone() for p in unit.params]
    return {"dropped": gatherer.dropped - dropped, "same": all(torch.equal(a, b) for a, b in zip(fresh, want)),
            "moved": bool(unit.shards[0].numel())}


def test_prefetch_started_before_a_shard_write_is_dropped() -> None:
    flags = MODEL + ["--global-batch-size", "8", "--train-iters", "1", "--overlap-param-gather"]
    for rank, got in enumerate(inspect_trained(2, flags, _stale_prefetch)):
        assert got["moved"] and got["dropped"] == 1, f"rank {rank}: the stale prefetch was not dropped"
        assert got["same"], f"rank {rank}: the unit used values gathered before its shards changed"


def test_overlap_param_gather_without_zero3_is_refused() -> None:
    with pytest.raises(ConfigError, match="--overlap-param-gather prefetches ZeRO-3 .* the ZeRO stage is 1"):
        parse_args(MODEL[:-2] + ["--zero-stage", "1", "--overlap-param-gather"], 1)


def test_iteration_line_shows_exposed_param_gather_time_of_training_steps_only(capfd) -> None:
    import re
    import time

    from megatron.core.comm import WaitClock
    clock = WaitClock()
    with clock.blocked(torch.device("cpu")):
        time.sleep(0.02)
    with clock.paused(), clock.blocked(torch.device("cpu")):
        time.sleep(0.2)
    assert 0.02 <= clock.take() < 0.2 and clock.take() == 0.0
    inspect_trained(2, MODEL + ["--global-batch-size", "8", "--train-iters", "2", "--overlap-param-gather"],
                    lambda trainer: None)
    figures = re.findall(r"exposed param-gather time \(ms\): ([0-9.]+)", capfd.readouterr().out)
    assert len(figures) == 2 and all(float(ms) > 0 for ms in figures)
