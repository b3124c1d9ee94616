# Shared body of the MoE GPT scripts in this folder (upstream Megatron-DeepSpeed's
# examples_deepspeed/MoE/ds_pretrain_gpt_*_MoE*.sh, written anew with the same flags).
# Source it after setting the model's defaults (MODEL_SIZE, NUM_LAYERS, HIDDEN_SIZE,
# NUM_ATTN_HEADS, EP_SIZE, LR, MIN_LR, INIT_STD). Every setting is an environment variable
# with upstream's value as its default, so tiny runs change sizes and paths only.
#
# Output and resuming (ours): OUTPUT_BASEPATH, CHECKPOINT_PATH (save), LOAD_PATH (default:
# CHECKPOINT_PATH, as upstream), TENSORBOARD_DIR, UNIVERSAL_CHECKPOINT=true to resume from a
# universal checkpoint; data: DATA_PATH + VOCAB_PATH + MERGE_PATH, else the built-in corpus.
# PRECISION (fp16 as upstream, or bf16 / fp32); NUM_GPUS is the number of processes.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

SEQ_LEN="${SEQ_LEN:-2048}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-256}"
TRAIN_TOKENS="${TRAIN_TOKENS:-300000000000}"
# As upstream: the iteration limit is 3x the token budget, so --train-tokens ends the run.
TRAIN_ITERS="${TRAIN_ITERS:-$(( TRAIN_TOKENS * 3 / GLOBAL_BATCH_SIZE / SEQ_LEN ))}"
EXIT_DURATION="${EXIT_DURATION:-30000000}"
WARMUP_TOKENS="${WARMUP_TOKENS:-375000000}"
LR_DECAY_TOKENS="${LR_DECAY_TOKENS:-300000000000}"
BATCH_SIZE="${BATCH_SIZE:-4}"
MP_SIZE="${MP_SIZE:-1}"
PP_SIZE="${PP_SIZE:-1}"
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS="$("${PYTHON}" -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
EP_PARALLEL_SIZE="${EP_PARALLEL_SIZE:-$(( EP_SIZE > NUM_GPUS ? NUM_GPUS : EP_SIZE ))}"
MLC="${MLC:-0.01}"
MOE_TRAIN_CAP_FACTOR="${MOE_TRAIN_CAP_FACTOR:-1.0}"
MOE_EVAL_CAP_FACTOR="${MOE_EVAL_CAP_FACTOR:-1.0}"
MOE_MIN_CAP="${MOE_MIN_CAP:-4}"
MOE_DROP_TOKEN="${MOE_DROP_TOKEN:-true}"
CL_ENABLED="${CL_ENABLED:-false}"   # true is refused: curriculum learning is not built here
CL_START_SEQLEN="${CL_START_SEQLEN:-80}"
CL_AVG_SEQLEN=$(( (CL_START_SEQLEN + SEQ_LEN) / 2 ))
CL_TOKENS="${CL_TOKENS:-60000000000}"
CL_STEP=$(( CL_TOKENS / (GLOBAL_BATCH_SIZE * CL_AVG_SEQLEN) ))
LOG_INTERVAL="${LOG_INTERVAL:-10}"
EVAL_ITERS="${EVAL_ITERS:-10}"
EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
SAVE_INTERVAL="${SAVE_INTERVAL:-10000}"
ACTIVATION_CHECKPOINT="${ACTIVATION_CHECKPOINT:-true}"
PRECISION="${PRECISION:-fp16}"
UNIVERSAL_CHECKPOINT="${UNIVERSAL_CHECKPOINT:-false}"

NAME="gpt-${MODEL_SIZE}B-lr-${LR}-minlr-${MIN_LR}-bs-${GLOBAL_BATCH_SIZE}-gpus-${NUM_GPUS}-mp-${MP_SIZE}-pp-${PP_SIZE}"
(( EP_SIZE <= 1 )) || NAME="${NAME}-ep-${EP_SIZE}-mlc-${MLC}-cap-${MOE_TRAIN_CAP_FACTOR}-drop-${MOE_DROP_TOKEN}"
[[ "${CL_ENABLED}" != true ]] || NAME="${NAME}-cl-${CL_START_SEQLEN}-${CL_STEP}"
OUTPUT_BASEPATH="${OUTPUT_BASEPATH:-${PWD}/output}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-${OUTPUT_BASEPATH}/tensorboard/${NAME}_${HOSTNAME:-host}_$(date +%Y.%m.%d-%H.%M.%S)}"
CHECKPOINT_PATH="${CHECKPOINT_PATH:-${OUTPUT_BASEPATH}/checkpoint/${NAME}}"
LOAD_PATH="${LOAD_PATH:-${CHECKPOINT_PATH}}"
LOG_FILE="${LOG_FILE:-${OUTPUT_BASEPATH}/log/${NAME}.log}"
mkdir -p "${TENSORBOARD_DIR}" "${CHECKPOINT_PATH}" "$(dirname "${LOG_FILE}")"

if [[ -z "${DATA_PATH:-}" ]]; then   # offline: the built-in corpus and a GPT-2 BPE trained on it
    mapfile -t SAMPLE < <("${PYTHON}" "${REPO}/tools/prepare_sample_data.py" --output-dir "${OUTPUT_BASEPATH}/data" \
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
    --tensor-model-parallel-size "${MP_SIZE}" --moe-expert-parallel-size "${EP_PARALLEL_SIZE}"
    --num-experts "${EP_SIZE}" --moe-loss-coeff "${MLC}" --moe-train-capacity-factor "${MOE_TRAIN_CAP_FACTOR}"
    --moe-eval-capacity-factor "${MOE_EVAL_CAP_FACTOR}" --moe-min-capacity "${MOE_MIN_CAP}"
    --init-method-std "${INIT_STD}" --lr-decay-tokens "${LR_DECAY_TOKENS}" --lr-warmup-tokens "${WARMUP_TOKENS}"
    --micro-batch-size "${BATCH_SIZE}" --exit-duration-in-mins "${EXIT_DURATION}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}" --num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN_SIZE}"
    --num-attention-heads "${NUM_ATTN_HEADS}" --seq-length "${SEQ_LEN}" --max-position-embeddings "${SEQ_LEN}"
    --train-tokens "${TRAIN_TOKENS}" --train-iters "${TRAIN_ITERS}" --lr "${LR}" --min-lr "${MIN_LR}"
    --lr-decay-style cosine --split 98,2,0 --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}"
    --eval-iters "${EVAL_ITERS}" --save-interval "${SAVE_INTERVAL}" --weight-decay 0.1 --clip-grad 1.0
    --hysteresis 2 --num-workers 0
)
case "${PRECISION}" in
    fp16) megatron_options+=(--fp16) ;;
    bf16) megatron_options+=(--bf16) ;;
    fp32) ;;
    *) echo "error: PRECISION must be fp16, bf16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
megatron_options+=(
    --load "${LOAD_PATH}" --save "${CHECKPOINT_PATH}" --tensorboard-queue-size 1 --log-timers-to-tensorboard
    --log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard --tensorboard-dir "${TENSORBOARD_DIR}"
    # Upstream's defaults for these two differ from this repo's (top-2, every layer): pass them.
    --topk 1 --expert-interval 2
)
[[ "${ACTIVATION_CHECKPOINT}" != true ]] || megatron_options+=(--checkpoint-activations)
(( EP_SIZE <= 1 )) || megatron_options+=(--create-moe-param-group)
[[ "${MOE_DROP_TOKEN}" != false ]] || megatron_options+=(--disable-moe-token-dropping)
[[ "${UNIVERSAL_CHECKPOINT}" != true ]] || megatron_options+=(--universal-checkpoint)

# upstream's ds_config_gpt_TEMPLATE.json, filled in as its sed calls do (ZeRO 0, prescaled gradients)
config_json="${OUTPUT_BASEPATH}/ds_config_gpt_${NAME}.json"
cat > "${config_json}" <<JSON
{
  "train_batch_size": ${GLOBAL_BATCH_SIZE},
  "train_micro_batch_size_per_gpu": ${BATCH_SIZE},
  "steps_per_print": ${LOG_INTERVAL},
  "zero_optimization": {"stage": 0},
  "gradient_clipping": 1.0,
  "prescale_gradients": true,
  "fp16": {"enabled": $([[ ${PRECISION} == fp16 ]] && echo true || echo false), "loss_scale": 0,
           "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 11},
  "bf16": {"enabled": $([[ ${PRECISION} == bf16 ]] && echo true || echo false)},
  "curriculum_learning": {"enabled": ${CL_ENABLED}, "curriculum_type": "seqlen",
                          "min_difficulty": ${CL_START_SEQLEN}, "max_difficulty": ${SEQ_LEN},
                          "schedule_type": "fixed_linear",
                          "schedule_config": {"total_curriculum_step": ${CL_STEP}, "difficulty_step": 8}},
  "wall_clock_breakdown": false
}
JSON

deepspeed_options=(--deepspeed --deepspeed_config "${config_json}" --pipeline-model-parallel-size "${PP_SIZE}")
(( EP_SIZE <= 1 )) || deepspeed_options+=(--no-pipeline-parallel)
[[ "${ACTIVATION_CHECKPOINT}" != true ]] || deepspeed_options+=(--deepspeed-activation-checkpointing)

# torchrun in place of upstream's `deepspeed` launcher (pretrain_gpt.py takes either).
cd "${REPO}"
set -o pipefail
"${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NUM_GPUS}" pretrain_gpt.py \
    "${megatron_options[@]}" "${data_options[@]}" "${deepspeed_options[@]}" 2>&1 | tee "${LOG_FILE}"
