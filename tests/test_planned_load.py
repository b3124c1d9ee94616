"""Read once, verify once: on a resharded load each needed block is read and verified by one
rank, reads are balanced, and the loaded state is bit for bit the per-rank path's."""
from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest

from megatron.checkpointing.read_plan import (FileBlocks, assign_owners, block_runs, blocks_touched, merge_intervals,
                                              split_by_owner)
from megatron.core.pieces import box_runs
from megatron.testing.distributed import run_distributed
from megatron.testing.training import train_losses

BS = 1 << 18

# hidden 48 (6 heads: TP2 and TP3 divide it), a 32000-word vocabulary: the embedding (6 MiB per
# state) spans many checksum blocks; micro-batch 1 x global 6 fits DP 1, 2 and 3.
ARGV = ("--num-layers 2 --hidden-size 48 --num-attention-heads 6 --seq-length 16 --micro-batch-size 1 "
        "--global-batch-size 6 --lr 1e-2 --mock-data --vocab-size 32000 --hidden-dropout 0 "
        "--attention-dropout 0 --log-interval 1000 --train-iters 1").split()


# ---- the planner, without processes ----

def _column_slices(rows: int, cols: int, world: int, base: int) -> list[np.ndarray]:
    """Byte intervals of each TP rank's column slice of a row-major fp32 [rows, cols] at ``base``."""
    out = []
    for r in range(world):
        width = cols // world
        run, starts = box_runs((rows, cols), ((0, r * width), (rows, width)))
        out.append(np.array([[base + 4 * s, base + 4 * (s + run)] for s, _ in starts], dtype=np.int64))
    return out


def _tp1_to_tp4_needs() -> tuple[list[FileBlocks], list[dict[str, np.ndarray]]]:
    """A TP1 file read at TP4: a row-sharded matrix (one rank per row block), a column-sharded one
    (every rank needs every block, in strided runs) and a small replicated tensor."""
    rows, cols, world = 512, 2048, 4
    size = 4 * rows * cols
    f = FileBlocks("rank_00000.safetensors", 2 * size + 4096, BS)
    columns = _column_slices(rows, cols, world, size)
    needs = []
    for r in range(world):
        own_rows = np.array([[r * size // world, (r + 1) * size // world]])
        replicated = np.array([[2 * size, 2 * size + 4096]])
        needs.append({f.name: merge_intervals(np.concatenate([own_rows, columns[r], replicated]))})
    return [f], needs


def test_merge_intervals_sorts_and_joins_touching() -> None:
    got = merge_intervals(np.array([[10, 20], [0, 5], [5, 8], [15, 30], [40, 40]]))
    assert got.tolist() == [[0, 8], [10, 30]]


def test_blocks_touched_by_strided_runs_match_a_brute_force_count() -> None:
    f = FileBlocks("f", 40 * BS + 100, BS)
    runs = _column_slices(300, 4096, 4, 12345)[2]
    expected = np.zeros(f.nblocks, dtype=bool)
    for lo, hi in runs:
        expected[lo // BS:(hi - 1) // BS + 1] = True
    assert np.array_equal(blocks_touched(runs, f), expected)
    assert 0 < expected.sum() < f.nblocks  # the strided runs touch some blocks, not all


def test_block_runs_are_the_touched_blocks_joined_where_consecutive() -> None:
    """What a planned load prefetches: the whole blocks its reads verify, one range per run."""
    f = FileBlocks("f", 40 * BS + 100, BS)
    extra = np.array([[30 * BS + 7, 33 * BS]])
    runs = merge_intervals(np.concatenate(_column_slices(300, 4096, 4, 12345)[1:3] + [extra]))
    got = block_runs(runs[:, 0], runs[:, 1], BS)
    touched = np.zeros(f.nblocks, dtype=bool)
    for a, b in got:
        assert a % BS == 0 and b % BS == 0 and a < b
        touched[a // BS:b // BS] = True
    assert np.array_equal(touched, blocks_touched(runs, f))
    assert all(b < c for (_, b), (c, _) in zip(got, got[1:]))  # disjoint, not touching: joined
    assert block_runs(np.zeros(0, np.int64), np.zeros(0, np.int64), BS) == []


def test_every_needed_block_has_exactly_one_owner_and_reads_balance() -> None:
    files, needs = _tp1_to_tp4_needs()
    owners = assign_owners(files, needs, pinned={files[0].name: {0: 3}})
    f, owner = files[0], owners[files[0].name]
    union = np.any([blocks_touched(n[f.name], f) for n in needs], axis=0)
    union[0] = True  # the pinned header block was read by rank 3
    assert np.array_equal(owner >= 0, union)
    assert owner[0] == 3
    load = np.bincount(owner[owner >= 0], weights=f.block_bytes()[owner >= 0], minlength=4)
    assert load.sum() == f.block_bytes()[union].sum()  # each needed block read once in all
    assert load.max() <= 1.2 * load.mean(), load
    # A block of the row-sharded matrix that only rank r needs is read by rank r itself.
    for r in range(4):
        alone = [b for b in range(f.nblocks) if [blocks_touched(n[f.name], f)[b] for n in needs].count(True) == 1
                 and blocks_touched(needs[r][f.name], f)[b] and b != 0]
        assert alone and all(owner[b] == r for b in alone)


def test_split_by_owner_covers_each_rank_needs_exactly_by_block_owner() -> None:
    files, needs = _tp1_to_tp4_needs()
    owners = assign_owners(files, needs)
    f = files[0]
    for n in needs:
        lo, hi, own = split_by_owner(n[f.name], owners[f.name], BS)
        assert (hi - lo).sum() == (n[f.name][:, 1] - n[f.name][:, 0]).sum()
        assert np.array_equal(merge_intervals(np.stack((lo, hi), axis=1)), n[f.name])
        assert all((owners[f.name][a // BS:(b - 1) // BS + 1] == o).all() for a, b, o in zip(lo, hi, own))


def test_unbalanced_exclusive_needs_spill_to_idle_ranks() -> None:
    """Rank 0 alone needs a whole file: the others read parts of it and send them."""
    f = FileBlocks("big", 64 * BS, BS)
    needs = [{"big": np.array([[0, f.size]])}, {}, {}, {}]
    owner = assign_owners([f], needs)["big"]
    load = np.bincount(owner, minlength=4) * BS
    assert load.max() <= 1.2 * f.size / 4


# ---- multi-process loads ----

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """One-step checkpoints at TP2 (2 ranks), TP1 (1 rank) and TP1 DP2 ZeRO-1 (2 ranks)."""
    root = tmp_path_factory.mktemp("planned")
    out = {}
    for name, world, flags in (("tp2", 2, ["--tensor-model-parallel-size", "2"]), ("tp1", 1, []),
                               ("dp2", 2, [])):
        folder = str(root / name)
        train_losses(world, ARGV + flags + ["--save", folder])
        out[name] = os.path.join(folder, "global_step1")
    return out


def _load_both(rank: int, world: int, argv: list[str], folder: str, budget: int) -> dict:
    """Load ``folder`` into the layout of ``argv`` per rank, then planned; which blocks each rank
    hashed, bytes read and received, and whether the two loads agree bit for bit."""
    from megatron.checkpointing import exchange, load_checkpoint
    from megatron.checkpointing.safetensors_io import SafetensorsReader
    from megatron.training import build_trainer

    exchange.EXCHANGE_BUDGET = budget
    hashed: list[tuple[str, int]] = []
    original = SafetensorsReader._hash_block

    def spy(self, b, bs, expected):
        original(self, b, bs, expected)
        hashed.append((os.path.basename(self.path), b))
    SafetensorsReader._hash_block = spy
    trainer = build_trainer(argv)
    opt, out, logs = trainer.optimizer, {}, []
    for planned in (False, True):
        hashed.clear()
        loaded = load_checkpoint(folder, trainer.model, opt, trainer.topo, exchange=planned, log=logs.append)
        state = {(f.name, s): v.clone() for f in opt.fragments() for s, v in opt.fragment_state(f).items()}
        out[planned] = {"hashed": list(hashed), "read": loaded.bytes_read, "from_peers": loaded.from_peers,
                        "state": state}
    out["equal"] = all(out[False]["state"][k].equal(v) for k, v in out[True]["state"].items())
    out["logs"] = logs
    for planned in (False, True):
        del out[planned]["state"]
    return out


def _block_bytes(folder: str, blocks: set[tuple[str, int]]) -> int:
    from megatron.checkpointing import read_manifest
    files = read_manifest(folder)["files"]
    return sum(min(files[n]["block_size"], files[n]["size"] - b * files[n]["block_size"]) for n, b in blocks)


CASES = [  # (source, target world, target flags, exchange budget)
    ("tp2", 2, ["--tensor-model-parallel-size", "1"], 128 << 20),
    ("tp1", 3, ["--tensor-model-parallel-size", "3"], 1 << 20),  # many rounds
    ("dp2", 3, ["--zero-stage", "3"], 128 << 20),
]


@pytest.mark.parametrize("source,world,flags,budget", CASES, ids=["tp2-to-tp1dp2", "tp1-to-tp3", "dp2-to-dp3z3"])
def test_resharded_load_reads_each_needed_block_once(sources, source, world, flags, budget) -> None:
    folder = sources[source]
    results = run_distributed(_load_both, world, ARGV + flags, folder, budget)
    assert all(r["equal"] for r in results), "the planned load differs from the per-rank load"
    needed = set().union(*(set(r[False]["hashed"]) for r in results))  # what the per-rank path verifies
    counts = Counter(b for r in results for b in r[True]["hashed"])
    assert set(counts) == needed  # every block the job needs is verified...
    assert max(counts.values()) == 1  # ...by exactly one rank, once
    reads = [r[True]["read"] for r in results]
    assert sum(reads) == _block_bytes(folder, needed)
    assert max(reads) <= 1.2 * sum(reads) / world, reads
    assert sum(r[False]["read"] for r in results) > sum(reads)  # the per-rank path reads some blocks twice
    assert sum(r[True]["from_peers"] for r in results) > 0
    line = results[0]["logs"][-1]
    assert f"read {sum(reads) / (1 << 20):.1f} MiB from storage" in line
    assert f"{sum(r[True]['from_peers'] for r in results) / (1 << 20):.1f} MiB from other ranks" in line
    assert all(f"rank {i} {reads[i] / (1 << 20):.1f} MiB" in line for i in range(world)), line


@pytest.mark.parametrize("source", ["dp2", "tp2"])
def test_column_slices_read_in_batched_runs_equal_the_whole_tensor_sliced(sources, source) -> None:
    """Column slices (one run per row, batched per fragment; runs across the ZeRO-1 fragment
    boundary of the DP2 files and the TP2 pieces read apart) against the tensor read whole."""
    from megatron.checkpointing.reader import CheckpointReader

    reader = CheckpointReader(sources[source])
    for name in ("layers.1.mlp.fc2.weight", "embedding.word_embeddings.weight", "layers.0.attention.dense.weight"):
        rows, cols = reader.canonical[name]
        whole = reader.read_region_array(name, ((0, 0), (rows, cols)), "exp_avg_sq")
        for c0, width in ((0, 1), (5, 13), (cols // 2 - 3, 7), (cols - 4, 4)):
            for r0, height in ((0, rows), (rows // 3, rows // 2 + 1)):
                got = reader.read_region_array(name, ((r0, c0), (height, width)), "exp_avg_sq")
                assert np.array_equal(got, whole[r0:r0 + height, c0:c0 + width]), (name, r0, c0, height, width)


def _load_corrupted(rank: int, world: int, argv: list[str], folder: str) -> str:
    from megatron.checkpointing import CheckpointError, load_checkpoint
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    try:
        load_checkpoint(folder, trainer.model, trainer.optimizer, trainer.topo)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def test_corrupted_block_gives_every_rank_the_same_clear_error(sources, tmp_path) -> None:
    """A block of fc2 (column-sliced at TP3: every rank needs it, one reads it) is corrupted."""
    from megatron.testing.tamper import read_header

    folder = str(tmp_path / "global_step1")
    shutil.copytree(sources["tp1"], folder)
    path = os.path.join(folder, "rank_00000.safetensors")
    header, data = read_header(path)
    start = os.path.getsize(path) - len(data) + header["layers.1.mlp.fc2.weight/fp32"]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(start + 8)
        byte = f.read(1)
        f.seek(start + 8)
        f.write(bytes([byte[0] ^ 0xFF]))
    messages = run_distributed(_load_corrupted, 3, ARGV + ["--tensor-model-parallel-size", "3"], folder)
    assert len(set(messages)) == 1, messages
    assert f"checksum mismatch in {path}" in messages[0] and "layers.1.mlp.fc2.weight/fp32" in messages[0]


def test_nan_in_a_resharded_load_gives_every_rank_the_same_error_naming_it(sources, tmp_path) -> None:
    """The recording walk reads zeros and checks nothing; the fill that reads the NaN refuses it."""
    from megatron.testing.tamper import read_header, reseal, write_file_with_header

    folder = str(tmp_path / "global_step1")
    shutil.copytree(sources["tp1"], folder)
    path = os.path.join(folder, "rank_00000.safetensors")
    header, data = read_header(path)
    start = header["layers.1.mlp.fc2.weight/exp_avg"]["data_offsets"][0] + 4 * 5  # row 0: TP3 rank 0's columns
    data = bytearray(data)
    data[start:start + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    write_file_with_header(path, header, bytes(data))
    reseal(folder)
    messages = run_distributed(_load_corrupted, 3, ARGV + ["--tensor-model-parallel-size", "3"], folder)
    assert len(set(messages)) == 1, messages
    assert "layers.1.mlp.fc2.weight (exp_avg) holds NaN or Inf" in messages[0], messages[0]
