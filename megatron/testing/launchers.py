"""Start ``pretrain_gpt.py`` the way users do: under ``torchrun``, or the way the ``deepspeed``
launcher does (its per-rank environment and a ``--local_rank=N`` argument before the
script's own flags, as deepspeed/launcher/launch.py passes them), for tests on one machine."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "pretrain_gpt.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())


def deepspeed_style(nproc: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """One process per rank with the variables the deepspeed launcher sets on a single node."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_SIZE=str(nproc),
                   CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-u", str(REPO / "pretrain_gpt.py"), f"--local_rank={rank}", *argv]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env=env))
    outs = [p.communicate(timeout=timeout) for p in procs]
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(procs[0].args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs))


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env
