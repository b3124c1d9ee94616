"""Checkpoint I/O: strided reads of column slices, each checksum block hashed once whatever
the threads, and the streaming converter (chunks smaller than a tensor, same bytes out)."""
from __future__ import annotations

import hashlib
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from megatron.checkpointing import CheckpointReader, convert_to_universal, safetensors_io
from megatron.checkpointing.reader import STATES
from megatron.checkpointing.safetensors_io import BLOCK_SIZE, SafetensorsReader, SafetensorsWriter, copy_runs
from megatron.checkpointing.universal_writer import CanonicalEntry, write_universal
from megatron.testing.training import TINY_GPT, train_losses

ROW = 8 * BLOCK_SIZE // 4  # elements of one row: 8 checksum blocks


def test_column_slice_is_read_as_strided_runs(tmp_path) -> None:
    weight = torch.arange(4 * ROW, dtype=torch.float32).reshape(4, ROW)
    folder = str(tmp_path / "U")
    write_universal(folder, {"w": CanonicalEntry(0, weight)}, {"iteration": 0}, [{}], {}, str(tmp_path / "in"))
    reader = CheckpointReader(folder)
    width = ROW // 8  # a TP8 rank's column slice: one checksum block's worth of each row
    part = reader.read_region("w", ((0, 3 * width), (4, width)), "fp32")
    assert torch.equal(part, weight[:, 3 * width:4 * width])
    # The header's block, then at most the two checksum blocks each row's run touches: not the
    # whole tensor, nor the span from the first row's run to the last (3/8 of the tensor and more).
    assert 0 < reader.bytes_read <= (1 + 4 * 2) * BLOCK_SIZE < weight.numel() * 4 // 3


def test_each_block_is_hashed_once_by_concurrent_readers(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "f.safetensors")
    values = torch.randn(6 * BLOCK_SIZE // 4)
    writer = SafetensorsWriter(path, [("x", tuple(values.shape))])
    writer.write("x", values)
    info = writer.close().to_json()
    hashed: list[int] = []
    sha256 = hashlib.sha256

    class SlowSha256:  # long enough that every thread asks for every block while it is hashed
        def __init__(self, data):
            hashed.append(len(data))
            time.sleep(0.02)
            self.h = sha256(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    reader = SafetensorsReader(path, info)
    monkeypatch.setattr(safetensors_io.hashlib, "sha256", SlowSha256)
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, np.array(reader.read("x", 0, len(values)))))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, values.numpy()) for r in results)
    assert len(hashed) == len(info["block_sha256"]) - 1  # each data block once (the header's was done)
    assert reader.bytes_read == info["size"]


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> str:
    """TP2 ZeRO-1 on two ranks, hidden 64, a 32000-word vocabulary: the embedding (8 MiB per
    state) is far larger than the chunks below and than the converter's other data (tables, RNG)."""
    folder = str(tmp_path_factory.mktemp("W") / "W")
    argv = [{"97": "32000", "32": "64"}.get(a, a) for a in TINY_GPT]
    train_losses(2, argv + ["--tensor-model-parallel-size", "2", "--train-iters", "1", "--save", folder])
    return os.path.join(folder, "global_step1")


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_streaming_converter_writes_the_whole_tensor_bytes_in_bounded_memory(wide_checkpoint, tmp_path) -> None:
    whole = convert_to_universal(wide_checkpoint, str(tmp_path / "whole"), num_workers=2, progress=False,
                                 chunk_bytes=1 << 40)  # one chunk per tensor: whole tensors at once
    tracemalloc.start()
    chunked = convert_to_universal(wide_checkpoint, str(tmp_path / "chunked"), num_workers=2, progress=False,
                                   chunk_bytes=64 << 10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _files(whole.output) == _files(chunked.output)  # bit for bit, manifest included
    source, out = CheckpointReader(wide_checkpoint), CheckpointReader(chunked.output)
    largest = max(source.canonical.values(), key=lambda s: np.prod(s))
    assert np.prod(largest) * 4 >= 64 * (64 << 10)  # the largest tensor is 64 chunks or more
    for name, shape in source.canonical.items():
        for s in STATES:
            box = ((0,) * len(shape), shape)
            assert torch.equal(out.read_region(name, box, s), source.read_region(name, box, s)), (name, s)
    assert peak < np.prod(largest) * 4 // 2, f"peak traced memory {peak} bytes"
    assert chunked.bytes_read <= source.total_bytes  # each input block verified once


def test_spans_written_from_the_mapped_input_equal_the_assembled_chunks(wide_checkpoint, tmp_path,
                                                                        monkeypatch) -> None:
    """Row-split, unsplit and column-split tensors (TP row-parallel weights, one run per row and
    piece) go from the mapped input straight to the output; only chunks that a replica overlaps go
    through ``assemble``; forcing every chunk through ``assemble`` writes the same bytes."""
    from megatron.checkpointing import convert

    used: dict[str, set[str]] = {"direct": set(), "assembled": set()}
    spans = convert.stored_spans

    def counted(reader, name, box, state):
        found = spans(reader, name, box, state)
        used["direct" if found is not None else "assembled"].add(name)
        return found

    monkeypatch.setattr(convert, "stored_spans", counted)
    direct = convert_to_universal(wide_checkpoint, str(tmp_path / "direct"), num_workers=2, progress=False,
                                  chunk_bytes=64 << 10)
    source = CheckpointReader(wide_checkpoint)
    column_split = {n for n in source.canonical if any(p.sizes[-1] < source.canonical[n][-1]
                                                       for _, p in source.by_canonical[n])}
    assert column_split and column_split <= used["direct"], (column_split, used)
    assert used["assembled"] and all(source.replica_pieces(n) for n in used["assembled"]), used
    monkeypatch.setattr(convert, "stored_spans", lambda *args: None)
    assembled = convert_to_universal(wide_checkpoint, str(tmp_path / "assembled"), num_workers=2, progress=False,
                                     chunk_bytes=64 << 10)
    assert _files(direct.output) == _files(assembled.output)
    assert direct.bytes_read == assembled.bytes_read <= source.total_bytes


def test_converter_starts_every_storage_read_before_it_needs_the_bytes(wide_checkpoint, tmp_path,
                                                                      monkeypatch) -> None:
    """Each chunk's input ranges are handed to the kernel (MADV_WILLNEED) chunks ahead of their
    reading, so that the disk reads while the CPU hashes and writes: every read lies in a range
    prefetched before it, and the output is the same."""
    asked: list[tuple[str, str, int, int]] = []
    late: list[tuple[str, str, int, int]] = []
    asked_at_first_read: list[int] = []
    prefetch, read = SafetensorsReader.prefetch, SafetensorsReader.read

    def recorded(self, key, start, end):
        asked.append((self.path, key, start, end))
        prefetch(self, key, start, end)

    def checked(self, key, start, end):
        if not asked_at_first_read:
            asked_at_first_read.append(len(asked))
        if end > start and not any(p == self.path and k == key and a <= start and end <= b
                                   for p, k, a, b in list(asked)):
            late.append((self.path, key, start, end))
        return read(self, key, start, end)

    plain = convert_to_universal(wide_checkpoint, str(tmp_path / "plain"), num_workers=2, progress=False,
                                 chunk_bytes=256 << 10)
    monkeypatch.setattr(SafetensorsReader, "prefetch", recorded)
    monkeypatch.setattr(SafetensorsReader, "read", checked)
    ahead = convert_to_universal(wide_checkpoint, str(tmp_path / "ahead"), num_workers=2, progress=False,
                                 chunk_bytes=256 << 10)
    assert asked and not late, late[:3]
    assert asked_at_first_read[0] >= 2  # the first chunks are asked for before any is read
    assert _files(plain.output) == _files(ahead.output)


@pytest.mark.parametrize("starts", [[0, 40, 80, 120], [8, 48, 96, 100], [12], [], [64, 64]])
@pytest.mark.parametrize("strided_out", [False, True])
def test_copy_runs_equals_copying_run_by_run(starts, strided_out) -> None:
    """Evenly spaced runs (a column slice's rows) go in one strided copy, others run by run;
    into rows of any strides (a column block of the tensor being loaded)."""
    data = np.arange(64, dtype=np.float32).view(np.uint8)
    lo, nbytes = np.array(starts, dtype=np.int64), 16
    whole = np.full((len(starts), 4 * (3 if strided_out else 1)), -1.0, dtype=np.float32)
    out = whole[:, 4:8] if strided_out else whole
    copy_runs(data, lo, nbytes, out)
    expected = [data[a:a + nbytes].view(np.float32) for a in starts]
    assert np.array_equal(out, np.stack(expected) if starts else out)
    if strided_out:
        assert (whole[:, :4] == -1).all() and (whole[:, 8:] == -1).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_one_bad_value_anywhere(bad) -> None:
    from megatron.checkpointing.finite import all_finite

    values = np.linspace(-3e38, 3e38, 1001, dtype=np.float32)
    assert all_finite(values) and all_finite(torch.from_numpy(values)) and all_finite(values[:0])
    for at in (0, 500, 1000):
        poisoned = values.copy()
        poisoned[at] = bad
        assert not all_finite(poisoned) and not all_finite(torch.from_numpy(poisoned)), at


@pytest.mark.parametrize("src_shape,src_box,dst_shape,dst_box,runs", [
    ((6, 4), ((0, 0), (6, 4)), (6, 8), ((0, 4), (6, 4)), 6),  # a TP column slice: one run per row
    ((6, 8), ((2, 0), (3, 8)), (12, 8), ((5, 0), (3, 8)), 1),  # whole rows in both: a single run
    ((3, 4, 5), ((1, 1, 0), (2, 2, 5)), (4, 4, 5), ((0, 2, 0), (2, 2, 5)), 2),  # rows of a slab
    ((2, 3, 4), ((0, 0, 1), (2, 3, 2)), (5, 3, 4), ((3, 0, 2), (2, 3, 2)), 6),
])
def test_run_pairs_map_every_element_of_the_box_in_row_major_order(src_shape, src_box, dst_shape, dst_box,
                                                                   runs) -> None:
    from megatron.core.pieces import box_slices, run_pairs

    length, pairs = run_pairs(src_shape, src_box, dst_shape, dst_box)
    src = np.arange(np.prod(src_shape)).reshape(src_shape)[box_slices(src_box)].reshape(-1)
    dst = np.arange(np.prod(dst_shape)).reshape(dst_shape)[box_slices(dst_box)].reshape(-1)
    assert np.array_equal(np.concatenate([np.arange(s, s + length) for s, _ in pairs]), src)
    assert np.array_equal(np.concatenate([np.arange(d, d + length) for _, d in pairs]), dst)
    assert len(pairs) == runs and length * runs == src.size


def test_one_process_converter_never_imports_torch(wide_checkpoint, tmp_path) -> None:
    """torch's import costs the converter seconds and half a GiB of RSS; nothing it does needs it."""
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "convert_to_universal.py")
    code = ("import runpy, sys\n"
            f"sys.argv = ['convert_to_universal.py', '--input_folder', {wide_checkpoint!r}, '--output_folder', "
            f"{str(tmp_path / 'U')!r}, '--no-progress']\n"
            "try:\n"
            f"    runpy.run_path({tool!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]", out
    assert CheckpointReader(str(tmp_path / "U")).kind == "universal"
