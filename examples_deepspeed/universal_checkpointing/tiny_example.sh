#!/usr/bin/env bash
# The whole universal-checkpointing workflow with 2 processes, in about a minute on 2 CPU cores:
#   1. train a tiny GPT in fp32 on TP=2 to iteration 40, saving at 20 (the reference run)
#   2. convert the iteration-20 checkpoint to a universal checkpoint
#   3. resume it on DP=2 (another layout, another partitioning of the optimizer) to iteration 40
#   4. compare the resumed loss curve with the reference: a PASS line and a PNG plot
#
#   bash examples_deepspeed/universal_checkpointing/tiny_example.sh
#
# The same environment variables as the other scripts apply (README.md in this folder);
# output goes to OUTPUT (default runs/tiny_example). fp32 must continue the curve to
# within 1e-4; the script exits 1 if it does not.
set -euo pipefail
UCP_RUN_NAME=tiny_example
UCP_MODEL=gpt
PRECISION="${PRECISION:-fp32}"
TP="${TP:-2}"
PP="${PP:-1}"
DP="${DP:-1}"
RESUME_TP="${RESUME_TP:-1}"
RESUME_PP="${RESUME_PP:-1}"
RESUME_DP="${RESUME_DP:-2}"
NUM_LAYERS="${NUM_LAYERS:-2}"
MBS="${MBS:-2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ucp_train
ucp_convert
ucp_resume
ucp_compare
ucp_summary
