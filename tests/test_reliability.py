"""Reliability regressions: nothing lost or silently wrong on bad folders, hostile files and crashes.

One TP=2 checkpoint folder C (steps 2 and 4, plus step 4 converted) is trained once per module;
each test works on its own copy.
"""
from __future__ import annotations

import os
import shutil
import struct

import pytest

from megatron.checkpointing import CheckpointError, CheckpointReader, convert_to_universal, resolve_checkpoint
from megatron.checkpointing import commit
from megatron.checkpointing.inspect import describe_checkpoint
from megatron.checkpointing.locate import ALWAYS, IF_NEW, NEVER
from megatron.testing.tamper import read_header, reseal, write_file_with_header
from megatron.testing.training import TINY_GPT, train_losses

ITERS = 4
TP2 = TINY_GPT + ["--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, list[float]]:
    folder = str(tmp_path_factory.mktemp("C") / "C")
    losses = train_losses(2, TP2 + ["--train-iters", str(2 * ITERS), "--exit-interval", str(ITERS),
                                    "--save", folder, "--save-interval", "2"])
    convert_to_universal(os.path.join(folder, f"global_step{ITERS}"),
                         os.path.join(folder, f"global_step{ITERS}_universal"), num_workers=1, progress=False)
    return folder, losses


@pytest.fixture()
def ckpt(trained, tmp_path) -> str:
    """A private copy of C."""
    return shutil.copytree(trained[0], str(tmp_path / "C"))


def _listing(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def _resume(folder: str, *extra: str) -> list[float]:
    """One more iteration from the checkpoint, on one rank (the schedule of the saving run)."""
    return train_losses(1, TP2[:-2] + ["--train-iters", str(2 * ITERS), "--exit-interval", str(ITERS + 1),
                                       "--load", folder, *extra])


# --- defect 1: the converter never replaces or deletes a checkpoint --------------------------------

@pytest.mark.parametrize("target", ["C", "C/global_step4", "C/global_step2", "C/global_step4_universal",
                                    "C/global_step4/sub", ".."], ids=lambda t: t.replace("/", "_"))
def test_converter_refuses_an_output_that_would_replace_a_checkpoint(ckpt, target) -> None:
    before = _listing(ckpt)
    output = os.path.normpath(os.path.join(os.path.dirname(ckpt), target)) if target != ".." else \
        os.path.dirname(ckpt)
    with pytest.raises(CheckpointError, match="--output_folder"):
        convert_to_universal(os.path.join(ckpt, "global_step4"), output, num_workers=1, progress=False)
    assert _listing(ckpt) == before


def test_converter_overwrites_only_a_universal_checkpoint_and_only_when_asked(ckpt) -> None:
    out = os.path.join(ckpt, "global_step4_universal")
    with pytest.raises(CheckpointError, match="pass --overwrite"):
        convert_to_universal(os.path.join(ckpt, "global_step2"), out, num_workers=1, progress=False)
    convert_to_universal(os.path.join(ckpt, "global_step2"), out, num_workers=1, progress=False, overwrite=True)
    assert CheckpointReader(out).manifest["state"]["iteration"] == 2
    native_elsewhere = shutil.copytree(os.path.join(ckpt, "global_step2"), ckpt + "_elsewhere")
    with pytest.raises(CheckpointError, match="already holds a native checkpoint"):
        convert_to_universal(os.path.join(ckpt, "global_step4"), native_elsewhere, num_workers=1, progress=False,
                             overwrite=True)


def test_converter_refuses_a_folder_with_user_files(ckpt, tmp_path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "paper.tex").write_text("weeks of work")
    with pytest.raises(CheckpointError, match="paper.tex"):
        convert_to_universal(os.path.join(ckpt, "global_step4"), str(out), num_workers=1, progress=False)
    assert (out / "paper.tex").read_text() == "weeks of work"


def test_converter_cli_refuses_the_save_folder_with_one_line(ckpt, capsys) -> None:
    from tools.convert_to_universal import main

    assert main(["--input_folder", os.path.join(ckpt, "global_step4"), "--output_folder", ckpt,
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output_folder") and "\n" not in err
    assert os.path.isdir(os.path.join(ckpt, "global_step2")) and os.path.isfile(os.path.join(ckpt, "latest"))


# --- defect 2: safetensors headers are bounds-checked before any read -----------------------------

def _tamper_header(folder: str, file: str, edit) -> None:
    path = os.path.join(folder, file)
    header, data = read_header(path)
    edit(header)
    write_file_with_header(path, header, data)
    reseal(folder)


def _first_key(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _last_key(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _past_end(h: dict) -> None:
    e = h[_last_key(h)]
    e["data_offsets"][1] += 4000
    e["shape"] = [(e["data_offsets"][1] - e["data_offsets"][0]) // 4]


def _overlap(h: dict) -> None:
    e = h[_last_key(h)]
    e["data_offsets"][0] -= 4
    e["shape"] = [(e["data_offsets"][1] - e["data_offsets"][0]) // 4]


def _wrong_shape(h: dict) -> None:
    h[_first_key(h)]["shape"] = [h[_first_key(h)]["shape"][0] + 1]


def _negative(h: dict) -> None:
    h[_first_key(h)]["data_offsets"] = [-8, h[_first_key(h)]["data_offsets"][1]]


def _dtype(h: dict) -> None:
    h[_first_key(h)]["dtype"] = "Q99"


@pytest.mark.parametrize("edit,match", [(_past_end, "outside the data area"), (_overlap, "overlap"),
                                        (_wrong_shape, "needs"), (_negative, "outside the data area"),
                                        (_dtype, "unknown dtype")],
                         ids=["past-end", "overlap", "shape-vs-span", "negative", "dtype"])
def test_hostile_safetensors_header_is_refused_naming_the_file(ckpt, edit, match) -> None:
    step = os.path.join(ckpt, "global_step4")
    _tamper_header(step, "rank_00001.safetensors", edit)
    with pytest.raises(CheckpointError, match=f"rank_00001.safetensors: invalid safetensors header.*{match}"):
        describe_checkpoint(step)
    with pytest.raises(CheckpointError, match="rank_00001.safetensors"):
        convert_to_universal(step, step + "_u2", num_workers=1, progress=False)
    with pytest.raises(RuntimeError, match="rank_00001.safetensors: invalid safetensors header"):
        _resume(ckpt)


def test_header_length_past_the_file_is_refused(ckpt) -> None:
    step = os.path.join(ckpt, "global_step4")
    path = os.path.join(step, "rank_00000.safetensors")
    data = bytearray(open(path, "rb").read())
    data[:8] = struct.pack("<Q", len(data) * 4)
    open(path, "wb").write(bytes(data))
    reseal(step)
    with pytest.raises(CheckpointError, match="header length .* does not fit"):
        describe_checkpoint(step)


# --- defect 5: re-saving an existing step never leaves it without a complete copy ----------------

def test_crash_between_the_two_renames_of_a_resave_still_resumes(ckpt, trained) -> None:
    """The state a SIGKILL leaves between ``final -> final.old`` and ``tmp -> final``."""
    step = os.path.join(ckpt, "global_step4")
    os.replace(step, step + ".old")
    os.makedirs(os.path.join(ckpt, ".global_step4.tmp"))  # the new copy, unfinished
    assert resolve_checkpoint(ckpt, universal=False) == step + ".old"
    losses = _resume(ckpt, "--save", ckpt)
    assert losses == _resume(trained[0])  # the same as resuming from the intact original
    assert os.path.isfile(os.path.join(step, "manifest.json")) and not os.path.exists(step + ".old")


def test_resave_of_an_existing_step_is_never_missing(ckpt, monkeypatch) -> None:
    """Make the second rename of commit_folder fail: the old copy must still be found."""
    step = os.path.join(ckpt, "global_step4")
    tmp = shutil.copytree(step, os.path.join(ckpt, ".global_step4.tmp"))
    real_replace = os.replace

    def dying_replace(src, dst):
        if src == tmp:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(commit.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        commit.commit_folder(tmp, step)
    monkeypatch.undo()
    assert resolve_checkpoint(ckpt, universal=False) == step + ".old"
    assert commit.recover_interrupted_commits(ckpt) == ["global_step4"]
    assert resolve_checkpoint(ckpt, universal=False) == step


# --- defect 7: no silent restart from scratch ---------------------------------------------------

def test_missing_or_mistyped_load_folder_is_an_error(ckpt) -> None:
    with pytest.raises(CheckpointError, match="does not exist: check the path for a typo"):
        resolve_checkpoint(ckpt + "_typo", universal=False)
    with pytest.raises(RuntimeError, match="does not exist: check the path for a typo"):
        _resume(ckpt + "_typo")


def test_load_naming_a_file_is_an_error(ckpt) -> None:
    with pytest.raises(CheckpointError, match="is a file, expected a checkpoint folder"):
        resolve_checkpoint(os.path.join(ckpt, "latest"), universal=False, start_fresh=ALWAYS)


def test_deleted_latest_is_an_error_naming_the_newest_step(ckpt) -> None:
    os.remove(os.path.join(ckpt, "latest"))
    with pytest.raises(CheckpointError, match="pass --load-tag global_step4"):
        resolve_checkpoint(ckpt, universal=False, start_fresh=IF_NEW)
    assert resolve_checkpoint(ckpt, universal=False, tag="global_step4") == os.path.join(ckpt, "global_step4")


def test_latest_naming_a_missing_folder_is_an_error(ckpt) -> None:
    open(os.path.join(ckpt, "latest"), "w").write("global_step99")
    with pytest.raises(CheckpointError, match="names global_step99, which does not exist"):
        resolve_checkpoint(ckpt, universal=False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"", b"../../etc", b"/abs/path"],
                         ids=["non-utf8", "empty", "dotdot", "absolute"])
def test_corrupted_latest_is_an_error(ckpt, content) -> None:
    open(os.path.join(ckpt, "latest"), "wb").write(content)
    with pytest.raises(CheckpointError, match="latest is corrupted"):
        resolve_checkpoint(ckpt, universal=False)


def test_latest_that_is_a_directory_is_an_error(ckpt) -> None:
    os.remove(os.path.join(ckpt, "latest"))
    os.mkdir(os.path.join(ckpt, "latest"))
    with pytest.raises(CheckpointError, match="latest is a directory"):
        resolve_checkpoint(ckpt, universal=False)


def test_universal_only_folder_asks_for_the_flag_and_native_refuses_it(ckpt, tmp_path) -> None:
    only_universal = tmp_path / "U"
    only_universal.mkdir()
    shutil.copytree(os.path.join(ckpt, "global_step4_universal"), only_universal / "global_step4_universal")
    shutil.copy(os.path.join(ckpt, "latest_universal"), only_universal)
    with pytest.raises(CheckpointError, match="add --universal-checkpoint"):
        resolve_checkpoint(str(only_universal), universal=False)
    with pytest.raises(RuntimeError, match="is a universal checkpoint: add --universal-checkpoint"):
        _resume(os.path.join(ckpt, "global_step4_universal"))
    os.remove(os.path.join(ckpt, "latest_universal"))
    with pytest.raises(CheckpointError, match="pass --load-tag global_step4_universal"):
        resolve_checkpoint(ckpt, universal=True)
    shutil.rmtree(os.path.join(ckpt, "global_step4_universal"))
    with pytest.raises(CheckpointError, match="drop --universal-checkpoint"):
        resolve_checkpoint(ckpt, universal=True)
    with pytest.raises(RuntimeError, match="is a native checkpoint; drop --universal-checkpoint"):
        _resume(os.path.join(ckpt, "global_step4"), "--universal-checkpoint")


def test_empty_folder_starts_fresh_only_as_the_save_folder_of_a_new_run(tmp_path) -> None:
    empty = tmp_path / "new"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint \\(it is empty\\)"):
        resolve_checkpoint(str(empty), universal=False, start_fresh=NEVER)
    assert resolve_checkpoint(str(empty), universal=False, start_fresh=IF_NEW) is None
    assert resolve_checkpoint(str(tmp_path / "missing"), universal=False, start_fresh=IF_NEW) is None
    (empty / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes.txt"):
        resolve_checkpoint(str(empty), universal=False, start_fresh=IF_NEW)
    assert resolve_checkpoint(str(empty), universal=False, start_fresh=ALWAYS) is None


def test_new_run_with_load_equal_to_save_trains_from_scratch_unless_exit_flag(tmp_path) -> None:
    folder = str(tmp_path / "run")
    argv = TP2[:-2] + ["--train-iters", "1", "--load", folder, "--save", folder]
    assert len(train_losses(1, argv)) == 1
    with pytest.raises(RuntimeError, match="does not exist"):
        train_losses(1, argv[:-4] + ["--load", str(tmp_path / "other"), "--save", str(tmp_path / "x"),
                                     "--exit-on-missing-checkpoint"])
    assert len(train_losses(1, argv[:-4] + ["--load", str(tmp_path / "other"), "--allow-missing-checkpoint"])) == 1


def test_save_naming_a_file_is_refused_before_training(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RuntimeError, match="--save .* is a file"):
        train_losses(1, TP2[:-2] + ["--train-iters", "1", "--save", str(f)])


# --- defects 3, 8, 9, 10: the manifest is checksummed and validated ------------------------------

def test_edited_manifest_value_is_refused_by_its_checksum(ckpt) -> None:
    path = os.path.join(ckpt, "global_step4", "manifest.json")
    text = open(path).read()
    assert '"consumed_samples": 32' in text
    open(path, "w").write(text.replace('"consumed_samples": 32', '"consumed_samples": 24'))
    with pytest.raises(CheckpointError, match="manifest.json: checksum: the manifest's content does not match"):
        describe_checkpoint(os.path.join(ckpt, "global_step4"))
    with pytest.raises(RuntimeError, match="does not match its sha256"):
        _resume(ckpt)


def _table_param(table: dict) -> dict:
    params = table["params"]
    return params[sorted(params)[0]]


def _set(path: list, value):
    def edit(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


HOSTILE_MANIFESTS = {
    "list": (lambda m: [m], "expected an object, found list"),
    "missing-key": (lambda m: m.pop("canonical") and None, "missing field"),
    "unknown-field": (_set(["surprise"], 1), "unknown field"),
    "kind": (_set(["kind"], "hybrid"), "kind: expected 'native' or 'universal'"),
    "iteration-type": (_set(["state", "iteration"], "4"), "state.iteration: expected an integer"),
    "block-size-zero": (lambda m: next(iter(m["files"].values())).__setitem__("block_size", 0), "block_size"),
    "absurd-shape": (lambda m: next(iter(m["canonical"].values())).__setitem__("shape", [1 << 30, 1 << 30]),
                     "absurd"),
    "dotdot-file": (lambda m: m["files"].__setitem__("../rank_00000.safetensors",
                                                     m["files"].pop("rank_00000.safetensors")), "plain name"),
    "absolute-file": (lambda m: m["sources"][0].__setitem__("file", "/etc/passwd"), "plain name"),
    "beta2-string": (_set(["param_groups", 0, "beta2"], "0.5"), "finite number"),
    "eps-nan": (_set(["param_groups", 0, "eps"], float("nan")), "finite number"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifest_is_refused_in_one_line_naming_the_file(ckpt, case) -> None:
    from megatron.testing.tamper import edit_manifest

    edit, match = HOSTILE_MANIFESTS[case]
    step = os.path.join(ckpt, "global_step4")
    edit_manifest(step, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        describe_checkpoint(step)
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)


HOSTILE_TABLES = {
    "narrowed-local-shape": (lambda t: _table_param(t).__setitem__(
        "local_shape", [_table_param(t)["local_shape"][0] - 1] + _table_param(t)["local_shape"][1:]), "outside"),
    "overlapping-pieces": (lambda t: _table_param(t)["pieces"].append(dict(_table_param(t)["pieces"][0])),
                           "overlaps pieces"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TABLES))
def test_hostile_rank_table_is_refused_in_one_line_naming_the_file(ckpt, case) -> None:
    """A rank's own table (format 2) with consistent checksums still goes through the schema."""
    from megatron.testing.tamper import edit_rank_table

    edit, match = HOSTILE_TABLES[case]
    step = os.path.join(ckpt, "global_step4")
    edit_rank_table(step, 0, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        describe_checkpoint(step)
    assert "rank_00000.json" in str(info.value) and "\n" not in str(info.value)


# --- NaN / Inf, folder lock, retention, pointers, one-line errors, disk full --------------------

def _poison(folder: str, file: str, key_part: str, value: float) -> str:
    """Write ``value`` into the first element of the first tensor of ``file`` whose key contains
    ``key_part``; returns the key."""
    import numpy as np

    path = os.path.join(folder, file)
    header, data = read_header(path)
    key = sorted(k for k in header if key_part in k and k.endswith("/fp32"))[0]
    start = header[key]["data_offsets"][0]
    data = bytearray(data)
    data[start:start + 4] = np.array([value], dtype=np.float32).tobytes()
    write_file_with_header(path, header, bytes(data))
    reseal(folder)
    return key


def test_nan_in_a_loaded_tensor_is_reported_by_name(ckpt) -> None:
    key = _poison(os.path.join(ckpt, "global_step4"), "rank_00000.safetensors", "weight", float("nan"))
    with pytest.raises(RuntimeError, match=f"{key.split('/')[0]}.*NaN or Inf"):
        _resume(ckpt)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        convert_to_universal(os.path.join(ckpt, "global_step4"), ckpt + "_u", num_workers=1, progress=False)


def test_strict_replica_policy_refuses_a_nan_replica(ckpt) -> None:
    step = os.path.join(ckpt, "global_step4")
    _poison(step, "rank_00001.safetensors", "final_norm", float("nan"))  # TP rank 1 holds a replica
    with pytest.raises(CheckpointError, match="replicas of final_norm.bias \\(fp32\\) disagree by up to inf"):
        convert_to_universal(step, ckpt + "_u", num_workers=1, replica_policy="strict", progress=False)


def _hold_lock(folder: str, ready) -> None:
    from megatron.checkpointing.lock import acquire_folder_lock
    import time

    acquire_folder_lock(folder)
    ready.set()
    time.sleep(600)


def test_second_job_refuses_a_locked_folder_and_takes_over_a_dead_jobs_lock(ckpt) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(ckpt, ready))
    holder.start()
    try:
        assert ready.wait(30)
        before = _listing(ckpt)
        with pytest.raises(RuntimeError, match=f"is in use by another job \\(host .*, pid {holder.pid}\\)"):
            _resume(ckpt, "--save", ckpt)
        assert {k: v for k, v in _listing(ckpt).items() if k != ".lock"} == \
            {k: v for k, v in before.items() if k != ".lock"}
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock; the lock file stays behind
        holder.join()
    assert os.path.exists(os.path.join(ckpt, ".lock"))
    assert len(_resume(ckpt, "--save", ckpt)) == 1
    assert open(os.path.join(ckpt, "latest")).read() == "global_step5"


def test_keep_last_k_keeps_the_newest_and_what_latest_names(tmp_path) -> None:
    folder = str(tmp_path / "run")
    train_losses(1, TP2[:-2] + ["--train-iters", "5", "--save", folder, "--save-interval", "1", "--keep-last-k", "2"])
    assert sorted(n for n in os.listdir(folder) if n.startswith("global_step")) == ["global_step4", "global_step5"]
    # Resume from step 4 (latest now names it) and re-save steps 5 and 6: step 4 is kept while named.
    open(os.path.join(folder, "latest"), "w").write("global_step4")
    from megatron.checkpointing.commit import remove_old_checkpoints
    shutil.copytree(os.path.join(folder, "global_step4"), os.path.join(folder, "global_step1"))
    open(os.path.join(folder, "latest"), "w").write("global_step1")
    assert remove_old_checkpoints(folder, 1) == ["global_step4"]
    assert sorted(n for n in os.listdir(folder) if n.startswith("global_step")) == ["global_step1", "global_step5"]


def test_save_removes_stale_pointer_temporaries_and_repairs_the_iteration_file(ckpt) -> None:
    open(os.path.join(ckpt, "latest.tmp.99999"), "w").write("global_step")
    open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w").write("2")  # killed between the writes
    from megatron.checkpointing.commit import tidy_folder
    tidy_folder(ckpt)
    assert not os.path.exists(os.path.join(ckpt, "latest.tmp.99999"))
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "4"
