#!/usr/bin/env bash
# Steps 2 and 3 of universal checkpointing, after run_llama_bf16.sh: convert the SAVE_ITERS
# checkpoint to a universal one, resume it on another layout (default TP=1 PP=1 DP=2) to
# TRAIN_ITERS, and compare the resumed loss curve with run_llama_bf16.sh's uninterrupted one.
#
#   bash examples_deepspeed/universal_checkpointing/llama/run_universal_llama_bf16.sh
#   RESUME_TP=2 RESUME_PP=1 RESUME_DP=4 bash .../llama/run_universal_llama_bf16.sh
#
# Use the same OUTPUT, model, batch and iteration settings as the run_llama_bf16.sh run.
# bf16 is compared at TOLERANCE=3e-2 (another layout rounds differently at every step);
# PRECISION=fp32 on both scripts is compared at 1e-4. Exit status 1 if the curves differ.
set -euo pipefail
UCP_RUN_NAME=llama_bf16
UCP_MODEL=llama
PRECISION="${PRECISION:-bf16}"
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ucp_convert
ucp_resume
ucp_compare
ucp_summary
