#!/usr/bin/env bash
# Compare the loss curve of a resumed run against the uninterrupted reference run
# and plot both: the last step of the Universal Checkpointing workflow.
#
#   bash examples_deepspeed/universal_checkpointing/run_tb_analysis.sh   # after the bf16 GPT pair
#   bash examples_deepspeed/universal_checkpointing/run_tb_analysis.sh runs/llama_bf16   # upstream's form:
#                     the output path as the first argument (same as OUTPUT=...)
#   OUTPUT=runs/llama_bf16 bash examples_deepspeed/universal_checkpointing/run_tb_analysis.sh
#   REF_DIR=runs/reference RESUMED_DIR=runs/resumed PRECISION=fp32 \
#       bash examples_deepspeed/universal_checkpointing/run_tb_analysis.sh
#
# Environment (all optional):
#   OUTPUT            output folder of an example pair (run_bf16.sh + run_universal_bf16.sh,
#                     ...); sets the three defaults below            [./runs/megatron_gpt_bf16]
#   REF_DIR           reference run folder (TensorBoard events / metrics.jsonl)
#                                                            [${OUTPUT}/tensorboard/reference]
#   RESUMED_DIR       resumed run folder                       [${OUTPUT}/tensorboard/resumed]
#   TAG               scalar to compare                                 [lm-loss-training/lm loss]
#   PRECISION         bf16, fp16 or fp32: picks the default TOLERANCE                     [bf16]
#   TOLERANCE         largest allowed |difference|. fp32 continues the curve to reduction-order
#                     noise: 1e-4. bf16 keeps 8 significant bits (a loss near 4 is rounded to
#                     1.6e-2): another layout sums in another order, every step rounds
#                     differently and two bf16 runs on different layouts drift apart by up to
#                     about 2e-2 in 40 steps even with no checkpoint involved: 3e-2. fp16
#                     keeps 11 bits: 1e-2. See README.md for the measurements.
#   PLOT              where to write the PNG                        [${OUTPUT}/loss_curves.png]
#   RESUME_ITERATION  checkpoint iteration of the resume       [inferred from the resumed run]
#   PYTHON            interpreter                                                 [python]
# Exit status is the tool's: 0 PASS, 1 FAIL, 2 bad input.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/../.." && pwd)"

if (( $# > 1 )); then
    echo "usage: $0 [OUTPUT_PATH]   (other settings are environment variables, see the header)" >&2; exit 2
fi
OUTPUT="${1:-${OUTPUT:-./runs/megatron_gpt_bf16}}"
REF_DIR="${REF_DIR:-${OUTPUT}/tensorboard/reference}"
RESUMED_DIR="${RESUMED_DIR:-${OUTPUT}/tensorboard/resumed}"
TAG="${TAG:-lm-loss-training/lm loss}"
PRECISION="${PRECISION:-bf16}"
PLOT="${PLOT:-${OUTPUT}/loss_curves.png}"
PYTHON="${PYTHON:-python}"

args=(--reference "${REF_DIR}" --resumed "${RESUMED_DIR}" --tag "${TAG}" --precision "${PRECISION}"
      --plot "${PLOT}")
if [[ -n "${TOLERANCE:-}" ]]; then
    args+=(--tolerance "${TOLERANCE}")
fi
if [[ -n "${RESUME_ITERATION:-}" ]]; then
    args+=(--resume-iteration "${RESUME_ITERATION}")
fi

status=0
"${PYTHON}" "${repo_root}/tools/compare_loss_curves.py" "${args[@]}" || status=$?
if [[ -f "${PLOT}" && ${status} -ne 2 ]]; then
    echo "loss-curve plot written to $(cd "$(dirname "${PLOT}")" && pwd)/$(basename "${PLOT}")"
fi
exit "${status}"
