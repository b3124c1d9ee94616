#!/usr/bin/env bash
# Upstream's name for the Llama comparison: run_tb_analysis.sh on an output path (first
# argument, default runs/llama_bf16).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRECISION="${PRECISION:-bf16}" exec bash "${here}/../run_tb_analysis.sh" "${1:-runs/llama_bf16}"
