"""Faults through the real launcher: one-line errors once per job, and a full disk during a save."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.test_reliability import TP2, _listing, _resume, trained  # noqa: F401 (fixture)

pytestmark = pytest.mark.faults


@pytest.fixture()
def ckpt(trained, tmp_path) -> str:
    return shutil.copytree(trained[0], str(tmp_path / "C"))


def _pretrain_cli(*argv: str, world: int = 2, limit: int | None = None):
    import subprocess
    import sys

    def preexec():
        if limit is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port),
           "pretrain_gpt.py", *TP2, *argv]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, preexec_fn=preexec, cwd=root)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _our_traceback(stderr: str) -> bool:
    """torchrun prints its own ChildFailedError traceback for a non-zero exit; ours must not appear."""
    return "megatron/" in stderr or "pretrain_gpt.py\", line" in stderr


def test_cli_prints_a_checkpoint_error_once_per_job_without_traceback(ckpt) -> None:
    result = _pretrain_cli("--train-iters", "5", "--load", ckpt + "_typo")
    assert result.returncode != 0
    assert len(_error_lines(result.stderr)) == 1 and not _our_traceback(result.stderr), result.stderr[-3000:]
    assert "does not exist: check the path for a typo" in _error_lines(result.stderr)[0]
    debug = _pretrain_cli("--train-iters", "5", "--load", ckpt + "_typo", "--debug")
    assert _our_traceback(debug.stderr)


def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(ckpt) -> None:
    before = _listing(os.path.join(ckpt, "global_step4"))
    size = os.path.getsize(os.path.join(ckpt, "global_step4", "rank_00000.safetensors"))
    result = _pretrain_cli("--train-iters", "8", "--exit-interval", "6", "--load", ckpt, "--save", ckpt, "--save-interval", "1",
                           limit=size // 2)
    assert result.returncode != 0 and not _our_traceback(result.stderr), result.stderr[-3000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and "no space left" in lines[0] and "global_step5" in lines[0], result.stderr[-3000:]
    assert open(os.path.join(ckpt, "latest")).read() == "global_step4"
    assert _listing(os.path.join(ckpt, "global_step4")) == before
    assert not os.path.exists(os.path.join(ckpt, ".global_step5.tmp"))
    assert len(_resume(ckpt)) == 1
