#!/usr/bin/env bash
# Step 1 of universal checkpointing: train a GPT model in fp16 on TP=2 PP=2 DP=2 (8 processes)
# to TRAIN_ITERS, saving a native checkpoint every SAVE_ITERS. This uninterrupted run is the
# reference that run_universal_fp16.sh's resumed run is compared against.
#
#   bash examples_deepspeed/universal_checkpointing/megatron_gpt/run_fp16.sh
#   TP=1 PP=1 DP=2 TRAIN_ITERS=100 SAVE_ITERS=50 bash .../megatron_gpt/run_fp16.sh
#
# Settings are environment variables (see ../README.md); output goes to OUTPUT
# (default runs/megatron_gpt_fp16).
set -euo pipefail
UCP_RUN_NAME=megatron_gpt_fp16
UCP_MODEL=gpt
PRECISION="${PRECISION:-fp16}"
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ucp_train
