"""The user's workflow: training on a preprocessed corpus, and smoke runs of the example scripts.

Each example script runs for real (torchrun, gloo, the built-in corpus and a tokenizer
trained on it) with a tiny model and 4 iterations, and must exit 0 and leave what it
says it wrote: checkpoints, ``latest_universal``, TensorBoard events, the PNG plot, and a
PASS line from the loss-curve comparison.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.arguments import parse_args
from megatron.data.tokenizers import build_tokenizer
from megatron.testing.training import train_losses

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples_deepspeed" / "universal_checkpointing"
sys.path.insert(0, str(REPO / "tools"))

import prepare_sample_data  # noqa: E402  (tools/prepare_sample_data.py)

TRAIN_ITERS, SAVE_ITERS = 4, 2
# Every variable the scripts read that matters here, so the caller's environment cannot leak in.
TINY_ENV = {
    "NUM_LAYERS": "2", "HIDDEN": "32", "HEADS": "4", "KV_HEADS": "2", "SEQ": "32", "MBS": "2", "GBS": "4",
    "TRAIN_ITERS": str(TRAIN_ITERS), "SAVE_ITERS": str(SAVE_ITERS),
    "LOG_INTERVAL": "1",
    "NUM_DOCS": "300", "TOKENIZER_VOCAB": "400", "DEVICE": "cpu", "ZERO_STAGE": "1", "EXTRA_ARGS": "",
    "WARMUP_ITERS": "1",  # the LR warmup must end before the 4-iteration decay does
}
LAYOUT_VARS = ("TP", "PP", "DP", "RESUME_TP", "RESUME_PP", "RESUME_DP", "RESUME_ZERO_STAGE", "PRECISION",
               "TOLERANCE", "DATA_PATH", "TOKENIZER_TYPE", "PLOT", "FFN_HIDDEN")
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--hidden-dropout", "0",
              "--attention-dropout", "0", "--log-interval", "100"]


def run_script(script: str, output: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARS}
    full_env.update(TINY_ENV, OUTPUT=str(output), **env)
    return subprocess.run(["bash", str(EXAMPLES / script)], env=full_env, capture_output=True, text=True,
                          timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def claimed_paths(stdout: str) -> list[Path]:
    """Every path the script's ``[ucp]`` lines say it wrote, with ``{a,b}`` expanded."""
    paths = []
    for line in stdout.splitlines():
        if not line.startswith("[ucp]"):
            continue
        for token in (t.rstrip(",") for t in re.findall(r"(?<![\w/.])/[^\s()]+", line)):
            brace = re.search(r"\{([^}]*)\}", token)
            options = brace.group(1).split(",") if brace else [""]
            paths += [Path(token[:brace.start()] + o + token[brace.end():]) if brace else Path(token) for o in options]
    return paths


def assert_reference_run(output: Path, stdout: str) -> None:
    ckpt = output / "checkpoints"
    for step in (SAVE_ITERS, TRAIN_ITERS):
        assert (ckpt / f"global_step{step}" / "manifest.json").is_file()
    assert (ckpt / "latest").read_text().strip() == f"global_step{TRAIN_ITERS}"
    assert list((output / "tensorboard" / "reference").glob("events.out.tfevents.*"))
    assert (output / "checkpoints") in claimed_paths(stdout)


def assert_resumed_run(output: Path, stdout: str) -> None:
    ckpt = output / "checkpoints"
    universal = ckpt / f"global_step{SAVE_ITERS}_universal"
    assert (ckpt / "latest_universal").read_text().strip() == universal.name
    assert json.loads((universal / "manifest.json").read_text())["kind"] == "universal"
    assert (output / "checkpoints_resumed" / f"global_step{TRAIN_ITERS}" / "manifest.json").is_file()
    resumed_tb = output / "tensorboard" / "resumed"
    assert list(resumed_tb.glob("events.out.tfevents.*"))
    logged = [json.loads(line)["iteration"] for line in (resumed_tb / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == list(range(SAVE_ITERS + 1, TRAIN_ITERS + 1))  # continued, not restarted
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.rstrip().splitlines()[-1].startswith("PASS")
    paths = claimed_paths(stdout)
    assert universal in paths and output / "loss_curves.png" in paths
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]


# ---------------------------------------------------------------- real data in training

@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> list[str]:
    return prepare_sample_data.prepare(str(tmp_path_factory.mktemp("data")), num_docs=300, seed=1234,
                                       tokenizer="gpt2bpe", vocab_size=400)


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def test_prepared_data_is_reused_not_rebuilt(sample_data: list[str], tmp_path: Path) -> None:
    data_dir = os.path.dirname(_flag(sample_data, "--data-path"))
    before = os.stat(_flag(sample_data, "--data-path") + ".bin").st_mtime_ns
    again = prepare_sample_data.prepare(data_dir, num_docs=300, seed=1234, tokenizer="gpt2bpe", vocab_size=400)
    assert again == sample_data
    assert os.stat(_flag(sample_data, "--data-path") + ".bin").st_mtime_ns == before


def test_training_on_a_preprocessed_corpus_uses_the_tokenizers_vocab(sample_data: list[str],
                                                                      tmp_path: Path) -> None:
    losses = train_losses(1, TINY_MODEL + sample_data + ["--save", str(tmp_path / "ckpt")])
    manifest = json.loads((tmp_path / "ckpt" / "global_step3" / "manifest.json").read_text())
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=_flag(sample_data, "--vocab-file"),
                                merge_file=_flag(sample_data, "--merge-file"))
    assert manifest["state"]["model_config"]["vocab_size"] == tokenizer.vocab_size
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_huggingface_tokenizer_directory_trains_like_its_gpt2bpe_files(sample_data: list[str],
                                                                        tmp_path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer(_flag(sample_data, "--vocab-file"), _flag(sample_data, "--merge-file"))
    PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="<|endoftext|>").save_pretrained(
        str(tmp_path / "hf"))
    data = ["--data-path", _flag(sample_data, "--data-path")]
    hf = train_losses(1, TINY_MODEL + data + ["--tokenizer-type", "HuggingFaceTokenizer",
                                              "--tokenizer-path", str(tmp_path / "hf")])
    assert hf == train_losses(1, TINY_MODEL + sample_data)  # same vocabulary, same model, same losses


def test_data_path_without_tokenizer_type_is_refused() -> None:
    with pytest.raises(ValueError, match="--tokenizer-type"):
        parse_args(TINY_MODEL + ["--data-path", "corpus_text_document"], 1)


# ---------------------------------------------------------------- example scripts

def test_tiny_example_ends_with_pass_and_a_plot(tmp_path: Path) -> None:
    stdout = ok(run_script("tiny_example.sh", tmp_path))
    assert_reference_run(tmp_path, stdout)
    assert_resumed_run(tmp_path, stdout)
    assert "tolerance 1e-04" in stdout  # fp32 by default, compared at 1e-4
    assert "on TP=2 PP=1 DP=1" in stdout and "on TP=1 PP=1 DP=2" in stdout


@pytest.mark.parametrize("train,resume,layouts,own_data", [
    ("megatron_gpt/run_bf16.sh", "megatron_gpt/run_universal_bf16.sh",
     dict(TP="1", PP="2", DP="1", RESUME_TP="1", RESUME_PP="1", RESUME_DP="1"), False),
    ("megatron_gpt/run_fp16.sh", "megatron_gpt/run_universal_fp16.sh",
     dict(TP="1", PP="1", DP="2", ZERO_STAGE="2", RESUME_TP="2", RESUME_PP="1", RESUME_DP="1",
          RESUME_ZERO_STAGE="0"), True),
    ("llama/run_llama_bf16.sh", "llama/run_universal_llama_bf16.sh",
     dict(TP="2", PP="1", DP="1", RESUME_TP="1", RESUME_PP="1", RESUME_DP="2"), False),
])
def test_train_then_universal_resume_scripts_pass(tmp_path: Path, sample_data: list[str], train: str, resume: str,
                                                  layouts: dict[str, str], own_data: bool) -> None:
    env = dict(layouts)
    if own_data:  # DATA_PATH and the tokenizer files given: nothing is generated
        env.update(DATA_PATH=_flag(sample_data, "--data-path"), TOKENIZER_TYPE="GPT2BPETokenizer",
                   VOCAB_FILE=_flag(sample_data, "--vocab-file"), MERGE_FILE=_flag(sample_data, "--merge-file"))
    stdout = ok(run_script(train, tmp_path, **env))
    assert_reference_run(tmp_path, stdout)
    stdout = ok(run_script(resume, tmp_path, **env))
    assert_resumed_run(tmp_path, stdout)
    assert (tmp_path / "data").exists() != own_data


def test_universal_script_without_a_training_run_names_the_missing_checkpoint(tmp_path: Path) -> None:
    proc = run_script("megatron_gpt/run_universal_bf16.sh", tmp_path)
    assert proc.returncode == 2
    assert f"no checkpoint {tmp_path}/checkpoints/global_step{SAVE_ITERS}" in proc.stderr
