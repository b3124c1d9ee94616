"""SIGKILL while --async-save's background thread writes: the previous checkpoint stays the
newest complete one, byte for byte, and a resume from it trains exactly as an unkilled one."""
from __future__ import annotations

import os
import shutil

import pytest

from megatron.checkpointing import CheckpointReader, resolve_checkpoint
from megatron.checkpointing.inspect import describe_checkpoint
from megatron.testing.faults import run_and_kill, snapshot
from megatron.testing.training import train_losses
from tests.test_reliability import TP2, trained  # noqa: F401 (fixture)

pytestmark = pytest.mark.faults
TRIALS = [("tensor-write", 1, {0}), ("tensor-write", 4, {0, 1}), ("fsync", 1, {1})]


def _next_iteration(folder: str) -> list[float]:
    return train_losses(2, TP2 + ["--train-iters", "8", "--exit-interval", "5", "--load", folder])


@pytest.mark.parametrize("phase,call,victims", TRIALS, ids=[f"{p}-{c}-{sorted(v)}" for p, c, v in TRIALS])
def test_sigkill_during_background_write_loses_nothing(trained, tmp_path, phase, call, victims) -> None:
    folder = shutil.copytree(trained[0], str(tmp_path / "C"))
    pristine = shutil.copytree(trained[0], str(tmp_path / "pristine"))
    before = snapshot(os.path.join(folder, "global_step4"))
    argv = TP2 + ["--train-iters", "8", "--load", folder, "--save", folder, "--save-interval", "2", "--async-save"]
    # Rank 1 takes no lock: its first fsync is its step-6 rank file's, in the background writer.
    assert run_and_kill(2, argv, phase, call, victims), "the job was not killed"

    latest = resolve_checkpoint(folder, universal=False)
    assert latest.endswith("global_step4")
    assert snapshot(latest) == before
    assert "checksums: all verified" in describe_checkpoint(latest)
    assert CheckpointReader(latest).manifest["state"]["iteration"] == 4
    assert not os.path.exists(os.path.join(folder, "global_step6"))
    assert _next_iteration(folder) == _next_iteration(pristine)  # bit-identical
