# Shared logic of the universal-checkpointing example scripts. Source it, do not run it.
#
# A script sets UCP_RUN_NAME (its default output folder under ./runs), UCP_MODEL (gpt or
# llama) and its default PRECISION, sources this file, then calls the steps it needs:
#   ucp_train    train on TP x PP x DP to TRAIN_ITERS, saving at SAVE_ITERS (the reference run)
#   ucp_convert  tools/convert_to_universal.py on the SAVE_ITERS checkpoint
#   ucp_resume   resume from the universal checkpoint on RESUME_TP x RESUME_PP x RESUME_DP
#   ucp_compare  run_tb_analysis.sh: resumed curve against the reference curve, PNG plot
# Every setting is an environment variable; README.md in this folder lists them.

UCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UCP_REPO="$(cd "${UCP_DIR}/../.." && pwd)"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # torchrun's own default, without its warning

# The reference run's layout, and the layout the universal checkpoint is resumed on.
TP="${TP:-2}"
PP="${PP:-2}"
ZERO_STAGE="${ZERO_STAGE:-1}"
RESUME_TP="${RESUME_TP:-1}"
RESUME_PP="${RESUME_PP:-1}"
RESUME_ZERO_STAGE="${RESUME_ZERO_STAGE:-${ZERO_STAGE}}"
DEVICE="${DEVICE:-auto}"   # auto: CUDA + NCCL when torch sees GPUs, else CPU + gloo

# Model (tiny by default so 8 gloo processes on 2 CPU cores finish in minutes).
NUM_LAYERS="${NUM_LAYERS:-4}"
HIDDEN="${HIDDEN:-64}"
HEADS="${HEADS:-4}"
KV_HEADS="${KV_HEADS:-2}"   # llama only: grouped-query attention
SEQ="${SEQ:-64}"
FFN_HIDDEN="${FFN_HIDDEN:-}"   # empty: the model's default (4 x HIDDEN, or Megatron's SwiGLU size)

# Training.
MBS="${MBS:-1}"
GBS="${GBS:-8}"
TRAIN_ITERS="${TRAIN_ITERS:-40}"
SAVE_ITERS="${SAVE_ITERS:-20}"
LR="${LR:-3e-3}"
MIN_LR="${MIN_LR:-3e-4}"
WARMUP_ITERS="${WARMUP_ITERS:-4}"
SEED="${SEED:-1234}"
LOG_INTERVAL="${LOG_INTERVAL:-5}"
EVAL_INTERVAL="${EVAL_INTERVAL:-${SAVE_ITERS}}"
EVAL_ITERS="${EVAL_ITERS:-2}"
EXTRA_ARGS="${EXTRA_ARGS:-}"   # more pretrain_gpt.py flags, split on spaces
case "${PRECISION}" in
    bf16 | fp16 | fp32) ;;   # run_tb_analysis.sh picks the comparison TOLERANCE from it
    *) echo "error: PRECISION must be bf16, fp16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
INITIAL_LOSS_SCALE="${INITIAL_LOSS_SCALE:-4096}"   # fp16 only

# Where everything goes.
OUTPUT="${OUTPUT:-runs/${UCP_RUN_NAME}}"
mkdir -p "${OUTPUT}"
OUTPUT="$(cd "${OUTPUT}" && pwd)"
CKPT_DIR="${OUTPUT}/checkpoints"
RESUMED_CKPT_DIR="${OUTPUT}/checkpoints_resumed"
TB_REFERENCE="${OUTPUT}/tensorboard/reference"
TB_RESUMED="${OUTPUT}/tensorboard/resumed"
LOG_DIR="${OUTPUT}/logs"
PLOT="${PLOT:-${OUTPUT}/loss_curves.png}"
mkdir -p "${LOG_DIR}"

# GPUs when torch sees them (unless DEVICE=cpu); the default DP then fills them.
if [[ "${DEVICE}" == cpu ]]; then
    UCP_GPUS=0
else
    UCP_GPUS="$("${PYTHON}" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
fi
if (( UCP_GPUS > 0 )); then
    DP="${DP:-$(( UCP_GPUS / (TP * PP) > 0 ? UCP_GPUS / (TP * PP) : 1 ))}"
    RESUME_DP="${RESUME_DP:-$(( UCP_GPUS / (RESUME_TP * RESUME_PP) > 0 ? UCP_GPUS / (RESUME_TP * RESUME_PP) : 1 ))}"
else
    DP="${DP:-2}"
    RESUME_DP="${RESUME_DP:-2}"
fi

ucp_log() { echo "[ucp] $*"; }
ucp_die() { echo "[ucp] error: $*" >&2; exit 2; }

# Data: DATA_PATH (+ TOKENIZER_TYPE and its files) as given, else the built-in corpus,
# a tokenizer trained on it and its indexed dataset, all under OUTPUT/data (offline).
ucp_data_args() {
    if [[ -n "${DATA_PATH:-}" ]]; then
        [[ -n "${TOKENIZER_TYPE:-}" ]] || ucp_die "DATA_PATH needs TOKENIZER_TYPE (and VOCAB_FILE + MERGE_FILE, or TOKENIZER_MODEL)"
        # shellcheck disable=SC2206  # a blend 'W1 PREFIX1 W2 PREFIX2' is several words
        UCP_DATA_ARGS=(--data-path ${DATA_PATH} --tokenizer-type "${TOKENIZER_TYPE}")
        [[ -z "${VOCAB_FILE:-}" ]] || UCP_DATA_ARGS+=(--vocab-file "${VOCAB_FILE}")
        [[ -z "${MERGE_FILE:-}" ]] || UCP_DATA_ARGS+=(--merge-file "${MERGE_FILE}")
        [[ -z "${TOKENIZER_MODEL:-}" ]] || UCP_DATA_ARGS+=(--tokenizer-model "${TOKENIZER_MODEL}")
        [[ -z "${VOCAB_SIZE:-}" ]] || UCP_DATA_ARGS+=(--vocab-size "${VOCAB_SIZE}")
        return
    fi
    local tokenizer=gpt2bpe flags
    [[ "${UCP_MODEL}" == llama ]] && tokenizer=sentencepiece   # Llama's tokenizer kind
    ucp_log "data: the built-in corpus, a ${tokenizer} tokenizer trained on it and its indexed dataset in ${OUTPUT}/data"
    flags="$("${PYTHON}" "${UCP_REPO}/tools/prepare_sample_data.py" --output-dir "${OUTPUT}/data" \
        --tokenizer "${tokenizer}" --num-docs "${NUM_DOCS:-4000}" --vocab-size "${TOKENIZER_VOCAB:-1024}" \
        --seed "${SEED}" --print-args)"
    mapfile -t UCP_DATA_ARGS <<< "${flags}"
}

ucp_model_args() {
    UCP_MODEL_ARGS=(--num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN}" --num-attention-heads "${HEADS}"
                    --seq-length "${SEQ}" --max-position-embeddings "${SEQ}")
    [[ -z "${FFN_HIDDEN}" ]] || UCP_MODEL_ARGS+=(--ffn-hidden-size "${FFN_HIDDEN}")
    if [[ "${UCP_MODEL}" == llama ]]; then
        UCP_MODEL_ARGS+=(--num-key-value-heads "${KV_HEADS}" --normalization rmsnorm --swiglu
                         --position-embedding-type rope --untie-embeddings-and-output-weights
                         --disable-bias-linear)
    fi
}

# Flags shared by the reference and the resumed run. Dropout is off: its masks depend
# on the layout, so with it on no two layouts could produce the same curve.
ucp_common_args() {
    ucp_data_args
    ucp_model_args
    UCP_ARGS=("${UCP_MODEL_ARGS[@]}" "${UCP_DATA_ARGS[@]}"
              --micro-batch-size "${MBS}" --global-batch-size "${GBS}" --train-iters "${TRAIN_ITERS}"
              --lr "${LR}" --min-lr "${MIN_LR}" --lr-decay-style cosine --lr-warmup-iters "${WARMUP_ITERS}"
              --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0
              --seed "${SEED}" --split 949,50,1 --log-interval "${LOG_INTERVAL}"
              --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}" --device "${DEVICE}")
    case "${PRECISION}" in
        bf16) UCP_ARGS+=(--bf16) ;;
        fp16) UCP_ARGS+=(--fp16 --initial-loss-scale "${INITIAL_LOSS_SCALE}") ;;
        fp32) ;;
    esac
    # shellcheck disable=SC2206
    UCP_ARGS+=(${EXTRA_ARGS})
}

# ucp_launch TP PP DP LOG_FILE FLAGS...: one pretrain_gpt.py process per rank.
ucp_launch() {
    local tp=$1 pp=$2 dp=$3 log=$4
    shift 4
    local nproc=$(( tp * pp * dp ))
    (( GBS % (MBS * dp) == 0 )) || ucp_die "GBS=${GBS} is not divisible by MBS=${MBS} x DP=${dp}"
    if (( UCP_GPUS > 0 && nproc > UCP_GPUS )); then
        ucp_die "TP=${tp} x PP=${pp} x DP=${dp} needs ${nproc} GPUs, torch sees ${UCP_GPUS}: lower the sizes or set DEVICE=cpu"
    fi
    ucp_log "launching ${nproc} processes (TP=${tp} PP=${pp} DP=${dp}) on $( (( UCP_GPUS > 0 )) && echo "GPUs (nccl)" || echo "CPU (gloo)"); log: ${log}"
    (cd "${UCP_REPO}" && "${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${nproc}" \
        pretrain_gpt.py --tensor-model-parallel-size "${tp}" --pipeline-model-parallel-size "${pp}" "$@") \
        2>&1 | tee "${log}"
}

ucp_train() {
    (( SAVE_ITERS > 0 && SAVE_ITERS <= TRAIN_ITERS )) || ucp_die "SAVE_ITERS=${SAVE_ITERS} must be in [1, TRAIN_ITERS=${TRAIN_ITERS}]"
    ucp_common_args
    rm -rf "${CKPT_DIR}" "${TB_REFERENCE}"   # a fresh reference run, not a continuation of an old one
    ucp_log "step 1/3: train ${UCP_MODEL} (${PRECISION}) on TP=${TP} PP=${PP} DP=${DP} ZeRO-${ZERO_STAGE} to iteration ${TRAIN_ITERS}, saving every ${SAVE_ITERS}"
    ucp_launch "${TP}" "${PP}" "${DP}" "${LOG_DIR}/train.log" "${UCP_ARGS[@]}" --zero-stage "${ZERO_STAGE}" \
        --save "${CKPT_DIR}" --save-interval "${SAVE_ITERS}" --tensorboard-dir "${TB_REFERENCE}"
    ucp_log "checkpoints: ${CKPT_DIR} ($(cd "${CKPT_DIR}" && echo global_step*))"
    ucp_log "tensorboard: ${TB_REFERENCE}"
    ucp_log "log:         ${LOG_DIR}/train.log"
}

ucp_convert() {
    local native="${CKPT_DIR}/global_step${SAVE_ITERS}"
    [[ -f "${native}/manifest.json" ]] || ucp_die "no checkpoint ${native}: run the training script first with the same OUTPUT and SAVE_ITERS"
    ucp_log "step 2/3: convert ${native} to a universal checkpoint"
    "${PYTHON}" "${UCP_REPO}/tools/convert_to_universal.py" --input_folder "${native}" \
        --output_folder "${native}_universal" --no-progress 2>&1 | tee "${LOG_DIR}/convert.log"
    ucp_log "universal checkpoint: ${native}_universal (${CKPT_DIR}/latest_universal names it)"
}

ucp_resume() {
    (( SAVE_ITERS < TRAIN_ITERS )) || ucp_die "SAVE_ITERS=${SAVE_ITERS} must be below TRAIN_ITERS=${TRAIN_ITERS} to have iterations to resume"
    ucp_common_args
    rm -rf "${RESUMED_CKPT_DIR}" "${TB_RESUMED}"
    ucp_log "step 3/3: resume from ${CKPT_DIR}/$(cat "${CKPT_DIR}/latest_universal") on TP=${RESUME_TP} PP=${RESUME_PP} DP=${RESUME_DP} ZeRO-${RESUME_ZERO_STAGE} to iteration ${TRAIN_ITERS}"
    ucp_launch "${RESUME_TP}" "${RESUME_PP}" "${RESUME_DP}" "${LOG_DIR}/resume.log" "${UCP_ARGS[@]}" \
        --zero-stage "${RESUME_ZERO_STAGE}" --load "${CKPT_DIR}" --universal-checkpoint \
        --save "${RESUMED_CKPT_DIR}" --tensorboard-dir "${TB_RESUMED}"
    # A run that silently started from scratch would make the comparison meaningless.
    grep -q "resumed from .*(universal) at iteration ${SAVE_ITERS}" "${LOG_DIR}/resume.log" \
        || ucp_die "the resumed run did not start from the universal checkpoint at iteration ${SAVE_ITERS}; see ${LOG_DIR}/resume.log"
    ucp_log "checkpoints: ${RESUMED_CKPT_DIR}"
    ucp_log "tensorboard: ${TB_RESUMED}"
    ucp_log "log:         ${LOG_DIR}/resume.log"
}

# Exit status: 0 PASS, 1 FAIL (curves differ by more than TOLERANCE), 2 bad input.
ucp_compare() {
    ucp_log "compare: resumed run against the uninterrupted reference run (${PRECISION})"
    REF_DIR="${TB_REFERENCE}" RESUMED_DIR="${TB_RESUMED}" PLOT="${PLOT}" PRECISION="${PRECISION}" \
        RESUME_ITERATION="${SAVE_ITERS}" PYTHON="${PYTHON}" \
        bash "${UCP_DIR}/run_tb_analysis.sh" 2>&1 | tee "${LOG_DIR}/compare.log"
}

# Where everything is, then the comparison's verdict as the last line.
ucp_summary() {
    ucp_log "reference run:  checkpoints ${CKPT_DIR}, tensorboard ${TB_REFERENCE}"
    ucp_log "universal:      ${CKPT_DIR}/$(cat "${CKPT_DIR}/latest_universal")"
    ucp_log "resumed run:    checkpoints ${RESUMED_CKPT_DIR}, tensorboard ${TB_RESUMED}"
    ucp_log "logs:           ${LOG_DIR}/{train,convert,resume,compare}.log"
    ucp_log "plot:           ${PLOT}"
    grep -E '^(PASS|FAIL)' "${LOG_DIR}/compare.log"
}
