"""Resume as Megatron-DeepSpeed users expect: loss scaling across precisions, the load and
save switches, exits on SIGTERM and on time, identity checks, the validation walk."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest

from megatron.arguments import parse_args
from megatron.checkpointing import CheckpointReader
from megatron.data.identity import identity_differences, run_identity
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.metrics_io import read_scalars
from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT, inspect_trained, train_losses

# fp32 curves on one layout: resumed and uninterrupted runs perform the same operations, so they
# agree to reduction-order noise; 1e-5 relative is the project's fp32 tolerance.
REL_TOL = 1e-5


def iters(n: int) -> list[str]:
    return ["--train-iters", str(n)]


def saved_state(folder, step: int) -> dict:
    return CheckpointReader(os.path.join(folder, f"global_step{step}")).manifest["state"]


def scaler_after(world: int, argv: list[str]) -> dict:
    return inspect_trained(world, argv, lambda t: t.scaler.state_dict())[0]


# --- loss scaling --------------------------------------------------------------------------

def test_bf16_checkpoint_resumed_in_fp16_starts_dynamic_scaling_from_the_initial_scale(tmp_path) -> None:
    train_losses(2, TINY_GPT + iters(4) + ["--bf16", "--exit-interval", "2", "--save", str(tmp_path)])
    assert saved_state(tmp_path, 2)["loss_scaler"]["scale"] == 1.0
    s = scaler_after(2, TINY_GPT + iters(4) + ["--fp16", "--initial-loss-scale", "4096", "--load", str(tmp_path),
                                              "--exit-interval", "3"])
    # one fp16 step from 4096: no overflow at this size, window 1000 not reached
    assert (s["dynamic"], s["scale"], s["growth_tracker"], s["min_scale"]) == (True, 4096.0, 1, 1.0)


def test_fp16_to_fp16_continues_the_scaler_and_fp16_to_bf16_ignores_it(tmp_path) -> None:
    train_losses(2, TINY_GPT + iters(4) + ["--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "2",
                                          "--exit-interval", "3", "--save", str(tmp_path)])
    saved = saved_state(tmp_path, 3)["loss_scaler"]
    assert (saved["scale"], saved["growth_tracker"]) == (8192.0, 1)  # grew once after 2 clean steps
    s = scaler_after(2, TINY_GPT + iters(4) + ["--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "2",
                                              "--load", str(tmp_path)])
    assert (s["scale"], s["growth_tracker"]) == (16384.0, 0)  # the 4th clean step completes the window
    s = scaler_after(2, TINY_GPT + iters(4) + ["--bf16", "--load", str(tmp_path)])
    assert (s["dynamic"], s["scale"]) == (False, 1.0)


def test_static_loss_scale_flag() -> None:
    s = scaler_after(1, TINY_GPT + iters(2) + ["--fp16", "--loss-scale", "128"])
    assert (s["dynamic"], s["scale"]) == (False, 128.0)


@pytest.mark.parametrize("world,flags", [(1, []), (2, ["--tensor-model-parallel-size", "2"]),
                                         (2, ["--pipeline-model-parallel-size", "2"]), (2, [])])
def test_fp16_overflow_skips_the_step_and_halves_the_scale_on_any_layout(world: int, flags: list[str]) -> None:
    """2^40 overflows fp16 gradients for certain: each overflowing step is skipped (no optimizer
    step, no schedule step) and, with --hysteresis 1, halves the scale until it fits."""
    argv = TINY_GPT + iters(6) + flags + ["--fp16", "--initial-loss-scale", str(2.0 ** 40), "--hysteresis", "1"]
    scale, steps, samples = inspect_trained(world, argv, lambda t: (t.scaler.scale, t.optimizer.step_count,
                                                                     t.schedule.num_steps))[0]
    skipped = 6 - steps
    assert skipped >= 1
    assert scale == 2.0 ** (40 - skipped)
    assert samples == 8 * steps  # the schedule only counts the applied updates


# --- load and save switches ----------------------------------------------------------------

def test_no_save_optim_writes_weights_only_and_needs_no_load_optim(tmp_path) -> None:
    train_losses(2, TINY_GPT + iters(2) + ["--save", str(tmp_path), "--no-save-optim", "--no-save-rng"])
    reader = CheckpointReader(str(tmp_path / "global_step2"))
    m = reader.manifest
    assert m["saved_states"] == ["fp32"] and "opt_param_scheduler" not in m["state"]
    assert all(reader.rank_rng(r) is None for r in range(2))
    with pytest.raises(RuntimeError, match="saved with --no-save-optim: pass --no-load-optim or --finetune"):
        train_losses(2, TINY_GPT + iters(4) + ["--load", str(tmp_path)])
    assert len(train_losses(2, TINY_GPT + iters(4) + ["--load", str(tmp_path), "--no-load-optim"])) == 2


def test_no_load_optim_restarts_optimizer_and_schedule_but_keeps_the_position(tmp_path) -> None:
    train_losses(1, TINY_GPT + iters(4) + ["--exit-interval", "2", "--save", str(tmp_path)])
    state = inspect_trained(1, TINY_GPT + iters(4) + ["--load", str(tmp_path), "--no-load-optim"],
                            lambda t: (t.state.iteration, t.optimizer.step_count, t.schedule.num_steps))[0]
    assert state == (4, 2, 16)  # iteration continues; the optimizer and the schedule start afresh


def test_finetune_loads_weights_only_and_starts_at_iteration_zero(tmp_path) -> None:
    train_losses(1, TINY_GPT + iters(3) + ["--save", str(tmp_path)])
    fresh = train_losses(1, TINY_GPT + iters(3))
    # another schedule and another learning rate are fine: nothing but the weights is loaded
    tuned = inspect_trained(1, TINY_GPT + iters(3) + ["--load", str(tmp_path), "--finetune", "--lr", "1e-3"],
                            lambda t: (t.state.losses, t.state.iteration, t.state.consumed_samples))[0]
    losses, iteration, consumed = tuned
    assert (len(losses), iteration, consumed) == (3, 3, 24)
    assert losses[0] < fresh[0] - 0.01  # the same first batch, trained weights: already a lower loss


def test_use_checkpoint_args_takes_the_model_shape(tmp_path) -> None:
    argv = TINY_GPT + iters(4) + ["--exit-interval", "2", "--save", str(tmp_path), "--swiglu"]
    train_losses(1, argv)
    shapeless = [a for i, a in enumerate(TINY_GPT) if a not in ("--num-layers", "--hidden-size")
                 and TINY_GPT[i - 1] not in ("--num-layers", "--hidden-size")]
    with pytest.raises(ValueError, match="--num-layers, --hidden-size required"):
        parse_args(shapeless + iters(4), 1)
    args = parse_args(shapeless + iters(4) + ["--load", str(tmp_path), "--use-checkpoint-args"], 1)
    assert (args.num_layers, args.hidden_size, args.swiglu) == (2, 32, True)
    assert len(train_losses(1, shapeless + iters(4) + ["--load", str(tmp_path), "--use-checkpoint-args"])) == 2


def _sigterm_at_iteration(rank: int, world: int, argv: list[str], at: int) -> tuple[int, str]:
    """Rank 0 receives SIGTERM (as a preempted job does) while training iteration ``at``."""
    from megatron.training import build_trainer
    trainer = build_trainer(argv)
    step = trainer.train_step

    def train_step():
        if rank == 0 and trainer.state.iteration == at - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step()
    trainer.train_step = train_step
    state = trainer.train()
    return state.iteration, state.stop_reason


def test_sigterm_saves_and_exits_cleanly_on_every_rank(tmp_path) -> None:
    argv = TINY_GPT + iters(10) + ["--tensor-model-parallel-size", "2", "--exit-signal-handler",
                                   "--save", str(tmp_path)]
    results = run_distributed(_sigterm_at_iteration, 2, argv, 3)
    assert results == [(3, "exiting program after receiving SIGTERM")] * 2
    assert (tmp_path / "latest").read_text() == "global_step3"
    assert saved_state(tmp_path, 3)["iteration"] == 3


def test_exit_duration_in_mins_saves_and_stops(tmp_path) -> None:
    state = inspect_trained(1, TINY_GPT + iters(10) + ["--exit-duration-in-mins", "1e-9", "--save", str(tmp_path)],
                            lambda t: (t.state.iteration, t.state.stop_reason))[0]
    assert state == (1, "exiting program after 1e-09 minutes")
    assert (tmp_path / "latest").read_text() == "global_step1"


# --- identity checks -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("identity"))
    train_losses(1, TINY_GPT + iters(3) + ["--save", folder, "--exit-interval", "2"])
    return folder


def test_resume_with_another_seed_is_refused_unless_overridden(two_steps: str) -> None:
    argv = TINY_GPT + iters(3) + ["--load", two_steps, "--seed", "7"]
    with pytest.raises(RuntimeError, match=r"another seed, data or tokenizer:\s+seed: checkpoint 1234, this run 7"
                                           r"[\s\S]*--override-data-position"):
        train_losses(1, argv)
    assert len(train_losses(1, argv + ["--override-data-position"])) == 1


def test_resume_on_other_data_is_refused_naming_old_and_new(tmp_path) -> None:
    prefixes = []
    for name, docs in (("a", [[1, 2, 3, 4]] * 8), ("b", [[5, 6, 7]] * 8)):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"))
        for d in docs:
            builder.add_document(d)
        builder.finalize(str(tmp_path / f"{name}.idx"))
        prefixes.append(str(tmp_path / name))
    real = [a for a in TINY_GPT if a != "--mock-data"]
    base = parse_args(real + iters(2) + ["--data-path", prefixes[0], "--tokenizer-type", "NullTokenizer"], 1)
    other = parse_args(real + iters(2) + ["--data-path", "0.5", prefixes[0], "0.5", prefixes[1],
                                              "--tokenizer-type", "NullTokenizer", "--split", "98,2,0"], 1)
    changes = identity_differences(run_identity(base, 97), run_identity(other, 97))
    assert "data.split: checkpoint '969,30,1', this run '98,2,0'" in changes
    assert any(c.startswith("data.blend: checkpoint [{") for c in changes)  # one prefix became two


# --- validation ----------------------------------------------------------------------------

def test_validation_walks_forward_and_continues_after_a_resume(tmp_path) -> None:
    flags = ["--eval-interval", "2", "--eval-iters", "1", "--log-validation-ppl-to-tensorboard"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_losses(1, TINY_GPT + iters(4) + flags + ["--tensorboard-dir", str(whole)])
    train_losses(1, TINY_GPT + iters(4) + flags + ["--exit-interval", "2", "--save", str(split / "ckpt"),
                                                  "--tensorboard-dir", str(split)])
    assert saved_state(split / "ckpt", 2)["consumed_valid_samples"] == 8  # one batch of 8 walked
    train_losses(1, TINY_GPT + iters(4) + flags + ["--load", str(split / "ckpt"), "--tensorboard-dir", str(split)])
    want = read_scalars(str(whole), "lm-loss-validation/lm loss validation")
    got = read_scalars(str(split), "lm-loss-validation/lm loss validation")
    assert sorted(want) == sorted(got) == [2, 4]
    rows = [json.loads(line) for line in open(whole / "metrics.jsonl")]
    assert [r["iteration"] for r in rows if "lm-loss-validation/lm loss validation" in r] == [2, 4]
    for it in (2, 4):
        assert abs(got[it] - want[it]) <= REL_TOL * want[it]
    ppl = read_scalars(str(whole), "lm-loss-validation/lm loss validation ppl")
    assert ppl[4] == pytest.approx(math.exp(want[4]), rel=1e-6)
