"""Activation recomputation changes memory, never the numbers: with dropout on, every
recompute setting gives bitwise the same losses and trained weights as no recomputation
(the RNG state is restored before recomputing), on one rank and under PP=2 / TP=2."""
from __future__ import annotations

import pytest
import torch

from megatron.testing.training import TINY_GPT, inspect_trained

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--num-layers", "4", "--train-iters", "3"]
SETTINGS = {
    "checkpoint-activations": ["--checkpoint-activations"],
    "checkpoint-activations-2-layers-deepspeed": ["--checkpoint-activations", "--checkpoint-num-layers", "2",
                                                  "--deepspeed-activation-checkpointing"],
    "full-uniform-2": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
    "full-block-1": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"],
    "selective": ["--recompute-activations"],
}


def _losses_and_weights(trainer) -> tuple[list[float], dict[str, torch.Tensor]]:
    return trainer.state.losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _run(world: int, extra: list[str]) -> list:
    return inspect_trained(world, TINY_GPT + DROPOUT + extra, _losses_and_weights)


@pytest.fixture(scope="module")
def plain() -> tuple:
    return _run(1, [])[0]


@pytest.mark.parametrize("name", SETTINGS)
def test_recompute_gives_identical_losses_and_weights(plain, name: str) -> None:
    losses, weights = _run(1, SETTINGS[name])[0]
    assert losses == plain[0]
    for key, value in plain[1].items():
        assert torch.equal(weights[key], value), key


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]])
def test_recompute_under_pp_and_tp_matches_no_recompute(layout: list[str]) -> None:
    base = ["--hidden-dropout", "0", "--attention-dropout", "0"]  # dropout masks depend on the layout
    reference = _run(2, layout + base)
    recomputed = _run(2, layout + base + SETTINGS["full-uniform-2"])
    for (ref_losses, ref_weights), (losses, weights) in zip(reference, recomputed):
        assert losses == ref_losses
        assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())
