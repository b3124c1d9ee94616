"""What a save or a load did, per rank: bytes moved, seconds, throughput (for the log and benchmarks)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron.core.parallel_state import Topology

MIB = float(1 << 20)


@dataclass
class IoStats:
    """One rank's part of a save or a load: bytes written or read from storage, bytes received
    from other ranks (loads), and the seconds its I/O took."""

    rank: int
    bytes: int
    seconds: float
    from_peers: int = 0


def gather_to_rank0(obj: Any, topo: Topology) -> list[Any]:
    """Collective: every rank's ``obj`` by rank on rank 0; ``[obj]`` elsewhere."""
    if not (dist.is_initialized() and topo.world_size > 1):
        return [obj]
    out = [None] * topo.world_size if topo.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out if topo.rank == 0 else [obj]


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MIB / seconds:.1f} MiB/s" if seconds > 0 else "- MiB/s"


def describe_io(verb: str, stats: list[IoStats], seconds: float) -> str:
    """One line: the total, then each rank's bytes, seconds and throughput; ``verb`` is
    'wrote' or 'read' (loads also say how much came from other ranks)."""
    total = sum(s.bytes for s in stats)
    peers = sum(s.from_peers for s in stats)
    where = f" from storage, {peers / MIB:.1f} MiB from other ranks" if verb == "read" else ""
    ranks = "; ".join(f"rank {s.rank} {s.bytes / MIB:.1f} MiB" + (f" (+{s.from_peers / MIB:.1f} MiB from peers)"
                                                                  if s.from_peers else "")
                      + f" in {s.seconds:.2f} s ({_rate(s.bytes, s.seconds)})" for s in stats)
    return f"{verb} {total / MIB:.1f} MiB{where} in {seconds:.2f} s ({_rate(total, seconds)}) [{ranks}]"
