"""Progress bars: on a terminal (or when asked) for conversions and loads, never in a log file."""
from __future__ import annotations

import sys

import pytest

from megatron.checkpointing import convert_to_universal
from megatron.progress import show_progress
from megatron.testing.training import TINY_GPT, train_losses

RUN = TINY_GPT + ["--train-iters", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    train_losses(1, RUN + ["--save", str(save)])
    return save


def test_default_follows_whether_stderr_is_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(None) and not show_progress(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not show_progress(None) and show_progress(True)


@pytest.mark.parametrize("progress", [None, True], ids=["default_in_a_log", "forced"])
def test_conversion_bar_only_when_asked_or_on_a_terminal(checkpoint, capfd, progress) -> None:
    out = checkpoint / f"universal_{progress}"
    convert_to_universal(str(checkpoint / "global_step1"), str(out), num_workers=1, progress=progress)
    err = capfd.readouterr().err
    assert ("converting" in err) == bool(progress), err


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_load_bar_on_rank0_terminal_only(checkpoint, capfd, monkeypatch, terminal) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal, raising=False)
    train_losses(2, RUN + ["--load", str(checkpoint), "--load-tag", "global_step1", "--finetune"])
    err = capfd.readouterr().err
    assert ("loading global_step1" in err) == terminal, err
