#!/usr/bin/env bash
# Compare the loss curve of a resumed run against the uninterrupted reference run
# and plot both: the last step of the Universal Checkpointing workflow.
#
#   REF_DIR=runs/reference RESUMED_DIR=runs/resumed \
#       bash examples_deepspeed/universal_checkpointing/run_tb_analysis.sh
#
# Environment (all optional):
#   REF_DIR           reference run folder (TensorBoard events / metrics.jsonl)  [./runs/reference]
#   RESUMED_DIR       resumed run folder                                          [./runs/resumed]
#   TAG               scalar to compare                                 [lm-loss-training/lm loss]
#   TOLERANCE         largest allowed |difference|                                [1e-4]
#   PLOT              where to write the PNG                       [./runs/loss_curves.png]
#   RESUME_ITERATION  checkpoint iteration of the resume       [inferred from the resumed run]
#   PYTHON            interpreter                                                 [python]
# Exit status is the tool's: 0 PASS, 1 FAIL, 2 bad input.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"

REF_DIR="${REF_DIR:-./runs/reference}"
RESUMED_DIR="${RESUMED_DIR:-./runs/resumed}"
TAG="${TAG:-lm-loss-training/lm loss}"
TOLERANCE="${TOLERANCE:-1e-4}"
PLOT="${PLOT:-./runs/loss_curves.png}"
PYTHON="${PYTHON:-python}"

args=(--reference "${REF_DIR}" --resumed "${RESUMED_DIR}" --tag "${TAG}"
      --tolerance "${TOLERANCE}" --plot "${PLOT}")
if [[ -n "${RESUME_ITERATION:-}" ]]; then
    args+=(--resume-iteration "${RESUME_ITERATION}")
fi

status=0
"${PYTHON}" "${repo_root}/tools/compare_loss_curves.py" "${args[@]}" || status=$?
if [[ -f "${PLOT}" && ${status} -ne 2 ]]; then
    echo "loss-curve plot written to $(cd "$(dirname "${PLOT}")" && pwd)/$(basename "${PLOT}")"
fi
exit "${status}"
