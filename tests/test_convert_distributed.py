"""The distributed converter (torchrun): the same bytes as one process, one commit by rank 0,
and a failure on any rank raises on every rank and commits nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from megatron.checkpointing import CheckpointError, CheckpointReader, convert_to_universal
from megatron.testing.distributed import run_distributed
from megatron.testing.launchers import REPO, _env
from megatron.testing.training import TINY_GPT, train_losses
from tools import convert_to_universal as cli


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> str:
    """TP2 ZeRO-1 DP1 on two ranks: column- and row-parallel pieces, replicated norms; a
    32000-word vocabulary, so that tensors span many checksum blocks (as in real checkpoints)."""
    folder = str(tmp_path_factory.mktemp("N") / "N")
    argv = [{"97": "32000"}.get(a, a) for a in TINY_GPT]
    train_losses(2, argv + ["--tensor-model-parallel-size", "2", "--train-iters", "1", "--save", folder])
    return os.path.join(folder, "global_step1")


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_torchrun_output_is_byte_identical_to_one_process(native, tmp_path) -> None:
    one = convert_to_universal(native, str(tmp_path / "one"), num_workers=3, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           os.path.join(REPO, "tools", "convert_to_universal.py"), "--input_folder", native,
           "--output_folder", str(tmp_path / "three"), "--num_workers", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("latest_universal -> three") == 1  # rank 0 reports, once
    assert len(one.files) == 3  # max(--num_workers 2, 3 ranks) files: one per rank
    assert _files(one.output) == _files(str(tmp_path / "three"))  # data files and manifest, bit for bit
    assert open(tmp_path / "latest_universal").read() == "three"


def _convert_counting_commits(rank: int, world: int, native: str, output: str) -> tuple[int, int]:
    """Convert on every rank; returns (commits this rank made, input bytes this rank verified)."""
    from megatron.checkpointing import convert

    commits = []
    real = convert.commit_folder
    convert.commit_folder = lambda tmp, final: (commits.append(final), real(tmp, final))
    reads = []
    real_reader = convert.CheckpointReader

    class CountingReader(real_reader):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            reads.append(self)

    convert.CheckpointReader = CountingReader
    convert_to_universal(native, output, num_workers=1, progress=False)
    return len(commits), reads[0].bytes_read


def test_one_commit_by_rank_0_and_each_rank_reads_only_its_tensors(native, tmp_path) -> None:
    output = str(tmp_path / "U")
    stats = run_distributed(_convert_counting_commits, 3, native, output)
    assert [c for c, _ in stats] == [1, 0, 0]
    assert not os.path.exists(tmp_path / ".U.tmp")
    total = CheckpointReader(native).total_bytes
    # Each rank verifies its own tensors' blocks (plus the headers and the blocks it shares with
    # another rank's tensors): together little more than the input, where each rank reading it
    # all would be 3x.
    assert sum(b for _, b in stats) < 1.3 * total, (stats, total)
    assert all(b < total for _, b in stats)
    reference = convert_to_universal(native, str(tmp_path / "one"), num_workers=3, progress=False)
    assert _files(output) == _files(reference.output)


def _convert_failing(rank: int, world: int, native: str, output: str, failing_rank: int) -> str:
    """Convert with a disk error on ``failing_rank``'s first data write; returns the error each rank raised."""
    from megatron.checkpointing import safetensors_io

    if rank == failing_rank:
        def fail(self, tensor) -> None:
            raise OSError(28, "No space left on device", self.path)
        safetensors_io.SafetensorsWriter.write_chunk = fail
    try:
        convert_to_universal(native, output, num_workers=1, progress=False, overwrite=True)
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_a_failing_rank_fails_every_rank_and_keeps_the_previous_output(native, tmp_path) -> None:
    output = str(tmp_path / "U")
    convert_to_universal(native, output, num_workers=3, progress=False)
    before = _files(output)
    errors = run_distributed(_convert_failing, 3, native, output, 2)
    assert all(e.startswith("rank 2 of the conversion") and "no space left" in e for e in errors), errors
    assert _files(output) == before  # the committed output is untouched, nothing new was committed
    assert not os.path.exists(tmp_path / ".U.tmp")


def _convert_error(rank: int, world: int, native: str, output: str) -> str:
    try:
        convert_to_universal(native, output, num_workers=1, progress=False)
    except CheckpointError as e:
        return str(e)
    return "no error"


def test_bad_input_is_named_on_every_rank_and_nothing_is_committed(native, tmp_path) -> None:
    missing = str(tmp_path / "nothing_here")
    errors = run_distributed(_convert_error, 2, missing, str(tmp_path / "A"))
    assert all(f"checkpoint folder {missing} does not exist" in e for e in errors), errors
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(native, corrupt)
    path = os.path.join(corrupt, "rank_00001.safetensors")
    with open(path, "r+b") as f:  # flip a byte near the end: inside some rank's tensor data
        f.seek(os.path.getsize(path) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    errors = run_distributed(_convert_error, 2, corrupt, str(tmp_path / "B"))
    assert all(f"checksum mismatch in {path}" in e for e in errors), errors
    assert not os.path.exists(tmp_path / "B") and not os.path.exists(tmp_path / ".B.tmp")
    assert not os.path.exists(tmp_path / "latest_universal")


def test_torchrun_refuses_other_formats_with_the_one_process_command(native, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["--input-format", "deepspeed", "--input_folder", native, "--output_folder", str(tmp_path / "U")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "only native -> universal conversions" in err and "as one process" in err
    assert not os.path.exists(tmp_path / "U")
