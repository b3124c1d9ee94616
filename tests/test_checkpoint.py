"""Universal checkpointing: round trip, resume continuity on other layouts, and bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.checkpointing import CheckpointError, CheckpointReader, convert_to_universal
from megatron.checkpointing.inspect import describe_checkpoint
from megatron.checkpointing.reader import STATES
from megatron.testing.tamper import reseal
from megatron.testing.training import TINY_GPT, train_losses

N = 3  # iterations before and after the save


def layout(tp: int = 1, dp: int = 1, zero: int = 1) -> tuple[int, list[str]]:
    return tp * dp, ["--tensor-model-parallel-size", str(tp), "--zero-stage", str(zero)]


def uninterrupted(world_flags: tuple[int, list[str]]) -> list[float]:
    world, flags = world_flags
    return train_losses(world, TINY_GPT + flags + ["--train-iters", str(2 * N)])


def save_at_n(folder: str, world_flags: tuple[int, list[str]]) -> str:
    world, flags = world_flags
    train_losses(world, TINY_GPT + flags + ["--train-iters", str(2 * N), "--exit-interval", str(N),
                                           "--save", folder])
    return os.path.join(folder, f"global_step{N}")


def resume(folder: str, world_flags: tuple[int, list[str]], universal: bool) -> list[float]:
    world, flags = world_flags
    extra = ["--universal-checkpoint"] if universal else []
    return train_losses(world, TINY_GPT + flags + ["--train-iters", str(2 * N), "--load", folder] + extra)


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """TP1 DP1: on fp32, every layout's curve equals it within 1e-4."""
    return uninterrupted(layout())


MATRIX = [  # (source, target)
    (layout(tp=2), layout(tp=1)),
    (layout(tp=1), layout(tp=2)),
    (layout(tp=2), layout(tp=4)),
    (layout(dp=2), layout(dp=1)),
    (layout(dp=1), layout(dp=4)),
    (layout(dp=4), layout(dp=2)),
    (layout(dp=2, zero=1), layout(dp=4, zero=0)),
    (layout(dp=4, zero=0), layout(dp=2, zero=1)),
    (layout(tp=2, dp=2), layout(tp=1, dp=4)),
    (layout(tp=4, dp=1), layout(tp=2, dp=2)),
]


@pytest.mark.parametrize("source,target", MATRIX, ids=lambda x: f"w{x[0]}:{'-'.join(x[1][1::2])}")
def test_resume_on_other_layout_continues_loss(tmp_path, reference, source, target) -> None:
    path = save_at_n(str(tmp_path), source)
    convert_to_universal(path, path + "_universal", num_workers=2, progress=False)
    for universal in (False, True):
        losses = resume(str(tmp_path), target, universal)
        assert len(losses) == N
        diff = max(abs(a - b) for a, b in zip(losses, reference[N:], strict=True))
        assert diff < 1e-4, f"universal={universal}: max |diff| {diff}"


@pytest.mark.parametrize("source", [layout(tp=2, dp=2), layout(dp=2, zero=0)], ids=["tp2dp2z1", "dp2z0"])
def test_resume_on_same_layout_is_exact(tmp_path, source) -> None:
    full = uninterrupted(source)
    path = save_at_n(str(tmp_path), source)
    convert_to_universal(path, path + "_universal", num_workers=2, progress=False)
    assert resume(str(tmp_path), source, universal=False) == full[N:]
    assert resume(str(tmp_path), source, universal=True) == full[N:]


def _tensors(path: str) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {f"{n}/{s}": reader.read_region(n, ((0,) * len(shape), shape), s)
            for n, shape in reader.canonical.items() for s in STATES}


def test_native_universal_native_round_trip_is_bit_exact(tmp_path) -> None:
    source = layout(tp=2, dp=2)
    first = save_at_n(str(tmp_path / "a"), source)
    convert_to_universal(first, first + "_universal", progress=False)
    # Load the universal checkpoint on the same layout and save it again without training.
    world, flags = source
    # --train-iters N ends the run at once; the checkpoint's schedule (planned for 2N) is kept.
    train_losses(world, TINY_GPT + flags + ["--train-iters", str(N), "--use-checkpoint-opt_param-scheduler",
                                           "--load", str(tmp_path / "a"),
                                           "--universal-checkpoint", "--save", str(tmp_path / "b")])
    second = str(tmp_path / "b" / f"global_step{N}")
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = (json.load(open(os.path.join(p, "manifest.json"))) for p in (first, second))
    assert ma["state"] == mb["state"]
    assert ma["param_groups"] == mb["param_groups"]
    assert ma["canonical"] == mb["canonical"]
    assert _tensors(first + "_universal").keys() == a.keys()
    for key, t in _tensors(first + "_universal").items():
        assert torch.equal(t, a[key]), key


@pytest.fixture()
def saved(tmp_path) -> str:
    path = save_at_n(str(tmp_path), layout(tp=2, dp=2))
    return path


def _resume_error(folder: str) -> str:
    with pytest.raises(RuntimeError) as info:
        resume(folder, layout(tp=1, dp=2), universal=False)
    return str(info.value)


def test_truncated_rank_file_is_refused(saved) -> None:
    f = os.path.join(saved, "rank_00001.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    msg = _resume_error(os.path.dirname(saved))
    assert "rank_00001.safetensors" in msg and "truncated" in msg


def test_wrong_checksum_is_refused_naming_the_tensor(saved) -> None:
    f = os.path.join(saved, "rank_00002.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-5] ^= 0xFF
    open(f, "wb").write(bytes(data))
    msg = _resume_error(os.path.dirname(saved))
    assert "checksum mismatch in" in msg and "rank_00002.safetensors" in msg and "tensors:" in msg
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        describe_checkpoint(saved)


def test_missing_rank_file_is_refused(saved) -> None:
    os.remove(os.path.join(saved, "rank_00003.safetensors"))
    msg = _resume_error(os.path.dirname(saved))
    assert "missing checkpoint file" in msg and "rank_00003.safetensors" in msg
    with pytest.raises(CheckpointError, match="rank_00003"):
        convert_to_universal(saved, saved + "_universal", progress=False)


def test_checkpoint_of_another_model_shape_is_refused(saved) -> None:
    world, flags = layout(tp=1, dp=2)
    argv = TINY_GPT + flags + ["--train-iters", str(2 * N), "--load", os.path.dirname(saved)]
    argv[argv.index("--hidden-size") + 1] = "64"
    with pytest.raises(RuntimeError, match="another model shape: hidden_size: checkpoint has 32, this run has 64"):
        train_losses(world, argv)


def test_other_global_batch_size_with_iteration_schedule_needs_a_scheduler_flag(saved) -> None:
    """Schedules count samples (as Megatron's): iteration flags at another global batch give
    another schedule, which is refused unless a flag says which one wins."""
    world, flags = layout(tp=1, dp=2)
    argv = TINY_GPT + flags + ["--train-iters", str(2 * N), "--load", os.path.dirname(saved)]
    argv[argv.index("--global-batch-size") + 1] = "16"
    with pytest.raises(RuntimeError, match=r"lr_decay_steps: checkpoint 48, command line 96"):
        train_losses(world, argv)
    assert len(train_losses(world, argv + ["--use-checkpoint-opt_param-scheduler"])) == N


def test_inspect_lists_layout_and_verifies_checksums(saved) -> None:
    text = describe_checkpoint(saved)
    assert "iteration: 3" in text and "'tp': 2" in text and "checksums: all verified" in text
    assert "layers.1.attention.k.weight" in text


def _crash_during_save(rank: int, world: int, argv: list[str]) -> None:
    """Rank 1 dies in the middle of writing its file during the second save."""
    from megatron.checkpointing import safetensors_io
    from megatron.training import pretrain

    original = safetensors_io.SafetensorsWriter.write
    calls = {"n": 0}

    def dying_write(self, key, tensor):
        if rank == 1 and "global_step6" in self.path:
            calls["n"] += 1
            if calls["n"] == 3:
                os._exit(17)
        return original(self, key, tensor)

    safetensors_io.SafetensorsWriter.write = dying_write
    pretrain(argv)


def test_crash_during_save_keeps_previous_checkpoint_loadable(tmp_path, reference) -> None:
    from megatron.testing.distributed import run_distributed

    world, flags = layout(tp=2, dp=2)
    argv = TINY_GPT + flags + ["--train-iters", str(2 * N), "--save", str(tmp_path), "--save-interval", str(N)]
    with pytest.raises(RuntimeError):
        run_distributed(_crash_during_save, world, argv, timeout=120)
    assert open(tmp_path / "latest").read() == f"global_step{N}"
    assert not (tmp_path / f"global_step{2 * N}").exists()
    losses = resume(str(tmp_path), layout(tp=1, dp=2), universal=False)
    assert max(abs(a - b) for a, b in zip(losses, reference[N:], strict=True)) < 1e-4


def test_converter_detects_disagreeing_replicas(saved) -> None:
    """Norm weights are replicated over TP; corrupt one replica consistently and convert."""
    reader = CheckpointReader(saved)
    replica = next((h, p) for h, p in reader.replica_pieces("final_norm.weight"))
    holder, _ = replica
    frag = holder.fragments[0]
    f = os.path.join(saved, frag.file)
    entry = reader.file(frag.file).entry(f"{frag.key}/fp32")
    start = reader.file(frag.file).data_start + entry["data_offsets"][0]
    data = bytearray(open(f, "rb").read())
    value = torch.frombuffer(data[start:start + 4], dtype=torch.float32).clone() + 0.5
    data[start:start + 4] = value.numpy().tobytes()
    open(f, "wb").write(bytes(data))
    reseal(saved)  # a consistent but wrong save
    with pytest.raises(CheckpointError, match="replicas of final_norm.weight \\(fp32\\) disagree by up to 5.000e-01"):
        convert_to_universal(saved, saved + "_strict", replica_policy="strict", progress=False)
    report = convert_to_universal(saved, saved + "_first", replica_policy="first", progress=False)
    assert report.max_replica_diff == pytest.approx(0.5) and "final_norm.weight" in report.max_replica_tensor


def test_new_run_loading_its_empty_save_folder_starts_from_scratch(tmp_path, reference) -> None:
    losses = train_losses(1, TINY_GPT + ["--train-iters", str(2 * N), "--load", str(tmp_path),
                                         "--save", str(tmp_path)])
    assert losses == reference


ODD = ["--hidden-size", "48", "--num-attention-heads", "6", "--vocab-size", "101", "--num-layers", "3"]


def _odd(argv: list[str]) -> list[str]:
    """TINY_GPT with sizes that divide by 3 (heads, layers) and a vocab that needs padding."""
    out = list(argv)
    for flag, value in zip(ODD[::2], ODD[1::2]):
        out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize("source,target", [
    (["--tensor-model-parallel-size", "3"], ["--zero-stage", "2"]),
    (["--pipeline-model-parallel-size", "3"], ["--tensor-model-parallel-size", "3", "--zero-stage", "3"]),
], ids=["tp3-to-dp3z2", "pp3-to-tp3z3"])
def test_resume_with_degree_three_continues_loss(tmp_path, source, target) -> None:
    base = _odd(TINY_GPT) + ["--global-batch-size", "6", "--train-iters", str(2 * N)]
    reference = train_losses(1, base)
    train_losses(3, base + source + ["--exit-interval", str(N), "--save", str(tmp_path)])
    convert_to_universal(str(tmp_path / f"global_step{N}"), str(tmp_path / f"global_step{N}_universal"),
                         progress=False)
    for universal in ([], ["--universal-checkpoint"]):
        losses = train_losses(3, base + target + ["--load", str(tmp_path)] + universal)
        assert max(abs(a - b) for a, b in zip(losses, reference[N:], strict=True)) < 1e-4
