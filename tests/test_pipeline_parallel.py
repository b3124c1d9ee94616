"""Pipeline parallelism: 1F1B matches PP=1, tied embeddings stay identical, loss scaling and
global grad norms hold across stages, activation memory is bounded by P, and training
resumes across pipeline changes through native and universal checkpoints."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megatron.checkpointing import convert_to_universal
from megatron.model.config import ModelConfig
from megatron.model.gpt import WORD_EMBEDDING
from megatron.testing.activation_memory import stage_activation_peak
from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT

Layout = tuple[int, int, int]  # (TP, PP, DP)
TOL = 1e-4
STEPS, SAVE_AT = 20, 3
BASE = TINY_GPT + f"--num-layers 4 --train-iters {STEPS} --eval-iters 1 --zero-stage 1".split()
CURVE_LAYOUTS: list[Layout] = [(1, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)]
RESUMES: list[tuple[Layout, Layout]] = [((2, 2, 2), (2, 2, 2)), ((2, 2, 2), (2, 2, 1)), ((2, 2, 2), (1, 1, 4)),
                                        ((2, 2, 2), (2, 1, 2)), ((1, 1, 2), (1, 4, 2)), ((1, 2, 4), (2, 4, 1))]
SOURCES = {s for s, _ in RESUMES}


@dataclass
class Run:
    losses: list[float]
    grad_norms: list[float]
    loss_scales: list[float]
    valid_loss: float
    tied_copies: dict[tuple[int, int], dict[int, np.ndarray]]  # (tp, dp) -> {pp stage: word embedding}
    tied_initial: dict[tuple[int, int], dict[int, np.ndarray]]  # the same before training


def layout_args(layout: Layout) -> list[str]:
    tp, pp, _ = layout
    return f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}".split()


def _train_and_inspect(rank: int, world: int, argv: list[str]) -> dict:
    """Train through the real Trainer, recording every step's grad norm and loss scale, then
    evaluate and return this rank's copy of the tied word embedding (if it holds one)."""
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    norms, scales, step = [], [], trainer.optimizer.step

    def recording_step(lr: float) -> tuple[bool, float]:
        ok, norm = step(lr)
        norms.append(norm)
        scales.append(trainer.scaler.scale)
        return ok, norm

    trainer.optimizer.step = recording_step
    model, topo, weight = trainer.model, trainer.topo, None
    if model.cfg.tie_embeddings and (topo.is_first_stage or topo.is_last_stage):
        weight = model.output_weight()
        for piece in weight.sharding.piece_map.pieces:  # the last stage's copy is a replica of the canonical tensor
            assert piece.canonical == WORD_EMBEDDING and piece.owner == topo.is_first_stage
    initial = None if weight is None else weight.detach().float().numpy().copy()
    state = trainer.train()
    valid = trainer.evaluate()
    tied = None if weight is None else weight.detach().float().numpy().copy()
    return {"losses": state.losses, "norms": norms, "scales": scales, "valid": valid,
            "coords": (topo.tp_rank, topo.dp_rank, topo.pp_rank), "tied": tied, "initial": initial}


def train(layout: Layout, *extra: str) -> Run:
    world = int(np.prod(layout))
    results = run_distributed(_train_and_inspect, world, BASE + layout_args(layout) + list(extra))
    copies: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    initial: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for r in results:
        if r["tied"] is not None:
            tp, dp, pp = r["coords"]
            copies.setdefault((tp, dp), {})[pp] = r["tied"]
            initial.setdefault((tp, dp), {})[pp] = r["initial"]
    first = results[0]
    return Run(first["losses"], first["norms"], first["scales"], first["valid"], copies, initial)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, each computed once: 20 steps, or 2N for resume sources that are not
    curve layouts. Resume sources also save at step N as they go."""
    cache: dict[tuple[Layout, bool], tuple[Run, Path | None]] = {}

    def get(layout: Layout, tied: bool = True) -> tuple[Run, Path | None]:
        if (layout, tied) not in cache:
            extra, save = [] if tied else ["--untie-embeddings-and-output-weights"], None
            if tied and layout in SOURCES:
                save = tmp_path_factory.mktemp("ckpt_" + "_".join(map(str, layout)))
                extra += ["--save", str(save), "--save-interval", str(SAVE_AT)]
                if layout not in CURVE_LAYOUTS:  # only steps 1..2N are compared
                    extra += ["--exit-interval", str(2 * SAVE_AT)]
            cache[(layout, tied)] = (train(layout, *extra), save)
        return cache[(layout, tied)]
    return get


def assert_curves_close(actual: list[float], expected: list[float], what: str) -> None:
    """Every step within TOL (absolute); NaN (a skipped step's grad norm) only where expected has NaN."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} values, expected {len(expected)}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("layout", CURVE_LAYOUTS[1:], ids=lambda l: "tp%d_pp%d_dp%d" % l)
def test_pipeline_loss_curve_and_grad_norm_match_pp1(reference, layout: Layout, tied: bool) -> None:
    base, _ = reference((1, 1, 1), tied)
    run, _ = reference(layout, tied)
    assert len(base.losses) == STEPS and base.losses[-1] < base.losses[0] - 0.5, "reference did not train"
    assert max(base.grad_norms) > 1.0, "no step was clipped, so global clipping goes untested"
    assert_curves_close(run.losses, base.losses, f"{layout} loss")
    assert_curves_close(run.grad_norms, base.grad_norms, f"{layout} grad norm")
    assert_curves_close([run.valid_loss], [base.valid_loss], f"{layout} validation loss (forward-only schedule)")


@pytest.mark.parametrize("layout", [(1, 2, 1), (1, 4, 1), (2, 2, 2)], ids=lambda l: "tp%d_pp%d_dp%d" % l)
def test_tied_embedding_identical_on_first_and_last_stage(reference, layout: Layout) -> None:
    run, _ = reference(layout, True)
    tp, pp, dp = layout
    assert len(run.tied_copies) == tp * dp
    for key, stages in run.tied_copies.items():
        assert sorted(stages) == [0, pp - 1], f"tied embedding copies of {key} on stages {sorted(stages)}"
        np.testing.assert_array_equal(run.tied_initial[key][0], run.tied_initial[key][pp - 1])
        np.testing.assert_array_equal(stages[0], stages[pp - 1], err_msg=f"copies of {key} drifted apart")
    # (TP rank 1 holds only vocabulary padding rows, which stay zero; rank 0 must have trained.)
    assert not np.array_equal(run.tied_copies[(0, 0)][0], run.tied_initial[(0, 0)][0]), "the embedding did not train"


def test_fp16_loss_scale_skips_and_losses_match_pp1() -> None:
    fp16 = ["--fp16", "--initial-loss-scale", str(2.0 ** 24), "--hysteresis", "1", "--train-iters", "8"]
    base, run = train((1, 1, 1), *fp16), train((1, 2, 2), *fp16)
    assert any(np.isnan(base.grad_norms)) and not all(np.isnan(base.grad_norms)), \
        "the run must both skip overflowing steps and apply others"
    assert run.loss_scales == base.loss_scales
    # Skipped steps (NaN norm) must coincide; fp16 gradients carry ~1e-3 relative rounding.
    np.testing.assert_allclose(run.grad_norms, base.grad_norms, rtol=1e-3, equal_nan=True)
    assert_curves_close(run.losses, base.losses, "fp16 loss")


def test_num_layers_not_divisible_by_pp_is_refused() -> None:
    with pytest.raises(RuntimeError, match="--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"):
        train((1, 2, 1), "--num-layers", "3", "--train-iters", "1")


def test_1f1b_activation_peak_independent_of_micro_batch_count() -> None:
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16)
    peak = {(m, gpipe): [r["peak"] for r in run_distributed(stage_activation_peak, 2, cfg, 2, m, gpipe)]
            for m, gpipe in ((2, False), (8, False), (8, True))}
    assert peak[(8, False)] == peak[(2, False)], "1F1B peak grew with the number of micro-batches"
    assert all(p > 0 for p in peak[(8, False)])
    # Stage 0 holds P=2 micro-batches in 1F1B, all 8 in the all-forward-first order.
    assert peak[(8, True)][0] == 4 * peak[(8, False)][0]


def _resumed(reference, source: Layout, target: Layout, universal: bool) -> tuple[list[float], list[float]]:
    run, ckpt = reference(source)
    step_dir = ckpt / f"global_step{SAVE_AT}"
    if universal:
        out = ckpt / f"global_step{SAVE_AT}_universal"
        if not out.exists():  # strict: every replica (tied embedding, TP norms) must agree exactly
            convert_to_universal(str(step_dir), str(out), num_workers=2, replica_policy="strict", progress=False)
        load = ["--load", str(ckpt), "--universal-checkpoint"]
    else:
        load = ["--load", str(ckpt), "--load-tag", os.path.basename(step_dir)]
    resumed = train(target, *load, "--exit-interval", str(2 * SAVE_AT))
    return resumed.losses, run.losses[SAVE_AT:2 * SAVE_AT]


@pytest.mark.parametrize("universal", [True, False], ids=["universal", "native"])
@pytest.mark.parametrize("source,target", RESUMES, ids=lambda l: "tp%d_pp%d_dp%d" % l)
def test_resume_across_pipeline_change_continues_loss(reference, source: Layout, target: Layout,
                                                      universal: bool) -> None:
    resumed, expected = _resumed(reference, source, target, universal)
    if source == target:
        assert resumed == expected, "a same-layout resume must be bit-exact"
    else:
        assert_curves_close(resumed, expected, f"resume {source}->{target}")
