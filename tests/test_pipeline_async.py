"""Asynchronous pipeline traffic (sends left in flight, receives awaited at their use) gives the
same bits as awaiting every batch at once -- losses, reduced gradients, weights, validation --
for 1F1B on PP2 and the odd PP3 and for the interleaved schedule, and matches PP=1."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT

RTOL = 1e-4  # PP against PP=1, as tests/test_pipeline_parallel.py
ARGS = TINY_GPT + "--train-iters 4 --zero-stage 1 --timing-log-level 1 --log-interval 2".split()


def _train(rank: int, world: int, argv: list[str], asynchronous: bool) -> dict:
    """Train with the pipeline's transfers asynchronous or not; record each step's reduced
    gradients and how many batches' sends were still in flight after every post."""
    from megatron.core import pipeline_parallel, schedules
    from megatron.training import build_trainer

    for name in ("forward_backward_pipelined", "forward_backward_interleaved"):
        setattr(schedules, name, partial(getattr(schedules, name), asynchronous=asynchronous))
    in_flight: list[int] = []
    post = pipeline_parallel.Transfers.post

    def counting_post(self, *args, **kwargs):
        transfer = post(self, *args, **kwargs)
        in_flight.append(len(self.sending))
        return transfer

    pipeline_parallel.Transfers.post = counting_post
    trainer = build_trainer(argv)
    opt, grads = trainer.optimizer, []
    finish = opt._finish_gradient_reduction

    def recording_finish() -> None:
        finish()
        grads.append([g.grad.clone() for g in opt.groups])

    opt._finish_gradient_reduction = recording_finish
    losses = list(trainer.train().losses)
    return {"losses": losses, "valid": trainer.evaluate(), "grads": grads,
            "master": [g.master.clone() for g in opt.groups], "in_flight": max(in_flight, default=0)}


LAYOUTS = {"pp2": (2, "--num-layers 4 --pipeline-model-parallel-size 2"),
           "pp3": (3, "--num-layers 3 --pipeline-model-parallel-size 3"),
           "pp2_v2": (2, "--num-layers 4 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1")}


@pytest.fixture(scope="module")
def pp1() -> dict[int, list[float]]:
    return {layers: run_distributed(_train, 1, ARGS + ["--num-layers", str(layers)], True)[0]["losses"]
            for layers in (3, 4)}


@pytest.mark.parametrize("name", LAYOUTS)
def test_async_pipeline_is_bit_identical_to_synchronous(pp1, name: str) -> None:
    world, flags = LAYOUTS[name]
    argv = ARGS + flags.split()
    sync = run_distributed(_train, world, argv, False)
    overlapped = run_distributed(_train, world, argv, True)
    for rank in range(world):
        want, got = sync[rank], overlapped[rank]
        assert want["in_flight"] == 0 and got["in_flight"] > 0, f"rank {rank}: no send was left in flight"
        assert got["losses"] == want["losses"] and got["valid"] == want["valid"], f"{name} rank {rank}"
        assert len(got["grads"]) == 4
        for step, (mine, theirs) in enumerate(zip(got["grads"], want["grads"], strict=True)):
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b), f"{name} rank {rank}: gradients differ at step {step + 1}"
        for a, b in zip(got["master"], want["master"], strict=True):
            assert torch.equal(a, b), f"{name} rank {rank}: weights differ"
    reference = pp1[int(flags.split()[1])]
    assert reference[-1] < reference[0], "the PP=1 reference did not train"
    np.testing.assert_allclose(overlapped[0]["losses"], reference, rtol=RTOL, err_msg=name)
