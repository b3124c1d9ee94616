#!/usr/bin/env bash
# Upstream's name for the GPT comparison: run_tb_analysis.sh on an output path (first
# argument, default runs/megatron_gpt_bf16, or runs/megatron_gpt_fp16 with PRECISION=fp16).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRECISION="${PRECISION:-bf16}" exec bash "${here}/../run_tb_analysis.sh" "${1:-runs/megatron_gpt_${PRECISION:-bf16}}"
