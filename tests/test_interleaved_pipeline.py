"""Interleaved pipeline (--num-layers-per-virtual-pipeline-stage): Megatron's order, the loss
curve of PP=1 on PP2/PP3 with several model chunks per stage, and resumes between
interleaved and plain pipelines (canonical names carry global layer indices)."""
from __future__ import annotations

import numpy as np
import pytest

from megatron.arguments import ConfigError, parse_args
from megatron.checkpointing import convert_to_universal
from megatron.core.pipeline_interleaved import BACKWARD, FORWARD, Op, plan, stage_order
from megatron.model.gpt import stage_layer_chunks
from megatron.testing.training import TINY_GPT, inspect_trained, train_losses

RTOL = 1e-5
STEPS = 4


def _ops(text: str) -> list[Op]:
    return [Op(FORWARD if t[0] == "F" else BACKWARD, int(t[1]), int(t[2])) for t in text.split()]


def test_stage_order_is_megatrons_interleaved_order() -> None:
    """P=2, V=2, M=4, stage 0: 2(P-1) + (V-1)P = 4 warmup forwards, micro-batches through the
    chunks in groups of P, backwards from the last chunk first."""
    assert stage_order(0, 2, 2, 4) == _ops("F00 F01 F10 F11 F02 B10 F03 B11 F12 B00 F13 B01 B12 B13 B02 B03")
    assert stage_order(1, 2, 2, 4) == _ops("F00 F01 F10 B10 F11 B11 F02 B00 F03 B01 F12 B12 F13 B13 B02 B03")
    assert stage_order(0, 2, 2, 2)[:4] == _ops("F00 F01 F10 F11")  # M = P: every forward first


@pytest.mark.parametrize("pp,chunks,micro", [(2, 2, 4), (2, 2, 2), (3, 2, 6), (4, 3, 8), (2, 4, 8)])
def test_plan_runs_every_operation_once_after_its_input(pp: int, chunks: int, micro: int) -> None:
    steps = plan(pp, chunks, micro)
    at: dict[tuple[str, int, int], int] = {}
    for stage, ops in enumerate(steps):
        for t, op in enumerate(ops):
            if op is not None:
                key = (op.kind, op.chunk * pp + stage, op.micro)
                assert key not in at
                at[key] = t
    last = pp * chunks - 1
    assert len(at) == 2 * (last + 1) * micro
    for (kind, virtual, m), t in at.items():
        if kind == FORWARD and virtual > 0:
            assert at[(FORWARD, virtual - 1, m)] < t
        if kind == BACKWARD:
            assert at[(FORWARD, virtual, m)] < t
            if virtual < last:
                assert at[(BACKWARD, virtual + 1, m)] < t


def test_layer_chunks_are_megatrons_virtual_stages() -> None:
    assert stage_layer_chunks(8, 0, 2, 2) == [range(0, 2), range(4, 6)]
    assert stage_layer_chunks(8, 1, 2, 2) == [range(2, 4), range(6, 8)]
    assert stage_layer_chunks(6, 2, 3, 2) == [range(2, 3), range(5, 6)]
    assert stage_layer_chunks(8, 1, 2) == [range(4, 8)]


def _args(*extra: str) -> list[str]:
    return TINY_GPT + ["--train-iters", str(STEPS), *extra]


@pytest.mark.parametrize("message,world,flags", [
    ("needs --pipeline-model-parallel-size >= 2", 1, "--num-layers 4 --num-layers-per-virtual-pipeline-stage 1"),
    ("--num-layers 6 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 2",
     2, "--num-layers 6 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 2"),
    (r"micro-batches per step .* = 3\) divisible by --pipeline-model-parallel-size 2", 2,
     "--num-layers 4 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 "
     "--global-batch-size 6"),
])
def test_bad_interleaving_is_refused(message: str, world: int, flags: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(_args(*flags.split()), world)


@pytest.fixture(scope="module")
def reference() -> dict[int, tuple[list[float], float]]:
    """PP=1 curves of the 4- and 6-layer models, with dropout (keyed by global coordinates);
    the 6-layer one at global batch 12 (6 micro-batches, divisible by PP=3)."""
    return {layers: _curve_and_validation(1, _args(*MODELS[layers])) for layers in MODELS}


def _losses_and_validation(trainer) -> tuple[list[float], float]:
    return trainer.state.losses, trainer.evaluate()


def _curve_and_validation(world: int, argv: list[str]) -> tuple[list[float], float]:
    """Rank 0's training losses and then one validation loss (the forward-only schedule)."""
    return inspect_trained(world, argv, _losses_and_validation)[0]


MODELS = {4: ["--num-layers", "4", "--hidden-dropout", "0.1"],
          6: ["--num-layers", "6", "--hidden-dropout", "0.1", "--global-batch-size", "12"]}


@pytest.mark.parametrize("layers,world,flags", [
    (4, 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
    (4, 4, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --tensor-model-parallel-size 2"),
    (4, 4, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),  # DP2: M = P, all warmup
    (6, 3, "--pipeline-model-parallel-size 3 --num-layers-per-virtual-pipeline-stage 1 "
           "--recompute-granularity full --recompute-method uniform"),
], ids=["pp2_v2", "tp2_pp2_v2", "pp2_dp2_v2", "pp3_v2_recompute"])
def test_interleaved_loss_curve_matches_pp1(reference, layers: int, world: int, flags: str) -> None:
    losses, valid = _curve_and_validation(world, _args(*MODELS[layers], *flags.split()))
    expected, expected_valid = reference[layers]
    assert expected[-1] < expected[0], "reference did not train"
    np.testing.assert_allclose(losses, expected, rtol=RTOL, err_msg=flags)
    np.testing.assert_allclose(valid, expected_valid, rtol=RTOL, err_msg=f"validation {flags}")


PP2 = "--pipeline-model-parallel-size 2".split()
INTERLEAVED = PP2 + "--num-layers-per-virtual-pipeline-stage 1".split()


@pytest.mark.parametrize("source,target,universal", [
    (INTERLEAVED, PP2, False), (PP2, INTERLEAVED, False), (INTERLEAVED, [], True)],
    ids=["interleaved_to_pp2", "pp2_to_interleaved", "interleaved_universal_to_pp1"])
def test_resume_between_interleaved_and_plain_pipeline_continues_loss(tmp_path, reference, source, target,
                                                                      universal) -> None:
    base = MODELS[4]
    save = tmp_path / "ckpt"
    train_losses(2, _args(*base, *source, "--save", str(save), "--save-interval", "2", "--exit-interval", "2"))
    load = ["--load", str(save)]
    if universal:
        convert_to_universal(str(save / "global_step2"), str(save / "global_step2_universal"), num_workers=1,
                             replica_policy="strict", progress=False)
        load.append("--universal-checkpoint")
    world = 2 if target else 1
    resumed = train_losses(world, _args(*base, *target, *load))
    np.testing.assert_allclose(resumed, reference[4][0][2:], rtol=RTOL)


MOE = "--num-experts 4 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 --hidden-dropout 0".split()


@pytest.mark.parametrize("extra,world,flags", [
    (MOE, 4, "--expert-model-parallel-size 2"),
    (MOE, 4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 2"),
    (["--hidden-dropout", "0.1"], 4, "--tensor-model-parallel-size 2 --sequence-parallel"),
    (["--hidden-dropout", "0.1"], 4, "--ds-sequence-parallel-size 2"),
    (["--hidden-dropout", "0.1"], 4, "--context-parallel-size 2"),
], ids=["moe_ep2", "moe_tp2_ep2", "tp2_megatron_sp", "ulysses2", "ring2"])
def test_interleaved_composes_with_moe_and_sequence_splits(extra: list[str], world: int, flags: str) -> None:
    """PP2 with two chunks per stage, on top of experts or a split sequence: the PP=1 curve."""
    base = _args("--num-layers", "4", *extra)
    expected = train_losses(1, base)
    assert expected[-1] < expected[0], "reference did not train"
    losses = train_losses(world, base + INTERLEAVED + flags.split())
    np.testing.assert_allclose(losses, expected, rtol=RTOL, err_msg=flags)
