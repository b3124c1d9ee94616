"""Checkpoint I/O side by side: the copy limit, the converter, loads on other layouts, saves.

    python benchmarks/checkpoint_io.py [--params 20M] [--workdir /tmp/ckpt_io_bench] [--workers 1,2,4]
    python benchmarks/checkpoint_io.py --params 250M        # the issue's size (fp32 master + Adam)

1. trains one step of a GPT of about --params parameters and saves it at TP2 DP2 ZeRO-1
   (4 ranks) and at TP1 DP2 ZeRO-1 (2 ranks);
2. times `cat` of the TP2 DP2 checkpoint's files and `cp -r` + sync of its folder (the limit);
3. converts it to universal with 1, 2, 4 workers (streaming, peak RSS of the converter
   process), and with torchrun over 2 ranks; DeepSpeed's ds_to_universal on a DeepSpeed ZeRO-1 DP2
   save of the same model where deepspeed is installed (DS_ACCELERATOR=cpu DS_BUILD_OPS=0); the same
   for a --bf16 TP1 DP2 checkpoint;
4. loads TP2 DP2 -> TP2 DP2 (same layout), -> TP1 DP4, TP1 DP2 -> TP1 DP2 (same),
   -> TP4 (planned and per-rank reads), -> DP1, -> ZeRO-3 DP2, and DeepSpeed's engine.load_checkpoint
   of its own DP2 save (against our same-layout TP1 DP2 load), and reports seconds against the
   same-layout load of the source and of the target layout (a checkpoint saved in the target
   layout, loaded there: the resume a resharded load replaces), bytes read in all against the checkpoint's, the largest rank's reads
   against an equal share, bytes sent between ranks, and peak RSS (--loads-only: just these);
5. times a synchronous save of the TP2 DP2 state and torch.distributed.checkpoint.save of the same
   tensors (twice each, interleaved), two --async-save saves with the optimizer update right
   after each (nothing hides the background copy) and one followed by a training step (what
   the step waits for), and two DCP async_save saves: blocking and total.

Before every timed read the checkpoint files' pages are dropped from the page cache with
posix_fadvise(DONTNEED) (only those files: the machine is shared, so the global cache is
left alone). Peak RSS of a rank includes torch and the model (the same in every row). The
machine may be shared: each row shows the 1-minute load average when it finished.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = float(1 << 20)


def model_args(params: float) -> list[str]:
    """A GPT shape of about ``params`` parameters (tied embeddings): 12 L h^2 + V h."""
    layers, vocab = (4, 8192) if params < 100e6 else (12, 50257)
    hidden = (-vocab + math.sqrt(vocab ** 2 + 48 * layers * params)) / (24 * layers)
    hidden = max(256, int(round(hidden / 256)) * 256)  # heads of 64: a multiple of 4, for the TP4 load
    return (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads {hidden // 64} --seq-length 32 "
            f"--micro-batch-size 1 --global-batch-size 4 --mock-data --vocab-size {vocab} --hidden-dropout 0 "
            f"--attention-dropout 0 --log-interval 1 --zero-stage 1").split()


def parse_params(text: str) -> float:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1].upper(), 1)
    return float(text[:-1] if scale != 1 else text) * scale


def drop_cache(folder: str) -> None:
    """Evict the folder's files from the page cache (they are clean after the save's fsync)."""
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*")) if os.path.isfile(p))


def _load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_and_save(rank: int, world: int, argv: list[str]) -> None:
    from megatron.training import pretrain
    pretrain(argv)


def _load(rank: int, world: int, argv: list[str], folder: str, exchange: bool) -> dict:
    """Build the target layout, then load the checkpoint into it (planned, or per rank): seconds,
    bytes read from storage and received from other ranks, bytes the rank's fragments hold."""
    from megatron.checkpointing import load_checkpoint
    from megatron.checkpointing.reader import STATES
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    loaded = load_checkpoint(folder, trainer.model, trainer.optimizer, trainer.topo, exchange=exchange)
    needed = sum(f.end - f.start for f in trainer.optimizer.fragments()) * len(STATES) * 4
    return {"seconds": loaded.seconds, "read": loaded.bytes_read, "from_peers": loaded.from_peers,
            "needed": needed, "total": loaded.total_bytes, "rss": _peak_rss_mib()}


LOADS = [  # (row, source, world, flags, planned, target); a row's source is loaded on its own layout first
    ("TP2 DP2 -> TP2 DP2 (same layout)", "tp2dp2", 4, ["--tensor-model-parallel-size", "2"], True, None),
    ("TP2 DP2 -> TP1 DP4", "tp2dp2", 4, ["--tensor-model-parallel-size", "1"], True, "TP1 DP4"),
    ("TP1 DP2 -> TP1 DP2 (same layout)", "tp1dp2", 2, [], True, None),
    ("TP1 DP2 -> TP4", "tp1dp2", 4, ["--tensor-model-parallel-size", "4"], True, "TP4"),
    ("TP1 DP2 -> TP4, per-rank reads (no exchange)", "tp1dp2", 4, ["--tensor-model-parallel-size", "4"], False, "TP4"),
    ("TP1 DP2 -> DP1 (one process: per-rank path)", "tp1dp2", 1, [], True, "DP1"),
    ("TP1 DP2 ZeRO-1 -> ZeRO-3 DP2", "tp1dp2", 2, ["--zero-stage", "3"], True, "ZeRO-3 DP2"),
]


def _timed_load(folder: str, world: int, argv: list[str], planned: bool) -> list[dict]:
    drop_cache(folder)
    return run_distributed(_load, world, argv + ["--train-iters", "1"], folder, planned, timeout=3600)


def _resave(rank: int, world: int, argv: list[str], source: str) -> str:
    """Load ``source`` into the layout of ``argv`` and save it there (no training step: the
    memory of a step of a big model on 4 ranks is not needed to get the same state)."""
    from megatron.checkpointing import load_checkpoint
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    load_checkpoint(source, trainer.model, trainer.optimizer, trainer.topo)
    trainer.state.iteration = 1
    trainer.save()
    return os.path.join(trainer.args.save, "global_step1")


def _target_reference(workdir: str, model: list[str], target: str, world: int, flags: list[str],
                      source: str) -> tuple[str, float]:
    """``source`` saved again in a resharded load's target layout and loaded there: the resume
    the resharding is compared with (it pays the target layout's own costs, e.g. gathering the
    whole model over DP4). Returns (row name, seconds)."""
    folder = os.path.join(workdir, "target_" + target.replace(" ", "_"))
    saved = run_distributed(_resave, world, model + flags + ["--train-iters", "1", "--save", folder], source,
                            timeout=3600)[0]
    stats = _timed_load(saved, world, model + flags, True)
    shutil.rmtree(folder)
    return f"{target} -> {target} (target's same layout)", max(s["seconds"] for s in stats)


def load_rows(folders: dict[str, str], model: list[str], workdir: str) -> list[tuple[str, ...]]:
    """One row per load of LOADS: seconds against the same-layout load of its source and (for a
    resharded load) of its target layout; bytes read from storage against the checkpoint (every
    byte is needed once), the largest rank's reads against an equal share, bytes sent between
    ranks, and per rank reads against its own needs."""
    rows, same, targets = [], {}, {}
    for name, source, world, flags, planned, target in LOADS:
        folder = os.path.join(folders[source], "global_step1")
        stats = _timed_load(folder, world, model + flags, planned)
        seconds = max(s["seconds"] for s in stats)
        same.setdefault(source, seconds)
        ratio = f"{seconds / same[source]:.2f} x same layout"
        if target is not None:
            if target not in targets:
                targets[target] = _target_reference(workdir, model, target, world, flags, folder)
                rows.append((f"load {targets[target][0]}", f"{targets[target][1]:.2f}", "", "", _load_average()))
            ratio += f", {seconds / targets[target][1]:.2f} x target's"
        read, total = sum(s["read"] for s in stats), stats[0]["total"]
        share = max(s["read"] for s in stats) / (read / world)
        per_rank = ", ".join(f"{s['read'] / s['needed']:.2f}x" for s in stats)
        rows.append((f"load {name}", f"{seconds:.2f}", ratio,
                     f"read {read / MIB:.0f} MiB for {total / MIB:.0f} MiB needed ({read / total:.3f}x); max rank "
                     f"{share:.2f}x its share; {sum(s['from_peers'] for s in stats) / MIB:.0f} MiB from other ranks; "
                     f"per rank read / own needs {per_rank}; RSS {max(s['rss'] for s in stats):.0f} MiB",
                     _load_average()))
    return rows


def _save(rank: int, world: int, argv: list[str]) -> dict:
    """The same state saved by us synchronously, by torch.distributed.checkpoint.save, then twice
    with --async-save and twice with DCP's async_save: seconds blocked (the call, waiting for a
    previous save included) and until committed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from megatron.checkpointing import AsyncSaver
    from megatron.checkpointing.save import capture_rank_state
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    out = {}

    def timed_call(key: str, call) -> object:
        dist.barrier()
        start = time.perf_counter()
        result = call()
        out[key] = time.perf_counter() - start
        return result

    # DCP gets this rank's fragments under rank-unique keys: every rank writes its own, as ours do.
    rs = capture_rank_state(trainer.model, trainer.optimizer, trainer.topo)
    state = {f"rank{rank}/{key}": t for (key, _), t in zip(rs.entries, rs.tensors)}
    dcp_dir = os.path.join(trainer.args.save, "dcp")
    # Twice each, interleaved (the rows take the faster): the run's first big write, whichever
    # it is, also pays for the kernel reclaiming page cache (here 5.0 s, then 2.7 s, for both).
    for i in (1, 2):
        trainer.state.iteration = 100 + i
        timed_call(f"sync{i}", trainer.save)
        timed_call(f"dcp{i}", lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(dcp_dir, overwrite=True)))
    dist.barrier()
    out["sync_rss"] = _peak_rss_mib()
    saver = AsyncSaver(trainer.topo, trainer.device, trainer.log)
    saver.prepare(trainer.model, trainer.optimizer)  # as training does when it starts
    saver.wait_prepared()
    out["prepare"] = saver.prepare_seconds
    for i in (1, 2):  # the worst case: the optimizer step comes at once, so nothing hides the copy
        trainer.state.iteration = i
        start = time.perf_counter()
        timed_call(f"async_blocked{i}", lambda: (saver.save(trainer.args.save, trainer._global_state(), trainer.model,
                                                            trainer.optimizer), trainer.optimizer.wait_before_update()))
        saver.wait()
        dist.barrier()
        out[f"async_total{i}"] = time.perf_counter() - start
    # As in training: a step follows the save, and its optimizer update waits for what is left of the copy.
    trainer.state.iteration = 3
    timed_call("async_call", lambda: saver.save(trainer.args.save, trainer._global_state(), trainer.model,
                                                trainer.optimizer))
    timed_call("async_step", trainer.train_step)
    out["async_fence"] = saver.fence_seconds
    saver.wait()
    saver.close()
    out["async_rss"] = _peak_rss_mib()
    import torch
    # DCP reuses its staging buffers only as pinned memory, which needs CUDA.
    out["dcp_cached"] = torch.cuda.is_available()
    writer = dcp.FileSystemWriter(dcp_dir, cache_staged_state_dict=out["dcp_cached"], overwrite=True)
    for i in (1, 2):
        start = time.perf_counter()
        future = timed_call(f"dcp_async_blocked{i}", lambda: dcp.async_save(state, storage_writer=writer))
        (future.upload_completion if hasattr(future, "upload_completion") else future).result()
        dist.barrier()
        out[f"dcp_async_total{i}"] = time.perf_counter() - start
    return out


def save_rows(saves: list[dict]) -> list[tuple[str, str, str, str]]:
    """Rows of ``_save``: every figure is the slowest rank's."""
    def slowest(key: str) -> float:
        return max(s[key] for s in saves)

    sync, dcp = min(slowest("sync1"), slowest("sync2")), min(slowest("dcp1"), slowest("dcp2"))
    rows = [("save TP2 DP2, synchronous (blocks; faster of 2, interleaved with DCP's)", f"{sync:.2f}", "1.00 x sync",
             f"RSS {max(s['sync_rss'] for s in saves):.0f} MiB; "
             f"the other {max(slowest('sync1'), slowest('sync2')):.2f} s"),
            ("save TP2 DP2, torch.distributed.checkpoint.save of the same tensors (blocks; faster of 2)", f"{dcp:.2f}",
             f"{dcp / sync:.2f} x sync", f"the other {max(slowest('dcp1'), slowest('dcp2')):.2f} s")]
    for i, which in ((1, "first save (host buffer prepared in the background at start-up, "
                         f"{slowest('prepare'):.2f} s)"), (2, "second save")):
        blocked = slowest(f"async_blocked{i}")
        rows.append((f"save TP2 DP2, --async-save, {which}: blocks (the call and an update at once after it)",
                     f"{blocked:.3f}", f"{blocked / sync:.3f} x sync",
                     f"{blocked / dcp:.3f} x DCP save"))
        rows.append((f"save TP2 DP2, --async-save, {which}: until committed", f"{slowest(f'async_total{i}'):.2f}",
                     f"{slowest(f'async_total{i}') / sync:.2f} x sync",
                     f"RSS {max(s['async_rss'] for s in saves):.0f} MiB (host copy of the state)" if i == 2 else ""))
    step_blocked = max(s["async_call"] + s["async_fence"] for s in saves)
    rows.append(("save TP2 DP2, --async-save, third save, a training step after it: the step blocked (the call, "
                 "and its update waiting for the copy)", f"{step_blocked:.3f}", f"{step_blocked / sync:.3f} x sync",
                 f"{step_blocked / dcp:.3f} x DCP save; the step took {slowest('async_step'):.2f} s"))
    for i in (1, 2):
        blocked = slowest(f"dcp_async_blocked{i}")
        staging = "staging cached" if saves[0]["dcp_cached"] else "staging not cached: that needs CUDA"
        rows.append((f"save TP2 DP2, DCP async_save (thread, {staging}), save {i}: blocks", f"{blocked:.3f}",
                     f"{blocked / sync:.3f} x sync", f"until done {slowest(f'dcp_async_total{i}'):.2f} s"))
    return rows


# Runs the command as its child and reports that child's peak RSS: a process forked from this
# one (which holds torch and more) would count this process's RSS as its own until its exec.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one child process (its largest process where it starts others)."""
    fd, report = tempfile.mkstemp(suffix=".maxrss")
    os.close(fd)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report, *cmd], stdout=subprocess.DEVNULL,
                          env=env).returncode
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}")
    with open(report) as f:
        rss = int(f.read()) / 1024
    os.remove(report)
    return seconds, rss


def convert_rows(native: str, label: str, workers: list[int], cp_s: float) -> list[tuple[str, str, str, str]]:
    """Our converter on ``native`` with each worker count and under torchrun (2 ranks)."""
    tool = os.path.join(REPO, "tools", "convert_to_universal.py")
    runs = [(f"{w} workers", [sys.executable, tool], w) for w in workers]
    runs.append(("torchrun 2 ranks", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", "29533", tool], 2))
    rows = []
    for what, prefix, w in runs:
        output = native + "_universal_bench"
        drop_cache(native)
        seconds, rss = timed(prefix + ["--input_folder", native, "--output_folder", output, "--num_workers", str(w),
                                       "--no-progress"])
        rows.append((f"convert_to_universal {label}, {what}", f"{seconds:.2f}", f"{seconds / cp_s:.2f}",
                     f"peak RSS {rss:.0f} MiB"))
        shutil.rmtree(output)
    return rows


DEEPSPEED_ZERO1 = {"zero_optimization": {"stage": 1}}


def deepspeed_save(workdir: str, model: list[str]) -> tuple[str | None, str]:
    """A DeepSpeed ZeRO-1 DP2 save of the same model: (its folder, "") or (None, why not)."""
    if importlib.util.find_spec("deepspeed") is None:
        return None, "deepspeed is not installed: not run"
    from megatron.testing.deepspeed_engine import deepspeed_checkpoint

    os.environ.update(DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    folder = os.path.join(workdir, "deepspeed_dp2")
    try:
        deepspeed_checkpoint(folder, 2, model + ["--train-iters", "1"], DEEPSPEED_ZERO1, 1, 1)
    except RuntimeError as e:  # e.g. its training step killed for memory on a shared machine: keep the other rows
        shutil.rmtree(folder, ignore_errors=True)
        return None, f"not run: {str(e).splitlines()[0][:200]}"
    for extra in glob.glob(os.path.join(folder, "global_step1", "expected_fp32_*")):
        os.remove(extra)  # the test helper's reference copy, not part of DeepSpeed's checkpoint
    return folder, ""


def _deepspeed_load(rank: int, world: int, argv: list[str], folder: str) -> float:
    """Seconds this rank's DeepSpeed engine takes to load its own ZeRO-1 save (weights and optimizer)."""
    from megatron.testing.deepspeed_engine import build_for_deepspeed, deepspeed_engine

    import torch.distributed

    engine = deepspeed_engine(build_for_deepspeed(rank, world, argv), DEEPSPEED_ZERO1)
    torch.distributed.barrier()
    start = time.perf_counter()
    engine.load_checkpoint(folder, tag="global_step1")
    return time.perf_counter() - start


def deepspeed_load_row(deepspeed: tuple[str | None, str], model: list[str], ours: float) -> tuple[str, ...]:
    """DeepSpeed's normal load of its DP2 save against our same-layout TP1 DP2 load (``ours`` s)."""
    folder, why_not = deepspeed
    if folder is None:
        return ("load DeepSpeed DP2 -> DP2 (engine.load_checkpoint)", "-", "-", why_not, _load_average())
    tag = os.path.join(folder, "global_step1")
    drop_cache(tag)
    try:
        seconds = max(run_distributed(_deepspeed_load, 2, model + ["--train-iters", "1"], folder, timeout=3600))
    except RuntimeError as e:  # as in deepspeed_save: keep the other rows
        return ("load DeepSpeed DP2 -> DP2 (engine.load_checkpoint)", "-", "-",
                f"not run: {str(e).splitlines()[0][:200]}", _load_average())
    return ("load DeepSpeed DP2 -> DP2 (engine.load_checkpoint)", f"{seconds:.2f}",
            f"ours same layout {ours / seconds:.2f} x DeepSpeed", f"input {folder_bytes(tag) / MIB:.0f} MiB",
            _load_average())


def ds_to_universal_row(deepspeed: tuple[str | None, str], ours: float, cp_s: float) -> tuple[str, str, str, str]:
    """DeepSpeed's own converter on its ZeRO-1 DP2 save of the same model."""
    folder, why_not = deepspeed
    if folder is None:
        return ("ds_to_universal (DeepSpeed)", "-", "-", why_not)
    tag = os.path.join(folder, "global_step1")
    drop_cache(tag)
    script = os.path.join(os.path.dirname(importlib.util.find_spec("deepspeed").origin), "checkpoint",
                          "ds_to_universal.py")
    output = os.path.join(folder, "universal")
    seconds, rss = timed([sys.executable, script, "--input_folder", tag, "--output_folder", output,
                          "--num_extract_workers", "2", "--num_merge_workers", "2", "--inject_missing_state"],
                         env=dict(os.environ))
    subprocess.run(["sync"], check=True)
    written = sum(os.path.getsize(p) for p in glob.glob(os.path.join(output, "**", "*"), recursive=True)
                  if os.path.isfile(p))
    row = ("ds_to_universal (DeepSpeed 2+2 workers) on its DP2 save", f"{seconds:.2f}", f"{seconds / cp_s:.2f}",
           f"input {folder_bytes(tag) / MIB:.0f} MiB, wrote {written / MIB:.0f} MiB, peak RSS (largest process) "
           f"{rss:.0f} MiB; ours {seconds / ours:.2f}x faster")
    shutil.rmtree(output)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="20M", help="model size, e.g. 20M (default, ~2 min here) or 250M")
    p.add_argument("--workdir", default="/tmp/ckpt_io_bench")
    p.add_argument("--workers", default="1,2,4", help="converter worker counts to time")
    p.add_argument("--loads-only", action="store_true", help="save the two checkpoints and time only the loads")
    a = p.parse_args()
    model = model_args(parse_params(a.params))
    shutil.rmtree(a.workdir, ignore_errors=True)
    tp2dp2, tp1dp2 = os.path.join(a.workdir, "tp2dp2"), os.path.join(a.workdir, "tp1dp2")
    one_step = ["--train-iters", "1"]
    run_distributed(_train_and_save, 4, model + one_step + ["--tensor-model-parallel-size", "2", "--save", tp2dp2],
                    timeout=3600)
    run_distributed(_train_and_save, 2, model + one_step + ["--save", tp1dp2], timeout=3600)
    native = os.path.join(tp2dp2, "global_step1")
    size = folder_bytes(native)
    rows: list[tuple[str, ...]] = []  # operation, seconds, ratio to cp, memory / bytes, load average
    deepspeed = deepspeed_save(a.workdir, model)
    if a.loads_only:
        loads = load_rows({"tp2dp2": tp2dp2, "tp1dp2": tp1dp2}, model, a.workdir)
        _print_table(a, model, size, loads + [deepspeed_load_row(deepspeed, model, _same_layout_tp1dp2(loads))])
        return

    drop_cache(native)
    cat_s, cat_rss = timed(["cat", *sorted(glob.glob(os.path.join(native, "*")))])
    drop_cache(native)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", native, native + "_copy"], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - start
    shutil.rmtree(native + "_copy")
    rows.append(("cat TP2 DP2 files > /dev/null", f"{cat_s:.2f}", f"{cat_s / cp_s:.2f}", f"RSS {cat_rss:.0f} MiB",
                 _load_average()))
    rows.append(("cp -r + sync", f"{cp_s:.2f}", "1.00", "", _load_average()))
    converts = convert_rows(native, "TP2 DP2", [int(w) for w in a.workers.split(",")], cp_s)
    rows += [r + (_load_average(),) for r in converts]
    # The case: fp32 ZeRO-1 DP2 (TP1), against DeepSpeed's converter on the same model.
    dp2 = os.path.join(tp1dp2, "global_step1")
    drop_cache(dp2)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", dp2, dp2 + "_copy"], check=True)
    subprocess.run(["sync"], check=True)
    cp_dp2 = time.perf_counter() - start
    shutil.rmtree(dp2 + "_copy")
    rows.append(("cp -r + sync, TP1 DP2", f"{cp_dp2:.2f}", f"{cp_dp2 / cp_s:.2f}", f"{folder_bytes(dp2) / MIB:.0f} MiB",
                 _load_average()))
    dp2_rows = convert_rows(dp2, "TP1 DP2", [2, 4], cp_dp2)
    rows += [(n, s, f"{r} x cp TP1 DP2", m, _load_average()) for n, s, r, m in dp2_rows]
    rows.append(ds_to_universal_row(deepspeed, min(float(r[1]) for r in dp2_rows), cp_dp2) + (_load_average(),))
    bf16 = os.path.join(a.workdir, "bf16_tp1dp2")
    run_distributed(_train_and_save, 2, model + one_step + ["--bf16", "--save", bf16], timeout=3600)
    bf16_native = os.path.join(bf16, "global_step1")
    rows += [(n, s, f"{r} x cp TP1 DP2", m, _load_average())
             for n, s, r, m in convert_rows(bf16_native, "--bf16 TP1 DP2", [2], cp_dp2)]
    shutil.rmtree(bf16)

    loads = load_rows({"tp2dp2": tp2dp2, "tp1dp2": tp1dp2}, model, a.workdir)
    rows += loads + [deepspeed_load_row(deepspeed, model, _same_layout_tp1dp2(loads))]

    save_dir = os.path.join(a.workdir, "saves")
    saves = run_distributed(_save, 4, model + ["--tensor-model-parallel-size", "2", "--train-iters", "1",
                                               "--save", save_dir], timeout=3600)
    rows += [r + (_load_average(),) for r in save_rows(saves)]

    _print_table(a, model, size, rows)


def _same_layout_tp1dp2(loads: list[tuple[str, ...]]) -> float:
    return next(float(r[1]) for r in loads if r[0] == "load TP1 DP2 -> TP1 DP2 (same layout)")


def _print_table(a: argparse.Namespace, model: list[str], size: int, rows: list[tuple[str, ...]]) -> None:
    print(f"\n{a.params} parameters ({' '.join(model[:6])}), fp32 master + Adam; TP2 DP2 ZeRO-1 checkpoint "
          f"{size / MIB:.0f} MiB; cache of the checkpoint's files dropped before each read\n")
    print(f"command: python {' '.join(sys.argv)}; {os.cpu_count()} CPUs\n")
    print("| operation | seconds | ratio | memory / bytes | load avg |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
