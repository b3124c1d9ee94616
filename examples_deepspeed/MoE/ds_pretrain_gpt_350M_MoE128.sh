#!/usr/bin/env bash
# GPT 350M with 128 experts per MoE layer (upstream examples_deepspeed/MoE/ds_pretrain_gpt_350M_MoE128.sh,
# same flags; settings are environment variables, see moe_gpt_common.sh).
set -euo pipefail
MODEL_SIZE=0.35
NUM_LAYERS="${NUM_LAYERS:-24}"
HIDDEN_SIZE="${HIDDEN_SIZE:-1024}"
NUM_ATTN_HEADS="${NUM_ATTN_HEADS:-16}"
EP_SIZE="${EP_SIZE:-128}"
NUM_GPUS="${NUM_GPUS:-64}"
LR="${LR:-2.0e-4}"
MIN_LR="${MIN_LR:-2e-06}"
INIT_STD="${INIT_STD:-0.014}"
source "$(dirname "${BASH_SOURCE[0]}")/moe_gpt_common.sh"
