#!/usr/bin/env bash
# Step 1 of universal checkpointing: train a Llama-style model (RMSNorm, SwiGLU, RoPE,
# grouped-query attention with KV_HEADS, untied embeddings, SentencePiece tokenizer) in bf16
# on TP=2 PP=2 DP=2 (8 processes) to TRAIN_ITERS, saving a native checkpoint every
# SAVE_ITERS. This uninterrupted run is the reference that run_universal_llama_bf16.sh's
# resumed run is compared against.
#
#   bash examples_deepspeed/universal_checkpointing/llama/run_llama_bf16.sh
#   TP=1 PP=1 DP=2 TRAIN_ITERS=100 SAVE_ITERS=50 bash .../llama/run_llama_bf16.sh
#
# Settings are environment variables (see ../README.md); output goes to OUTPUT
# (default runs/llama_bf16).
set -euo pipefail
UCP_RUN_NAME=llama_bf16
UCP_MODEL=llama
PRECISION="${PRECISION:-bf16}"
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ucp_train
