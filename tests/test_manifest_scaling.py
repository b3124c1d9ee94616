"""The manifest grows O(world) and a rank resuming on the same layout parses only its own table.

Ranks are simulated in one process (a Topology per rank, no process group): each writes
its rank file and table as ``save_checkpoint`` does, rank 0's manifest is written, then
every rank loads on the same layout and reports the JSON bytes it parsed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.arguments import parse_args
from megatron.checkpointing.load import load_checkpoint
from megatron.checkpointing.save import write_manifest, write_rank_file
from megatron.core.optimizer.distributed_optimizer import AdamConfig, DistributedOptimizer
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.model.gpt import GPTModel
from megatron.training import model_config_from_args

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
         "--global-batch-size 8 --mock-data --vocab-size 97 --train-iters 1").split()


def _rank(world: int, rank: int) -> tuple[GPTModel, DistributedOptimizer, Topology]:
    args = parse_args(MODEL, world)
    topo = Topology(ParallelDims(world), rank)
    model = GPTModel(model_config_from_args(args, args.vocab_size), topo, args.seed)
    return model, DistributedOptimizer(list(model.named_parameters()), topo, 0, AdamConfig(), LossScaler()), topo


def _save_and_load(tmp_path, world: int) -> tuple[int, list[int], list[dict]]:
    """(manifest bytes, JSON bytes each rank parsed on load, the RNG state each rank restored)."""
    folder = tmp_path / f"world{world}"
    folder.mkdir()
    entries, rngs = [], []
    for r in range(world):
        torch.manual_seed(1000 + r)  # a distinct RNG state per rank, which each must get back
        model, opt, topo = _rank(world, r)
        entries.append(write_rank_file(str(folder), model, opt, topo))
        rngs.append(torch.get_rng_state())
    write_manifest(str(folder), entries, {"iteration": 1}, opt, topo)
    parsed, restored = [], []
    for r in range(world):
        model, opt, topo = _rank(world, r)
        torch.manual_seed(0)
        loaded = load_checkpoint(str(folder), model, opt, topo)
        assert loaded.rng_restored
        parsed.append(loaded.json_bytes_parsed - os.path.getsize(folder / "manifest.json"))
        restored.append(torch.equal(torch.get_rng_state(), rngs[r]))
    return os.path.getsize(folder / "manifest.json"), parsed, restored


def test_rank_parses_the_same_bytes_at_world_2_4_8_and_manifest_is_linear(tmp_path) -> None:
    sizes, per_rank = {}, {}
    for world in (2, 4, 8):
        sizes[world], parsed, restored = _save_and_load(tmp_path, world)
        assert all(restored), f"world {world}: a rank did not get its own RNG state back"
        per_rank[world] = parsed
        print(f"world {world}: manifest {sizes[world]} B, table bytes parsed per rank max {max(parsed)}")
    # Stage 0: rank 0 stores the DP replicas, so a rank parses its own table and rank 0's: at most two.
    base = max(per_rank[2])
    for world, parsed in per_rank.items():
        assert max(parsed) <= base * 1.02, f"world {world}: a rank parsed {max(parsed)} table bytes, world 2: {base}"
    # O(world): the growth from 4 to 8 ranks is twice that from 2 to 4 (one entry per rank), give or take.
    step_small, step_large = sizes[4] - sizes[2], sizes[8] - sizes[4]
    assert step_large == pytest.approx(2 * step_small, rel=0.05), sizes
    per_entry = step_small / 2
    assert per_entry < 2048, f"{per_entry:.0f} manifest bytes per rank: per-rank state leaked into the manifest"
    manifest = json.loads((tmp_path / "world8" / "manifest.json").read_text())
    assert "rng" not in manifest and all("params" not in s for s in manifest["sources"])
