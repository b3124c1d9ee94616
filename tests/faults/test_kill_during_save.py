"""SIGKILL of one rank or of the whole job at random points of a save (new steps, a re-save of an
existing step, retention): the newest complete checkpoint loads and verifies, nothing partial is
taken for complete, older checkpoints are byte-identical or removed only by --keep-last-k."""
from __future__ import annotations

import os
import random
import re
import shutil

import pytest

from megatron.checkpointing import CheckpointReader, resolve_checkpoint
from megatron.checkpointing.commit import complete_folder
from megatron.checkpointing.inspect import describe_checkpoint
from megatron.checkpointing.reader import STATES
from megatron.testing.faults import PHASES, run_and_kill, snapshot
from megatron.testing.training import train_losses
from tests.test_reliability import TP2, trained  # noqa: F401 (fixture)

pytestmark = pytest.mark.faults
KEEP = 2
TRIALS = [(phase, mode, resave) for phase in PHASES for mode in ("one-rank", "whole-job") for resave in (False, True)]
RANK0_ONLY = ("manifest", "rename", "pointer", "retention")  # only rank 0 commits


def _read_everything(path: str) -> None:
    reader = CheckpointReader(path)
    for name, shape in reader.canonical.items():
        for s in STATES:
            reader.read_region(name, ((0,) * len(shape), shape), s)


@pytest.mark.parametrize("phase,mode,resave", TRIALS,
                         ids=[f"{p}-{m}-{'resave' if r else 'new'}" for p, m, r in TRIALS])
def test_sigkill_during_save_loses_nothing(trained, tmp_path, phase, mode, resave) -> None:
    rng = random.Random(f"{phase}{mode}{resave}")
    folder = shutil.copytree(trained[0], str(tmp_path / "C"))
    before = {name: snapshot(os.path.join(folder, name)) for name in os.listdir(folder)
              if name.startswith("global_step")}
    argv = TP2 + ["--train-iters", "8", "--load", folder, "--save", folder, "--save-interval", "2",
                  "--keep-last-k", str(KEEP)] + (["--load-tag", "global_step2"] if resave else [])
    victims = ({0} if phase in RANK0_ONLY else {rng.randrange(2)}) if mode == "one-rank" else {0, 1}
    call = rng.randint(1, 2)  # every phase happens at least twice in the saves of steps 6 and 8
    assert run_and_kill(2, argv, phase, call, victims), "the job was not killed"

    latest = resolve_checkpoint(folder, universal=False)
    assert "checksums: all verified" in describe_checkpoint(latest)  # the inspector agrees
    _read_everything(latest)
    assert CheckpointReader(latest).manifest["state"]["iteration"] >= 4
    visible = [n for n in os.listdir(folder) if re.fullmatch(r"global_step\d+(_universal)?", n)]
    for name in visible:  # nothing partial is taken for complete
        describe_checkpoint(os.path.join(folder, name))
    native_steps = sorted(int(n[len("global_step"):]) for n in visible if not n.endswith("_universal"))
    for name, files in before.items():
        path = complete_folder(os.path.join(folder, name))
        if path is None:  # only retention may remove an older checkpoint, and only behind k newer ones
            assert len([s for s in native_steps if s > int(name[len("global_step"):].split("_")[0])]) >= KEEP, name
        elif not (resave and name == "global_step4"):
            assert snapshot(path) == files, f"{name} changed"
    if rng.random() < 0.35 or phase == "rename":  # resume for real from what is left
        step = CheckpointReader(latest).manifest["state"]["iteration"]
        losses = train_losses(1, TP2[:-2] + ["--train-iters", "8", "--exit-interval", str(step + 1), "--load", folder])
        assert len(losses) == min(1, 8 - step)
