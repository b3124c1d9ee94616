"""Upstream Megatron-DeepSpeed's universal-checkpointing command lines, run here at tiny size.

The functions below rebuild the ``options`` and the ``ds_config.json`` of upstream's
``examples_deepspeed/universal_checkpointing/megatron_gpt/run_{bf16,fp16}.sh``,
``run_universal_{bf16,fp16}.sh`` and ``llama/run_{,universal_}llama_bf16.sh``: the same
flags in the same order, with only paths and sizes changed (model size, parallel degrees,
iterations, batch, eval iterations), and one substitution: ``--distributed-backend nccl``
becomes ``gloo`` because these tests run on CPUs. Upstream's bf16 GPT pair also resumes
with another global batch (16 -> 4), which would end the curve comparison, so both halves
use one batch size here. Each case trains (saving at SAVE), converts with the flags of
DeepSpeed's ``ds_to_universal.py``, resumes on another layout from the universal
checkpoint, and checks the loss curve continues, under ``torchrun`` or the deepspeed
launcher's per-rank environment and ``--local_rank``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.testing.launchers import REPO, deepspeed_style, torchrun

LAYERS, HIDDEN, HEADS, SEQ = 2, 64, 4, 32
TRAIN_ITERS, SAVE, EXIT_INTERVAL = 1000, 3, 6  # the LR schedule spans TRAIN_ITERS; the run stops at EXIT_INTERVAL
GLOBAL_BATCH = 4


def prepare_data(folder: Path, tokenizer: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_sample_data.py"), "--output-dir", str(folder),
                          "--tokenizer", tokenizer, "--num-docs", "300", "--vocab-size", "400", "--seed", "1",
                          "--print-args"], capture_output=True, text=True, check=True, cwd=REPO).stdout.split("\n")
    flags = [line for line in out if line]
    return dict(zip(flags[0::2], flags[1::2]))


def gpt_ds_config(dtype: str, global_batch: int, micro: int, zero: int) -> dict:
    """The heredoc of upstream's megatron_gpt scripts."""
    config = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro, "steps_per_print": 1,
              "zero_optimization": {"stage": zero}, "bf16": {"enabled": dtype == "bf16"}}
    if dtype == "bf16":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    else:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 50, "hysteresis": 2,
                          "min_loss_scale": 1, "initial_scale_power": 12}
    config["wall_clock_breakdown"] = False
    return config


def gpt_options(dtype: str, tp: int, pp: int, dp: int, save: Path, load: Path, tb: Path, data: dict,
                config: Path, universal: bool, zero: int = 1) -> list[str]:
    """Upstream's megatron_gpt/run_{dtype}.sh (universal=False) or run_universal_{dtype}.sh options."""
    sp = 1
    micro = GLOBAL_BATCH // (tp * pp * dp * sp)  # upstream: MICRO_BATCH=$((GLOBAL_BATCH/WORLD_SIZE))
    options = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--ds-sequence-parallel-size", str(sp), "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
        "--num-attention-heads", str(HEADS), "--seq-length", str(SEQ), "--loss-scale", "12",
        "--max-position-embeddings", str(SEQ), "--micro-batch-size", str(micro),
        "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", str(TRAIN_ITERS), "--lr", "6.0e-3",
        "--min-lr", "6.0e-4", "--lr-decay-style", "cosine", "--log-interval", "1", "--eval-iters", "2",
        "--eval-interval", "10", "--data-path", data["--data-path"], "--vocab-file", data["--vocab-file"],
        "--merge-file", data["--merge-file"], "--save-interval", str(SAVE), "--split", "98,2,0",
        "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--init-method-std", "0.006", f"--{dtype}", "--checkpoint-activations",
        "--exit-interval", str(EXIT_INTERVAL), "--save", str(save), "--load", str(load),
        "--make-vocab-size-divisible-by", "256",
    ]
    if universal:
        options.append("--universal-checkpoint")
    options += ["--tensorboard-dir", str(tb)]
    options += ["--deepspeed", f"--deepspeed_config={config}", f"--zero-stage={zero}",
                "--deepspeed-activation-checkpointing"]
    config.write_text(json.dumps(gpt_ds_config(dtype, GLOBAL_BATCH, micro, zero), indent=2))
    return options


def llama_options(tp: int, pp: int, dp: int, save: Path, load: Path, tb: Path, data: dict, config: Path,
                  universal: bool, zero: int = 1) -> list[str]:
    """Upstream's llama/run_llama_bf16.sh (universal=False) or run_universal_llama_bf16.sh options,
    with activation_checkpoint="false" as upstream ships them."""
    sp = 1
    micro = GLOBAL_BATCH // (tp * pp * dp * sp)
    ds_args = [f"--zero-stage={zero}", f"--deepspeed_config={config}", "--deepspeed"]
    options = [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--ds-sequence-parallel-size", str(sp), "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
        "--ffn-hidden-size", str(172), "--num-attention-heads", str(HEADS), "--micro-batch-size", str(micro),
        "--global-batch-size", str(GLOBAL_BATCH), "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--train-iters", str(TRAIN_ITERS), "--save", str(save), "--load", str(load),
        "--data-path", data["--data-path"], "--data-impl", "mmap", "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", data["--tokenizer-model"], "--split", "949,50,1",
        "--distributed-backend", "gloo",  # upstream: nccl
        "--lr", "3e-4", "--lr-decay-style", "cosine", "--min-lr", "3e-5", "--weight-decay", "0.1",
        "--clip-grad", "1", "--lr-warmup-iters", "2", "--optimizer", "adam", "--adam-beta1", "0.9",
        "--adam-beta2", "0.95", "--log-interval", "1", "--save-interval", str(SAVE), "--eval-interval", "10",
        "--eval-iters", "2", "--exit-interval", str(EXIT_INTERVAL), "--bf16", "--no-query-key-layer-scaling",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--use-rotary-position-embeddings",
        "--untie-embeddings-and-output-weights", "--swiglu", "--normalization", "rmsnorm", "--disable-bias-linear",
        "--tensorboard-dir", str(tb),
    ]
    if universal:
        options.append("--universal-checkpoint")
    config.write_text(json.dumps({"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": micro,
                                  "steps_per_print": 1, "zero_optimization": {"stage": zero},
                                  "bf16": {"enabled": True}, "wall_clock_breakdown": False}, indent=2))
    return options + ds_args


# (model, dtype, launcher, (TP, PP, DP) of the training run, (TP, PP, DP) of the resumed run)
CASES = [
    ("gpt", "bf16", "torchrun", (1, 2, 1), (2, 1, 1)),
    ("gpt", "fp16", "deepspeed", (2, 1, 1), (1, 1, 2)),
    ("llama", "bf16", "deepspeed", (1, 1, 2), (2, 1, 1)),
]


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("model,dtype,launcher,train_layout,resume_layout", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_upstream_ucp_scripts_train_convert_resume_and_continue(tmp_path: Path, model: str, dtype: str,
                                                                 launcher: str, train_layout, resume_layout) -> None:
    data = prepare_data(tmp_path / "dataset", "gpt2bpe" if model == "gpt" else "sentencepiece")
    launch = torchrun if launcher == "torchrun" else deepspeed_style
    exp = tmp_path / "z1_uni_ckpt"
    run_dir = {layout: exp / "checkpoints" / model / "z1" / dtype / "tp{}_pp{}_dp{}_sp1_toy".format(*layout)
               for layout in (train_layout, resume_layout)}
    tb = {"save": exp / "tensorboard" / "save", "resume": exp / "tensorboard" / "uni_load"}
    build = gpt_options if model == "gpt" else llama_options
    extra = (dtype,) if model == "gpt" else ()

    # Step 1: train; --load points at the folder it saves into, which does not exist yet (as upstream).
    ckpt = run_dir[train_layout]
    opts = build(*extra, *train_layout, ckpt, ckpt, tb["save"], data, tmp_path / "ds_config.json", False)
    log = _ok(launch(train_layout[0] * train_layout[1] * train_layout[2], opts), "training")
    if dtype == "fp16":
        assert "--loss-scale 12 is not used" in log
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [f"global_step{SAVE}", f"global_step{EXIT_INTERVAL}"]

    # Step 2: convert with ds_to_universal.py's flags.
    _ok(subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_universal.py"),
                        "--input_folder", str(ckpt / f"global_step{SAVE}"),
                        "--output_folder", str(ckpt / f"global_step{SAVE}_universal"),
                        "--num_extract_workers", "2", "--num_merge_workers", "1", "--no-progress"],
                       capture_output=True, text=True, cwd=REPO), "conversion")
    assert (ckpt / "latest_universal").read_text().strip() == f"global_step{SAVE}_universal"

    # Step 3: resume from the universal checkpoint on another layout.
    opts = build(*extra, *resume_layout, run_dir[resume_layout], ckpt, tb["resume"], data,
                 tmp_path / "ds_config.json", True)
    log = _ok(launch(resume_layout[0] * resume_layout[1] * resume_layout[2], opts), "resumed training")
    assert f"(universal) at iteration {SAVE}" in log

    # The continuity check, at the tolerance of the precision.
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_loss_curves.py"), "--reference",
                           str(tb["save"]), "--resumed", str(tb["resume"]), "--precision", dtype,
                           "--resume-iteration", str(SAVE)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and f"over {EXIT_INTERVAL - SAVE} iterations" in proc.stdout
