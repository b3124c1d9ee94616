#!/usr/bin/env bash
# GPT 125M with 64 experts per MoE layer (upstream examples_deepspeed/MoE/ds_pretrain_gpt_125M_MoE64.sh,
# same flags; settings are environment variables, see moe_gpt_common.sh). Tiny run on 2 CPU processes:
#   NUM_GPUS=2 SEQ_LEN=32 NUM_LAYERS=2 HIDDEN_SIZE=32 NUM_ATTN_HEADS=4 EP_SIZE=4 GLOBAL_BATCH_SIZE=4 \
#   BATCH_SIZE=2 TRAIN_TOKENS=768 WARMUP_TOKENS=128 LR_DECAY_TOKENS=768 bash ds_pretrain_gpt_125M_MoE64.sh
set -euo pipefail
MODEL_SIZE=0.125
NUM_LAYERS="${NUM_LAYERS:-12}"
HIDDEN_SIZE="${HIDDEN_SIZE:-768}"
NUM_ATTN_HEADS="${NUM_ATTN_HEADS:-12}"
EP_SIZE="${EP_SIZE:-64}"
LR="${LR:-4.5e-4}"
MIN_LR="${MIN_LR:-4.5e-06}"
INIT_STD="${INIT_STD:-0.014}"
source "$(dirname "${BASH_SOURCE[0]}")/moe_gpt_common.sh"
