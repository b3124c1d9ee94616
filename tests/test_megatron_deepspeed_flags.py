"""Megatron-DeepSpeed users' flags and the silent failures of issue 18, each with its new error.

Flags upstream uses are accepted with their real meaning, or as documented no-ops, or
refused; an unknown flag names the closest one; configuration errors are one line from
rank 0 only; data with ids outside the vocabulary, a loss-curve comparison of a run with
itself, and a "resumed" run that did not resume all fail loudly.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from megatron.arguments import build_parser, parse_args
from megatron.data.gpt_dataset import build_gpt_datasets
from megatron.data.indexed_dataset import IndexedDatasetBuilder, index_file_path
from megatron.testing.training import TINY_GPT, train_losses

REPO = Path(__file__).resolve().parent.parent
STEPS = ["--train-iters", "3"]
TAG = "lm-loss-training/lm loss"


# --- flags ---------------------------------------------------------------------------------

def test_upstream_flags_are_accepted_with_their_meaning() -> None:
    args = parse_args(TINY_GPT + STEPS + [
        "--ds-sequence-parallel-size", "1", "--loss-scale", "12", "--checkpoint-activations",
        "--deepspeed-activation-checkpointing", "--data-impl", "mmap", "--optimizer", "adam",
        "--no-query-key-layer-scaling", "--rotary-position-embeddings-theta", "500000", "--local_rank=0",
        "--make-vocab-size-divisible-by", "256", "--init-method-std", "0.006"], 1)
    assert args.zero_stage == 1  # Megatron-DeepSpeed's default
    assert args.rotary_base == 500000.0 and args.loss_scale == 12.0 and args.local_rank == 0
    assert args.checkpoint_activations and args.apply_query_key_layer_scaling is False


def test_no_op_flags_say_so_in_help() -> None:
    helps = {s: a.help or "" for a in build_parser()._actions for s in a.option_strings}
    for flag in ("--data-impl", "--no-query-key-layer-scaling"):
        assert "no-op" in helps[flag], flag
    assert "not used" in helps["--loss-scale"]  # with --deepspeed, as upstream


@pytest.mark.parametrize("extra,message", [
    (["--ds-sequence-parallel-size", "2", "--tensor-model-parallel-size", "4"],
     "world size 2 is not divisible by --tensor-model-parallel-size 4 x --pipeline-model-parallel-size 1 x "
     "--ds-sequence-parallel-size 2"),
    (["--no-pipeline-parallel", "--pipeline-model-parallel-size", "2"], "--no-pipeline-parallel with"),
    (["--deepspeed-activation-checkpointing"], "does nothing alone"),
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-activations", "--recompute-method", "block"], "applies to --recompute-granularity full only"),
    (["--data-impl", "lazy"], "invalid choice: 'lazy'"),
])
def test_flags_that_would_change_training_are_refused(extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_args(TINY_GPT + STEPS + extra, 2)


def test_unknown_flag_suggests_the_closest_one() -> None:
    with pytest.raises(ValueError, match=r"--recompute-granulrity \(did you mean --recompute-granularity\?\)"):
        parse_args(TINY_GPT + STEPS + ["--recompute-granulrity", "full"], 1)


def _pretrain(argv: list[str], rank: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=120)


def test_configuration_error_is_one_line_from_rank_zero_only() -> None:
    bad = TINY_GPT + STEPS + ["--hidden-size", "30"]
    first = _pretrain(bad, "0")
    assert first.returncode == 2
    assert first.stderr.strip().splitlines() == [
        "error: --hidden-size 30 is not divisible by --num-attention-heads 4"]
    other = _pretrain(bad, "1")
    assert other.returncode == 2 and other.stderr.strip().startswith("error (rank 1): --hidden-size 30")
    debug = _pretrain(bad + ["--debug"], "0")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_local_rank_must_agree_with_the_environment(monkeypatch) -> None:
    from megatron.initialize import initialize_distributed
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="--local_rank 0 disagrees with the environment's LOCAL_RANK 1"):
        initialize_distributed("auto", "cpu", local_rank=0)


def test_static_loss_scale_without_deepspeed_is_applied() -> None:
    from megatron.core.optimizer.grad_scaler import loss_scaler_from_args
    scaler = loss_scaler_from_args(parse_args(TINY_GPT + STEPS + ["--fp16", "--loss-scale", "64"], 1))
    assert not scaler.dynamic and scaler.scale == 64.0


def test_sgd_is_layout_invariant_and_not_adam() -> None:
    sgd = ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--lr", "0.3", "--zero-stage", "1"]
    one = train_losses(1, TINY_GPT + STEPS + sgd)
    two = train_losses(2, TINY_GPT + STEPS + sgd)
    assert two == pytest.approx(one, rel=1e-5)
    adam = train_losses(1, TINY_GPT + STEPS + ["--lr", "0.3"])
    assert one[0] == pytest.approx(adam[0], rel=1e-6) and abs(one[2] - adam[2]) > 1e-4


# --- data --------------------------------------------------------------------------------

def test_token_id_outside_vocabulary_is_refused_when_the_dataset_opens(tmp_path: Path) -> None:
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in range(20):
        ids = [(doc * 7 + j) % 90 for j in range(30)]
        if doc == 13:
            ids[5] = 97  # vocabulary is 97 ids: 0..96
        builder.add_document(ids)
    builder.finalize(index_file_path(prefix))
    with pytest.raises(ValueError, match=r"corpus_text_document\.bin: token id 97 at sequence 13, position 5 "
                                         r"is outside the tokenizer's vocabulary of 97 ids"):
        build_gpt_datasets([prefix], "1,0,0", 8, 1, (10, 0, 0), vocab_size=97)
    assert build_gpt_datasets([prefix], "1,0,0", 8, 1, (10, 0, 0), vocab_size=98)[0] is not None


# --- loss-curve tool ----------------------------------------------------------------------

def _events(folder: Path, first: int, last: int) -> None:
    writer = SummaryWriter(log_dir=str(folder))
    for i in range(first, last + 1):
        writer.add_scalar(TAG, 5.0 / i, i)
    writer.close()


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "compare_loss_curves.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case,message", [
    ("same_folder", "are the same folder"),
    ("resumed_inside_reference", "read the same files"),
    ("copied_files", "byte-identical copy"),
    ("trained_from_scratch", "trained from the start, not from a checkpoint"),
    ("logged_before_resume_point", "at or before the resume point 10"),
    ("nothing_after_resume_point", "no iteration after the resume point"),
])
def test_comparison_that_cannot_mean_anything_is_refused(tmp_path: Path, case: str, message: str) -> None:
    ref, res = tmp_path / "tb" / "reference", tmp_path / "tb" / "resumed"
    _events(ref, 1, 20)
    extra: list[str] = []
    if case == "same_folder":
        res = ref
    elif case == "resumed_inside_reference":
        _events(res, 11, 20)
        ref = tmp_path / "tb"
    elif case == "copied_files":
        shutil.copytree(ref, res)
    elif case == "trained_from_scratch":
        _events(res, 1, 20)
    elif case == "logged_before_resume_point":
        _events(res, 5, 20)
        extra = ["--resume-iteration", "10"]
    elif case == "nothing_after_resume_point":
        _events(res, 21, 25)
    proc = _compare("--reference", str(ref), "--resumed", str(res), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "PASS" not in proc.stdout


def test_comparison_lists_the_files_of_each_side(tmp_path: Path) -> None:
    _events(tmp_path / "reference", 1, 20)
    _events(tmp_path / "resumed", 11, 20)
    proc = _compare("--reference", str(tmp_path / "reference"), "--resumed", str(tmp_path / "resumed"),
                    "--precision", "bf16")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("reference: 20 points (iterations 1..20) from 1 file(s):")
    assert str(tmp_path / "reference") in lines[1] and "tfevents" in lines[1]
    assert lines[2].startswith("resumed:   10 points (iterations 11..20) from 1 file(s):")
    assert "tolerance 3e-02" in proc.stdout


def test_run_tb_analysis_takes_upstreams_positional_output_path(tmp_path: Path) -> None:
    _events(tmp_path / "tensorboard" / "reference", 1, 20)
    _events(tmp_path / "tensorboard" / "resumed", 11, 20)
    env = {k: v for k, v in os.environ.items() if k not in ("OUTPUT", "REF_DIR", "RESUMED_DIR", "TOLERANCE")}
    proc = subprocess.run(["bash", str(REPO / "examples_deepspeed/universal_checkpointing/run_tb_analysis.sh"),
                           str(tmp_path)], capture_output=True, text=True, env={**env, "PRECISION": "fp32",
                                                                               "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and (tmp_path / "loss_curves.png").is_file()


# --- logs ------------------------------------------------------------------------------------

def _tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator
    tags: set[str] = set()
    for path in folder.glob("*tfevents*"):
        acc = event_accumulator.EventAccumulator(str(path))
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
    return tags


def test_tensorboard_tags_and_switches_are_megatron_deepspeeds(tmp_path: Path) -> None:
    base = TINY_GPT + ["--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1"]
    train_losses(1, base + ["--tensorboard-dir", str(tmp_path / "default")])
    default = _tags(tmp_path / "default")
    for tag in ("lm-loss-training/lm loss", "lm-loss-training/lm loss vs samples", "lm-loss-training/lm loss vs tokens",
                "learning-rate/learning-rate", "loss-scale/loss-scale", "grad-norm/grad-norm",
                "lm-loss-validation/lm loss validation", "steps-vs-samples/y=steps,x=samples"):
        assert tag in default, tag
    assert not any(t.startswith(("batch-size/", "world-size/", "iteration-time/")) or "ppl" in t for t in default)
    train_losses(1, base + ["--tensorboard-dir", str(tmp_path / "switched"), "--log-batch-size-to-tensorboard",
                            "--log-world-size-to-tensorboard", "--log-timers-to-tensorboard",
                            "--log-validation-ppl-to-tensorboard", "--no-log-learnig-rate-to-tensorboard",
                            "--no-log-loss-scale-to-tensorboard"])
    switched = _tags(tmp_path / "switched")
    assert {"batch-size/batch-size", "world-size/world-size", "iteration-time/iteration-time",
            "lm-loss-validation/lm loss validation ppl"} <= switched
    assert not any(t.startswith(("learning-rate/", "loss-scale/")) for t in switched)


def test_training_flops_follow_megatrons_formula() -> None:
    from megatron.flops import training_flops_per_iteration
    from megatron.model.config import ModelConfig
    # Llama-2-7B-like: 32 layers, hidden 4096, 32 heads, 8 KV heads, SwiGLU FFN 11008, seq 4096, vocab 32000.
    cfg = ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=32000, seq_length=4096, ffn_hidden_size=11008, swiglu=True)
    h, s, L, b = 4096, 4096, 32, 1
    by_hand = 12 * b * s * L * h * h * ((1 + 8 / 32 + s / h) + 11008 / h * 1.5 + 32000 / (2 * L * h))
    assert training_flops_per_iteration(cfg, b, 32000) == pytest.approx(by_hand, rel=1e-12)
    # Dense parameters x 6 x tokens is the usual estimate without the attention-score term.
    params = L * (h * h * (2 + 2 * 8 / 32) + 3 * h * 11008) + 32000 * h
    assert training_flops_per_iteration(cfg, b, 32000) == pytest.approx(6 * params * s + 12 * L * h * s * s, rel=1e-3)


# --- data tools ----------------------------------------------------------------------------

def test_preprocess_data_takes_upstreams_command_line(tmp_path: Path) -> None:
    """upstream README's preprocess command (paths changed): same output for any --workers/--partitions."""
    from megatron.data.indexed_dataset import IndexedDataset
    data = prepare_sample(tmp_path)
    outputs = []
    for workers, partitions in ((1, 1), (2, 3)):
        prefix = tmp_path / f"my-gpt2-{workers}"
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                               "--input", str(data["corpus"]), "--output-prefix", str(prefix),
                               "--vocab-file", data["--vocab-file"], "--dataset-impl", "mmap",
                               "--tokenizer-type", "GPT2BPETokenizer", "--merge-file", data["--merge-file"],
                               "--append-eod", "--workers", str(workers), "--partitions", str(partitions)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "docs/s" in proc.stdout
        outputs.append(Path(f"{prefix}_text_document.bin").read_bytes())
        assert len(IndexedDataset(f"{prefix}_text_document")) == 300
    assert outputs[0] == outputs[1]


def test_preprocess_split_sentences_without_nltk_data_is_a_clear_error(tmp_path: Path) -> None:
    data = prepare_sample(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(data["corpus"]),
                           "--output-prefix", str(tmp_path / "s"), "--vocab-file", data["--vocab-file"],
                           "--merge-file", data["--merge-file"], "--split-sentences", "--keep-newlines"],
                          capture_output=True, text=True, timeout=120)
    try:
        import nltk
        nltk.data.find("tokenizers/punkt/english.pickle")
    except (ImportError, LookupError):
        assert proc.returncode != 0 and "--split-sentences" in proc.stderr and "punkt" in proc.stderr
        assert not list(tmp_path.glob("s_*"))  # nothing half-written
    else:
        assert proc.returncode == 0 and (tmp_path / "s_text_sentence.idx").is_file()


def prepare_sample(folder: Path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_sample_data.py"), "--output-dir",
                          str(folder / "sample"), "--tokenizer", "gpt2bpe", "--num-docs", "300", "--vocab-size",
                          "300", "--seed", "1", "--print-args"], capture_output=True, text=True, check=True
                         ).stdout.split("\n")
    flags = [line for line in out if line]
    return {**dict(zip(flags[0::2], flags[1::2])), "corpus": folder / "sample" / "corpus.jsonl"}


def test_prefetching_loader_does_not_change_the_losses() -> None:
    argv = TINY_GPT + ["--train-iters", "4"]
    assert train_losses(1, argv + ["--num-workers", "2"]) == train_losses(1, argv + ["--num-workers", "0"])


def test_per_split_data_paths(tmp_path: Path) -> None:
    data = prepare_sample(tmp_path)
    tokenizer = ["--vocab-file", data["--vocab-file"], "--merge-file", data["--merge-file"]]
    base = [a for a in TINY_GPT if a not in ("--mock-data",)]
    base = base[:base.index("--vocab-size")] + base[base.index("--vocab-size") + 2:]
    prefix = data["--data-path"]
    split = train_losses(1, base + tokenizer + STEPS + ["--train-data-path", prefix, "--valid-data-path", prefix,
                                                        "--data-cache-path", str(tmp_path / "cache")])
    whole = train_losses(1, base + tokenizer + STEPS + ["--data-path", prefix, "--split", "1,0,0"])
    assert split == whole  # the train split is the whole prefix in both
    with pytest.raises(ValueError, match="not both"):
        parse_args(base + tokenizer + STEPS + ["--data-path", prefix, "--train-data-path", prefix], 1)
    with pytest.raises(ValueError, match="need --train-data-path"):
        parse_args(base + tokenizer + STEPS + ["--valid-data-path", prefix], 1)
