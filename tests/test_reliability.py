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
    # one more iteration of the same schedule (another --train-iters would be another LR schedule)
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
