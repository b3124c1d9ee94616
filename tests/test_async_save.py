"""--async-save: the same checkpoint as a synchronous save, the same resumed losses, one save in
flight at a time, and a writer's error raised on every rank."""
from __future__ import annotations

import errno
import os
import time

import pytest

from megatron.checkpointing import CheckpointError, resolve_checkpoint
from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT, train_losses

N = 3
TP2 = TINY_GPT + ["--tensor-model-parallel-size", "2", "--train-iters", str(2 * N)]


def _data_files(folder: str) -> dict[str, bytes]:
    """Rank files and tables (the manifest differs only in nothing it may: compared separately)."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.startswith("rank_")}


def test_async_save_writes_the_sync_checkpoint_and_resumes_identically(tmp_path) -> None:
    sync, background = str(tmp_path / "sync"), str(tmp_path / "async")
    reference = train_losses(2, TP2)
    for folder, extra in ((sync, []), (background, ["--async-save"])):
        losses = train_losses(2, TP2 + ["--exit-interval", str(N), "--save", folder, "--save-interval", "1"] + extra)
        assert losses == reference[:N]
    for step in range(1, N + 1):
        assert _data_files(os.path.join(background, f"global_step{step}")) == \
            _data_files(os.path.join(sync, f"global_step{step}")), step
    assert resolve_checkpoint(background, universal=False).endswith(f"global_step{N}")
    resumed = [train_losses(2, TP2 + ["--load", folder]) for folder in (sync, background)]
    assert resumed[0] == resumed[1]  # bit-identical
    assert resumed[1] == pytest.approx(reference[N:], rel=1e-5)


def _record_order(rank: int, world: int, argv: list[str]) -> list[str]:
    from megatron.checkpointing import async_save, save
    from megatron.training import pretrain

    events: list[str] = []
    write, finish = save.write_rank_state, async_save.finish_save

    def slow_write(folder, rs):
        events.append(f"write {os.path.basename(folder)}")
        time.sleep(0.3)  # still writing when the next save comes
        return write(folder, rs)

    def recorded_finish(pending, *args):
        events.append(f"commit {pending.tag}")
        return finish(pending, *args)

    save.write_rank_state, async_save.finish_save = slow_write, recorded_finish
    pretrain(argv)
    return events


def test_second_save_waits_for_the_first(tmp_path) -> None:
    folder = str(tmp_path / "C")
    events = run_distributed(_record_order, 1, TINY_GPT + ["--train-iters", "3", "--save", folder,
                                                             "--save-interval", "1", "--async-save"])[0]
    assert events == ["write .global_step1.tmp", "commit global_step1", "write .global_step2.tmp",
                      "commit global_step2", "write .global_step3.tmp", "commit global_step3"]


def _fail_second_save_on_rank1(rank: int, world: int, argv: list[str]) -> str:
    from megatron.checkpointing import save
    from megatron.training import pretrain

    write, calls = save.write_rank_state, []

    def full_disk(folder, rs):
        calls.append(folder)
        if rank == 1 and len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "rank_00001.safetensors"))
        return write(folder, rs)

    save.write_rank_state = full_disk
    try:
        pretrain(argv)
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_background_writer_error_is_raised_on_every_rank(tmp_path) -> None:
    folder = str(tmp_path / "C")
    messages = run_distributed(_fail_second_save_on_rank1, 2, TP2 + ["--save", folder, "--save-interval", "2",
                                                                      "--async-save"])
    assert messages[0] == messages[1]
    assert "rank 1" in messages[0] and "no space left" in messages[0] and "global_step4" in messages[0]
    assert resolve_checkpoint(folder, universal=False).endswith("global_step2")  # the previous one stands
    assert not os.path.exists(os.path.join(folder, "global_step4"))
    assert not os.path.exists(os.path.join(folder, ".global_step4.tmp"))  # the space is given back


def _copy_into_prepared_buffer(rank: int, world: int, argv: list[str], sync_dir: str, async_dir: str) -> tuple:
    """A synchronous save, then an asynchronous one of the same state whose live state is
    changed by the next update as soon as ``before_update`` lets it (the background copy is
    slowed down, so the update must wait for it); counts the host allocations the saves made."""
    from megatron.checkpointing import async_save, save, save_checkpoint
    from megatron.training import build_trainer

    write = save.write_rank_state
    save.write_rank_state = lambda folder, rs: time.sleep(0.3) or write(folder, rs)  # still writing at the update
    trainer = build_trainer(argv)  # not trained: the first save of the run is the one to test
    saver = trainer.async_saver
    copy = saver._host_copies
    saver._host_copies = lambda tensors, ready: time.sleep(0.3) or copy(tensors, ready)  # still copying
    saver.wait_prepared()
    prepared = [b.data_ptr() for b in saver._buffers]
    allocations, allocate = [], async_save._allocate
    async_save._allocate = lambda shapes: allocations.append(len(shapes)) or allocate(shapes)
    state = trainer._global_state()
    save_checkpoint(sync_dir, state, trainer.model, trainer.optimizer, trainer.topo)
    blocked = saver.save(async_dir, state, trainer.model, trainer.optimizer)
    trainer.optimizer.wait_before_update()  # what the optimizer's step does before its update
    waited = saver.fence_seconds
    for g in trainer.optimizer.groups:  # the update, while the writer still runs
        for t in (g.master, g.exp_avg, g.exp_avg_sq):
            t.add_(1.0)
    saver.wait()
    return allocations, prepared == [b.data_ptr() for b in saver._buffers], len(prepared), blocked, waited


def test_first_save_copies_into_the_buffer_prepared_at_start(tmp_path) -> None:
    """The copy goes into a buffer allocated when training started (no allocation at the save),
    in the background: the save call returns at once, the next update waits for the copy, and the
    files hold the state as it was at the save."""
    sync, background = str(tmp_path / "sync"), str(tmp_path / "async")
    results = run_distributed(_copy_into_prepared_buffer, 2, TP2 + ["--save",
                                                                   str(tmp_path / "unused"), "--async-save"],
                              sync, background)
    for allocations, reused, tensors, blocked, waited in results:
        assert allocations == [] and reused and tensors > 0
        assert blocked < 0.25 <= waited  # the call does not copy; the update waits for the copy
    assert _data_files(os.path.join(background, "global_step0")) == _data_files(os.path.join(sync, "global_step0"))
