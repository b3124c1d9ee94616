"""Check that a resumed run continues the reference run's loss curve.

The Universal Checkpointing promise is that resuming on another parallel layout
does not change training: after the resume point the two curves must agree
within a tolerance. ``compare_curves`` measures that; ``plot_comparison`` draws it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron.metrics_io import read_run

# Relative differences divide by |reference|; this keeps a zero reference finite.
_REL_EPS = 1e-12


class NoOverlapError(ValueError):
    """The two curves share no iteration after the resume point, so nothing can be compared."""


class SameRunError(ValueError):
    """Reference and resumed sides read the same (or byte-identical) files: a comparison of a
    run with itself would pass whatever the checkpoint did."""


class NotResumedError(ValueError):
    """The resumed run logged iterations at or before the resume point: it did not start from
    the checkpoint (it started from scratch, or shares a folder with the reference)."""


def check_distinct_runs(reference_files: list[str], resumed_files: list[str]) -> None:
    """Refuse a comparison whose two sides share a file, or hold byte-identical copies."""
    real = {os.path.realpath(f): f for f in reference_files}
    shared = [f for f in resumed_files if os.path.realpath(f) in real]
    if shared:
        raise SameRunError(f"the reference and the resumed run read the same files ({', '.join(shared[:3])}"
                           f"{', ...' if len(shared) > 3 else ''}): give two separate run folders, neither "
                           f"inside the other")
    digests = {_sha256(f): f for f in reference_files}
    copies = [(f, digests[d]) for f in resumed_files if (d := _sha256(f)) in digests]
    if copies:
        raise SameRunError(f"resumed file {copies[0][0]} is a byte-identical copy of reference file "
                           f"{copies[0][1]}: the resumed run's own logs are needed")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class ComparisonResult:
    """How far the resumed curve strays from the reference after ``resume_iteration``.

    ``iterations`` are the compared ones (strictly after the resume point, logged in
    both runs); ``missing_in_*`` list the ones after it that only one run logged.
    A non-finite value in either curve makes the differences infinite, so the
    comparison fails rather than hiding a NaN loss.
    """

    resume_iteration: int
    resume_inferred: bool
    iterations: tuple[int, ...]
    missing_in_reference: tuple[int, ...]
    missing_in_resumed: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    mean_rel_diff: float
    max_diff_iteration: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def verdict(self) -> str:
        """One line, starting with PASS or FAIL, that a script or a person can grep."""
        relation = "<=" if self.passed else ">"
        return (
            f"{'PASS' if self.passed else 'FAIL'}: max |diff| {_sci(self.max_abs_diff, 3)} {relation} "
            f"tolerance {_sci(self.tolerance, 7)} over {len(self.iterations)} iterations "
            f"after iteration {self.resume_iteration}"
        )

    def report(self) -> str:
        """Multi-line human report ending with the verdict line."""
        how = "inferred from the resumed run's first logged iteration" if self.resume_inferred else "given"
        lines = [
            f"resume point:          iteration {self.resume_iteration} ({how})",
            f"compared iterations:   {len(self.iterations)} ({self.iterations[0]}..{self.iterations[-1]})",
            f"max |diff|:            {self.max_abs_diff:.6e} at iteration {self.max_diff_iteration}",
            f"mean |diff|:           {self.mean_abs_diff:.6e}",
            f"max relative |diff|:   {self.max_rel_diff:.6e}",
            f"mean relative |diff|:  {self.mean_rel_diff:.6e}",
        ]
        for label, missing in (("not in reference:     ", self.missing_in_reference),
                               ("not in resumed:       ", self.missing_in_resumed)):
            if missing:
                shown = ", ".join(str(i) for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
                lines.append(f"{label} {len(missing)} iterations after the resume point ({shown}), not compared")
        lines.append(self.verdict())
        return "\n".join(lines)


def infer_resume_iteration(reference: dict[int, float], resumed: dict[int, float]) -> int:
    """The checkpoint iteration a resumed run most likely started from.

    A resumed run logs only after its checkpoint, so the resume point lies before its
    first logged iteration; the last reference iteration before that is the best
    guess (exact when the log and checkpoint intervals line up).
    """
    if not resumed:
        raise NoOverlapError("the resumed curve is empty")
    first = min(resumed)
    earlier = [i for i in reference if i < first]
    return max(earlier) if earlier else first - 1


def _abs_and_rel(ref: float, res: float) -> tuple[float, float]:
    if not (math.isfinite(ref) and math.isfinite(res)):
        return math.inf, math.inf
    diff = abs(res - ref)
    return diff, diff / max(abs(ref), _REL_EPS)


def compare_curves(
    reference: dict[int, float],
    resumed: dict[int, float],
    tolerance: float,
    resume_iteration: int | None,
) -> ComparisonResult:
    """Compare the curves at every iteration after the resume point that both logged.

    ``resume_iteration`` is the checkpoint's iteration; None infers it with
    ``infer_resume_iteration``. Raises ``NoOverlapError`` when nothing overlaps and
    ``NotResumedError`` when the resumed run logged anything at or before the resume point.
    """
    if tolerance < 0 or math.isnan(tolerance):
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    inferred = resume_iteration is None
    point = infer_resume_iteration(reference, resumed) if resume_iteration is None else resume_iteration
    if point < 1:
        raise NotResumedError(f"the resumed run logged iteration {min(resumed)}: it trained from the start, "
                              f"not from a checkpoint (did --load find one?)")
    before = sorted(i for i in resumed if i <= point)
    if before:
        raise NotResumedError(f"the resumed run logged {_span(dict.fromkeys(before))} at or before the "
                              f"resume point {point}: it did not start from that checkpoint")
    after = sorted(i for i in resumed if i > point)
    iterations = tuple(i for i in after if i in reference)
    if not iterations:
        raise NoOverlapError(
            f"no iteration after the resume point {point} is logged in both runs "
            f"(reference {_span(reference)}, resumed {_span(resumed)})"
        )
    diffs = [_abs_and_rel(reference[i], resumed[i]) for i in iterations]
    abs_diffs = [d[0] for d in diffs]
    rel_diffs = [d[1] for d in diffs]
    worst = max(range(len(iterations)), key=abs_diffs.__getitem__)
    return ComparisonResult(
        resume_iteration=point,
        resume_inferred=inferred,
        iterations=iterations,
        missing_in_reference=tuple(i for i in after if i not in reference),
        missing_in_resumed=tuple(i for i in sorted(reference) if i > point and i not in resumed),
        max_abs_diff=abs_diffs[worst],
        mean_abs_diff=sum(abs_diffs) / len(abs_diffs),
        max_rel_diff=max(rel_diffs),
        mean_rel_diff=sum(rel_diffs) / len(rel_diffs),
        max_diff_iteration=iterations[worst],
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class RunComparison:
    """Everything a report needs: both curves, the files each came from, the result."""

    reference: dict[int, float]
    resumed: dict[int, float]
    reference_files: list[str]
    resumed_files: list[str]
    result: ComparisonResult

    def sources(self) -> str:
        lines = []
        for side, files, curve in (("reference", self.reference_files, self.reference),
                                   ("resumed", self.resumed_files, self.resumed)):
            lines.append(f"{side + ':':<10} {len(curve)} points ({_span(curve)}) from {len(files)} file(s):")
            lines += [f"    {f}" for f in files]
        return "\n".join(lines)


def compare_runs(reference_dir: str, resumed_dir: str, tag: str, tolerance: float,
                 resume_iteration: int | None) -> RunComparison:
    """Read both run folders and compare them, refusing a run compared with itself."""
    if os.path.realpath(reference_dir) == os.path.realpath(resumed_dir):
        raise SameRunError(f"--reference and --resumed are the same folder ({reference_dir})")
    reference, reference_files = read_run(reference_dir, tag)
    resumed, resumed_files = read_run(resumed_dir, tag)
    check_distinct_runs(reference_files, resumed_files)
    result = compare_curves(reference, resumed, tolerance, resume_iteration)
    return RunComparison(reference, resumed, reference_files, resumed_files, result)


def tolerance_for(precision: str) -> float:
    """Default tolerance per training precision (see run_tb_analysis.sh for the measurements)."""
    tolerances = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
    if precision not in tolerances:
        raise ValueError(f"precision must be one of {', '.join(tolerances)}, got {precision!r}")
    return tolerances[precision]


def _sci(x: float, digits: int) -> str:
    """Scientific notation with at most ``digits`` significant digits, trailing zeros dropped."""
    if not math.isfinite(x):
        return str(x)
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


def _span(curve: dict[int, float]) -> str:
    return f"iterations {min(curve)}..{max(curve)}" if curve else "empty"


def comparison_figure(
    reference: dict[int, float],
    resumed: dict[int, float],
    result: ComparisonResult,
    tag: str = "loss",
) -> Figure:
    """Both curves with the resume point marked, and their difference below.

    Built on a bare Agg-backed ``Figure`` so it touches no global pyplot state and
    works the same in scripts, tests and notebooks.
    """
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))

    ref_x = sorted(reference)
    res_x = sorted(resumed)
    top.plot(ref_x, [reference[i] for i in ref_x], label="reference", color="tab:blue", linewidth=1.8)
    top.plot(res_x, [resumed[i] for i in res_x], label="resumed", color="tab:orange",
             linestyle="--", linewidth=1.4)
    for ax in (top, bottom):
        ax.axvline(result.resume_iteration, color="gray", linestyle=":", linewidth=1.2,
                   label=f"resume point ({result.resume_iteration})" if ax is top else None)
        ax.grid(alpha=0.3)
    top.set_ylabel(tag)
    top.set_title(f"{tag}: resumed after iteration {result.resume_iteration}")
    top.legend(loc="best")

    signed = [resumed[i] - reference[i] for i in result.iterations]
    bottom.plot(result.iterations, signed, color="tab:red", marker=".", linewidth=1.0)
    bottom.axhline(0.0, color="black", linewidth=0.6)
    bottom.axhline(result.tolerance, color="tab:green", linestyle="--", linewidth=0.8, label="± tolerance")
    bottom.axhline(-result.tolerance, color="tab:green", linestyle="--", linewidth=0.8)
    bottom.set_xlabel("iteration")
    bottom.set_ylabel("resumed - reference")
    bottom.set_title(result.verdict(), fontsize=9)
    bottom.legend(loc="best")
    return fig


def plot_comparison(
    reference: dict[int, float],
    resumed: dict[int, float],
    result: ComparisonResult,
    path: str,
    tag: str = "loss",
) -> str:
    """Write ``comparison_figure`` as a PNG to ``path`` (creating its folder) and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    comparison_figure(reference, resumed, result, tag).savefig(path, format="png", dpi=120)
    return path
