#!/usr/bin/env bash
# GPT 1.3B at 32k sequence length with DeepSpeed-Ulysses sequence parallelism (upstream
# examples_deepspeed/sequence_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh, written anew
# with the same flags). Every setting is an environment variable with upstream's value as
# its default. Ours: OUTPUT_HOME, CHECKPOINT_PATH (save), LOAD_PATH (default CHECKPOINT_PATH),
# TENSORBOARD_PATH, UNIVERSAL_CHECKPOINT=true to resume from a universal checkpoint, PRECISION
# (fp16 as upstream, bf16, fp32), DATA_PATH + VOCAB_PATH + MERGE_PATH (default: the built-in
# corpus and a GPT-2 BPE trained on it, offline, in place of upstream's BookCorpus download).
# Tiny run on 2 CPU processes (SP 2):
#   NUM_GPUS=2 SP_SIZE=2 SEQ_LEN=32 NUM_LAYERS=2 HIDDEN_SIZE=32 NUM_ATTN_HEADS=4 GLOBAL_BATCH_SIZE=2 \
#   TRAIN_TOKENS=384 LR_WARMUP_TOKENS=64 bash ds_pretrain_gpt_1.3B_seq_parallel_32k.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

SEQ_LEN="${SEQ_LEN:-32768}"
MODEL_SIZE=1.3
NUM_LAYERS="${NUM_LAYERS:-24}"
HIDDEN_SIZE="${HIDDEN_SIZE:-2048}"
NUM_ATTN_HEADS="${NUM_ATTN_HEADS:-16}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-2}"
LR="${LR:-2.0e-4}"
MIN_LR="${MIN_LR:-1.0e-6}"
INIT_STD="${INIT_STD:-0.013}"
TRAIN_TOKENS="${TRAIN_TOKENS:-300000000000}"
# As upstream: the sample limit is 2x the token budget, so --train-tokens ends the run.
TRAIN_SAMPLES="${TRAIN_SAMPLES:-$(( TRAIN_TOKENS * 2 / SEQ_LEN ))}"
EXIT_DURATION="${EXIT_DURATION:-30000000}"
LR_WARMUP_TOKENS="${LR_WARMUP_TOKENS:-3000000000}"
LR_DECAY_TOKENS="${LR_DECAY_TOKENS:-${TRAIN_TOKENS}}"
LR_DECAY_STYLE="${LR_DECAY_STYLE:-cosine}"
MP_SIZE="${MP_SIZE:-1}"
SP_SIZE="${SP_SIZE:-4}"
PP_SIZE="${PP_SIZE:-1}"
NO_PP="${NO_PP:-true}"
ZERO_STAGE="${ZERO_STAGE:-1}"
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS="$("${PYTHON}" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
BATCH_SIZE="${BATCH_SIZE:-1}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
EVAL_ITERS="${EVAL_ITERS:-10}"
EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
ACTIVATION_CHECKPOINT="${ACTIVATION_CHECKPOINT:-true}"
LOG_OPTIMIZER_STATE="${LOG_OPTIMIZER_STATE:-true}"
SEED="${SEED:-1234}"
NUM_WORKERS="${NUM_WORKERS:-0}"
PRECISION="${PRECISION:-fp16}"
UNIVERSAL_CHECKPOINT="${UNIVERSAL_CHECKPOINT:-false}"
# As upstream: DeepSpeed prescales gradients only without ZeRO.
PRESCALE_GRAD=true
(( ZERO_STAGE == 0 )) || PRESCALE_GRAD=false

JOBNAME="gpt_${MODEL_SIZE}B_tok${TRAIN_TOKENS}_lr${LR}_min${MIN_LR}_${LR_DECAY_STYLE}_gbs${GLOBAL_BATCH_SIZE}_mbs${BATCH_SIZE}_g${NUM_GPUS}_z${ZERO_STAGE}_sp${SP_SIZE}_mp${MP_SIZE}_seed${SEED}"
OUTPUT_HOME="${OUTPUT_HOME:-${PWD}/output}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-${OUTPUT_HOME}/checkpoint/${JOBNAME}}"
LOAD_PATH="${LOAD_PATH:-${CHECKPOINT_PATH}}"
TENSORBOARD_PATH="${TENSORBOARD_PATH:-${OUTPUT_HOME}/tensorboard/${JOBNAME}_${HOSTNAME:-host}_$(date +%Y.%m.%d_%H.%M.%S)}"
LOG_FILE="${LOG_FILE:-${OUTPUT_HOME}/log/${JOBNAME}.log}"
mkdir -p "${CHECKPOINT_PATH}" "${TENSORBOARD_PATH}" "$(dirname "${LOG_FILE}")"

if [[ -z "${DATA_PATH:-}" ]]; then
    mapfile -t SAMPLE < <("${PYTHON}" "${REPO}/tools/prepare_sample_data.py" --output-dir "${OUTPUT_HOME}/data" \
        --tokenizer gpt2bpe --num-docs "${NUM_DOCS:-4000}" --vocab-size "${TOKENIZER_VOCAB:-1024}" --print-args)
    for (( i = 0; i < ${#SAMPLE[@]}; i += 2 )); do
        case "${SAMPLE[i]}" in
            --data-path) DATA_PATH="${SAMPLE[i+1]}" ;;
            --vocab-file) VOCAB_PATH="${SAMPLE[i+1]}" ;;
            --merge-file) MERGE_PATH="${SAMPLE[i+1]}" ;;
        esac
    done
fi
# shellcheck disable=SC2206  # a blend 'W1 PREFIX1 W2 PREFIX2' is several words
data_options=(--vocab-file "${VOCAB_PATH}" --merge-file "${MERGE_PATH}" --data-path ${DATA_PATH} --data-impl mmap)

megatron_options=(
    --override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95
    --tensor-model-parallel-size "${MP_SIZE}" --ds-sequence-parallel-size "${SP_SIZE}"
    --init-method-std "${INIT_STD}" --lr-decay-tokens "${LR_DECAY_TOKENS}" --lr-warmup-tokens "${LR_WARMUP_TOKENS}"
    --micro-batch-size "${BATCH_SIZE}" --exit-duration-in-mins "${EXIT_DURATION}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}" --num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN_SIZE}"
    --num-attention-heads "${NUM_ATTN_HEADS}" --seq-length "${SEQ_LEN}" --max-position-embeddings "${SEQ_LEN}"
    --train-tokens "${TRAIN_TOKENS}" --train-samples "${TRAIN_SAMPLES}" --lr "${LR}" --min-lr "${MIN_LR}"
    --lr-decay-style "${LR_DECAY_STYLE}" --split 949,50,1 --log-interval "${LOG_INTERVAL}"
    --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}" --save-interval "${SAVE_INTERVAL}"
    --weight-decay 0.1 --clip-grad 1.0 --hysteresis 2 --num-workers "${NUM_WORKERS}"
)
case "${PRECISION}" in
    fp16) megatron_options+=(--fp16) ;;
    bf16) megatron_options+=(--bf16) ;;
    fp32) ;;
    *) echo "error: PRECISION must be fp16, bf16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
megatron_options+=(
    --seed "${SEED}" --load "${LOAD_PATH}" --save "${CHECKPOINT_PATH}"
    --no-async-tensor-model-parallel-allreduce --use-flash-attn-triton --tensorboard-queue-size 1
    --log-timers-to-tensorboard --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard
    --tensorboard-dir "${TENSORBOARD_PATH}"
)
[[ "${ACTIVATION_CHECKPOINT}" != true ]] || megatron_options+=(--checkpoint-activations)
[[ "${LOG_OPTIMIZER_STATE}" != true ]] || megatron_options+=(--log-optimizer-states-to-tensorboard)
[[ "${UNIVERSAL_CHECKPOINT}" != true ]] || megatron_options+=(--universal-checkpoint)

config_json="${OUTPUT_HOME}/ds_config_gbs${GLOBAL_BATCH_SIZE}_mbs${BATCH_SIZE}_log${LOG_INTERVAL}_zero${ZERO_STAGE}.json"
cat > "${config_json}" <<JSON
{
  "train_batch_size": ${GLOBAL_BATCH_SIZE},
  "train_micro_batch_size_per_gpu": ${BATCH_SIZE},
  "steps_per_print": ${LOG_INTERVAL},
  "zero_optimization": {"stage": ${ZERO_STAGE}},
  "gradient_clipping": 1.0,
  "prescale_gradients": ${PRESCALE_GRAD},
  "fp16": {"enabled": $([[ ${PRECISION} == fp16 ]] && echo true || echo false), "loss_scale": 0,
           "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 11},
  "wall_clock_breakdown": false
}
JSON

deepspeed_options=(--deepspeed --deepspeed_config "${config_json}" --zero-stage "${ZERO_STAGE}"
                   --pipeline-model-parallel-size "${PP_SIZE}")
[[ "${NO_PP}" != true ]] || deepspeed_options+=(--no-pipeline-parallel)
[[ "${ACTIVATION_CHECKPOINT}" != true ]] || deepspeed_options+=(--deepspeed-activation-checkpointing)

# torchrun in place of upstream's `deepspeed` launcher (pretrain_gpt.py takes either).
cd "${REPO}"
set -o pipefail
"${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NUM_GPUS}" pretrain_gpt.py \
    "${megatron_options[@]}" "${data_options[@]}" "${deepspeed_options[@]}" 2>&1 | tee "${LOG_FILE}"
