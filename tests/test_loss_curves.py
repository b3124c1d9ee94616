"""Loss-curve comparison: reading runs back, PASS/FAIL/bad-input verdicts, plot, notebook."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron.loss_curves import NoOverlapError, compare_curves
from megatron.metrics_io import MetricsReadError, read_scalars

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "compare_loss_curves.py"
NOTEBOOK = REPO_ROOT / "examples_deepspeed" / "universal_checkpointing" / "loss_curves.ipynb"
TAG = "lm-loss-training/lm loss"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loss_at(iteration: int) -> float:
    """A plausible decreasing, slightly noisy loss curve."""
    return 10.0 * math.exp(-iteration / 15.0) + 0.05 * math.sin(iteration)


def write_events(run_dir: Path, values: dict[int, float], wall_time: float | None = None) -> None:
    """Log ``values`` under TAG into a new event file in ``run_dir``."""
    writer = SummaryWriter(log_dir=str(run_dir))
    for iteration, value in sorted(values.items()):
        writer.add_scalar(TAG, value, iteration, walltime=wall_time)
    writer.close()


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    # Run from an unrelated folder: the tool must find the package on its own.
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT.parent, timeout=120)


@pytest.fixture
def reference_dir(tmp_path: Path) -> Path:
    run = tmp_path / "reference"
    write_events(run, {i: loss_at(i) for i in range(1, 41)})
    return run


@pytest.fixture
def faithful_resume_dir(tmp_path: Path) -> Path:
    run = tmp_path / "resumed_ok"
    write_events(run, {i: loss_at(i) for i in range(21, 41)})
    return run


@pytest.fixture
def jumped_resume_dir(tmp_path: Path) -> Path:
    run = tmp_path / "resumed_jump"
    write_events(run, {i: loss_at(i) + 0.5 for i in range(21, 41)})
    return run


def test_read_scalars_reads_every_logged_iteration(reference_dir: Path) -> None:
    curve = read_scalars(str(reference_dir), TAG)
    assert sorted(curve) == list(range(1, 41))
    for i, value in curve.items():
        assert value == pytest.approx(loss_at(i), rel=1e-6)  # event files store float32


def test_faithful_resume_passes_and_writes_png(
    tmp_path: Path, reference_dir: Path, faithful_resume_dir: Path
) -> None:
    plot = tmp_path / "plots" / "curves.png"
    proc = run_tool("--reference", str(reference_dir), "--resumed", str(faithful_resume_dir),
                    "--plot", str(plot))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "PASS: max |diff| 0e+00 <= tolerance 1e-04 over 20 iterations after iteration 20"
    assert "compared iterations:   20 (21..40)" in proc.stdout
    data = plot.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_jump_after_resume_fails(reference_dir: Path, jumped_resume_dir: Path) -> None:
    proc = run_tool("--reference", str(reference_dir), "--resumed", str(jumped_resume_dir),
                    "--tag", TAG, "--tolerance", "1e-4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FAIL: max |diff| 5e-01 > tolerance 1e-04 over 20 iterations after iteration 20")


def test_compare_curves_statistics_and_given_resume_point() -> None:
    reference = {i: 2.0 for i in range(1, 11)}
    resumed = {i: 2.0 for i in range(6, 11)}
    resumed[8] = 2.5
    result = compare_curves(reference, resumed, tolerance=0.1, resume_iteration=5)
    assert result.iterations == (6, 7, 8, 9, 10)
    assert not result.resume_inferred
    assert result.max_abs_diff == pytest.approx(0.5)
    assert result.max_diff_iteration == 8
    assert result.mean_abs_diff == pytest.approx(0.1)
    assert result.max_rel_diff == pytest.approx(0.25)
    assert result.mean_rel_diff == pytest.approx(0.05)
    assert not result.passed
    # A divergence in the reference before the resume point is not the resumed run's fault.
    assert compare_curves({**reference, 8: 9.0}, {9: 2.0, 10: 2.0}, tolerance=0.1, resume_iteration=8).passed


def test_inferred_resume_point_uses_last_reference_log_before_resumed_run() -> None:
    reference = {i: 1.0 for i in range(10, 101, 10)}
    resumed = {i: 1.0 for i in range(60, 101, 10)}
    result = compare_curves(reference, resumed, tolerance=0.0, resume_iteration=None)
    assert result.resume_inferred and result.resume_iteration == 50
    assert result.iterations == (60, 70, 80, 90, 100)
    assert result.passed


def test_nan_loss_after_resume_fails() -> None:
    reference = {i: 1.0 for i in range(1, 5)}
    resumed = {3: 1.0, 4: float("nan")}
    result = compare_curves(reference, resumed, tolerance=1.0, resume_iteration=None)
    assert math.isinf(result.max_abs_diff) and result.max_diff_iteration == 4
    assert not result.passed and result.verdict().startswith("FAIL")


def test_metrics_jsonl_is_read_recursively(tmp_path: Path) -> None:
    nested = tmp_path / "run" / "logs"
    nested.mkdir(parents=True)
    rows = [{"iteration": i, TAG: loss_at(i), "lr": 1e-3} for i in range(1, 6)]
    (nested / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_scalars(str(tmp_path / "run"), TAG) == {i: loss_at(i) for i in range(1, 6)}
    assert read_scalars(str(tmp_path / "run"), "lr") == {i: 1e-3 for i in range(1, 6)}


def test_metrics_jsonl_later_line_wins(tmp_path: Path) -> None:
    # A resumed run appends to the same metrics.jsonl and re-logs iterations 3..4.
    lines = [{"iteration": i, TAG: 1.0} for i in range(1, 5)] + [{"iteration": i, TAG: 2.0} for i in (3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_scalars(str(tmp_path), TAG) == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0}


def test_newest_event_file_wins_for_duplicate_iterations(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # The resumed run's file is written first here, so only its wall time makes it newer.
    write_events(run / "b_resumed", {i: 2.0 for i in range(3, 7)}, wall_time=2_000_000.0)
    write_events(run / "a_original", {i: 1.0 for i in range(1, 6)}, wall_time=1_000_000.0)
    assert read_scalars(str(run), TAG) == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0, 5: 2.0, 6: 2.0}


def test_newest_file_wins_across_event_and_jsonl_files(tmp_path: Path) -> None:
    write_events(tmp_path / "tb", {i: 1.0 for i in range(1, 5)}, wall_time=1_000_000.0)
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"iteration": i, TAG: 3.0}) + "\n" for i in (2, 3)))
    os.utime(jsonl, (2_000_000.0, 2_000_000.0))
    assert read_scalars(str(tmp_path), TAG) == {1: 1.0, 2: 3.0, 3: 3.0, 4: 1.0}
    os.utime(jsonl, (500_000.0, 500_000.0))
    assert read_scalars(str(tmp_path), TAG) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}


def test_missing_tag_lists_existing_tags(reference_dir: Path) -> None:
    with pytest.raises(MetricsReadError, match=r"tag 'nope' not found.*'lm-loss-training/lm loss'"):
        read_scalars(str(reference_dir), "nope")


def test_folder_without_metrics_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no metrics here")
    with pytest.raises(MetricsReadError, match="no TensorBoard event files"):
        read_scalars(str(tmp_path), TAG)


def test_no_overlap_after_resume_is_an_error() -> None:
    with pytest.raises(NoOverlapError):
        compare_curves({i: 1.0 for i in range(1, 11)}, {i: 1.0 for i in range(11, 21)}, 1e-4, None)


@pytest.mark.parametrize("case", ["missing_folder", "empty_folder", "unknown_tag", "no_overlap"])
def test_bad_input_exits_2(case: str, tmp_path: Path, reference_dir: Path) -> None:
    resumed = tmp_path / "resumed"
    args = ["--reference", str(reference_dir), "--resumed", str(resumed)]
    if case == "empty_folder":
        resumed.mkdir()
    elif case == "unknown_tag":
        write_events(resumed, {i: loss_at(i) for i in range(21, 41)})
        args += ["--tag", "nope"]
    elif case == "no_overlap":
        write_events(resumed, {i: loss_at(i) for i in range(41, 61)})
    proc = run_tool(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout


def test_notebook_runs_headless_and_reports_pass(
    monkeypatch: pytest.MonkeyPatch, reference_dir: Path, faithful_resume_dir: Path
) -> None:
    monkeypatch.setenv("UCP_REFERENCE_DIR", str(reference_dir))
    monkeypatch.setenv("UCP_RESUMED_DIR", str(faithful_resume_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    texts, images = [], []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error"
            if output["output_type"] == "stream":
                texts.append(output["text"])
            elif "image/png" in output.get("data", {}):
                images.append(output["data"]["image/png"])
    assert any(line.startswith("PASS: ") for text in texts for line in text.splitlines())
    assert len(images) == 1


def test_tensor_style_scalars_are_read(tmp_path: Path) -> None:
    # TF2-style writers store scalars as 0-d tensor summaries rather than simple values.
    writer = SummaryWriter(log_dir=str(tmp_path))
    for i in range(1, 6):
        writer.add_scalar(TAG, 0.5 * i, i, new_style=True)
    writer.close()
    assert read_scalars(str(tmp_path), TAG) == {i: 0.5 * i for i in range(1, 6)}
