"""DeepSpeed import: real DeepSpeed engines (CPU, gloo) train a model under Megatron-DeepSpeed's
parameter names and save; the import must hold DeepSpeed's master weights and, resumed on another
layout, reproduce the losses DeepSpeed itself went on to log. ``deepspeed`` is a test extra
(pip install -e ".[test]"); the engines run in forked workers."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron.checkpointing import CheckpointReader
from megatron.interop.canonical import read_tensors
from megatron.model.config import ModelConfig
from megatron.testing.deepspeed_engine import deepspeed_checkpoint, qkv_rows
from megatron.testing.training import TINY_GPT, train_losses
from tools import convert_to_universal as cli

FLAGS = ["--train-iters", "4", "--lr-decay-style", "constant"]
LLAMA = ("--num-layers 2 --hidden-size 64 --num-attention-heads 8 --num-key-value-heads 4 "
         "--ffn-hidden-size 128 --seq-length 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --mock-data "
         "--vocab-size 97 --hidden-dropout 0 --attention-dropout 0 --log-interval 1000 --swiglu "
         "--normalization rmsnorm --position-embedding-type rope --untie-embeddings-and-output-weights "
         "--disable-bias-linear").split()


def _import(src: Path, out: Path, *extra: str) -> None:
    assert cli.main(["--input-format", "deepspeed", "--input_folder", str(src), "--output_folder", str(out),
                     *extra]) == 0


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def gpt_zero1(tmp_path_factory) -> tuple[Path, list[float]]:
    """GPT, ZeRO-1, TP1 DP2, saved after 2 of 4 steps; DeepSpeed's 4 losses."""
    folder = tmp_path_factory.mktemp("ds_gpt")
    losses = deepspeed_checkpoint(str(folder), 2, TINY_GPT + FLAGS, {"zero_optimization": {"stage": 1}}, 2, 4)
    return folder, losses


def test_deepspeed_engine_runs_our_math(gpt_zero1) -> None:
    """The harness is sound: DeepSpeed training the renamed model logs our uninterrupted losses."""
    _, ds = gpt_zero1
    assert _relative(ds, train_losses(2, TINY_GPT + FLAGS)) < 1e-6


def test_zero1_import_holds_deepspeed_master_weights_and_resumes_at_tp2(gpt_zero1, tmp_path: Path) -> None:
    folder, ds = gpt_zero1
    _import(folder / "global_step2", tmp_path / "ckpt" / "global_step2_universal")
    ours = read_tensors(CheckpointReader(str(tmp_path / "ckpt" / "global_step2_universal")),
                        ("fp32", "exp_avg", "exp_avg_sq"))
    expected = load_file(str(folder / "global_step2" / "expected_fp32_tp0.safetensors"))
    prefix = "language_model.encoder.layers.1.self_attention.query_key_value"
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16)
    ours_qkv = torch.cat([ours[f"layers.1.attention.{n}.weight"]["fp32"] for n in "qkv"])
    assert torch.equal(ours_qkv[qkv_rows(cfg, "grouped", 1)], expected[f"{prefix}.weight"])
    assert torch.equal(ours["embedding.word_embeddings.weight"]["fp32"],
                       expected["language_model.embedding.word_embeddings.weight"][:97])
    assert torch.equal(ours["layers.0.mlp.fc2.weight"]["fp32"],
                       expected["language_model.encoder.layers.0.mlp.dense_4h_to_h.weight"])
    assert float(ours["layers.0.mlp.fc1.weight"]["exp_avg_sq"].min()) > 0, "Adam's moments must be imported"
    resumed = train_losses(2, TINY_GPT + FLAGS + ["--load", str(tmp_path / "ckpt"), "--universal-checkpoint",
                                                  "--tensor-model-parallel-size", "2"])
    assert _relative(resumed, ds[2:]) < 1e-5, (resumed, ds)


def test_llama_gqa_tp2_zero3_blocked_import_resumes_at_tp1_pp2(tmp_path: Path) -> None:
    """Fused q/k/v and gate/up are laid out per TP rank: a TP change must not scramble them."""
    src = tmp_path / "ds"
    argv = LLAMA + FLAGS
    ds = deepspeed_checkpoint(str(src), 4, argv + ["--tensor-model-parallel-size", "2"],
                              {"zero_optimization": {"stage": 3}}, 2, 4, qkv_layout="blocked")
    _import(src / "global_step2", tmp_path / "ckpt" / "global_step2_universal", "--qkv-layout", "blocked")
    resumed = train_losses(2, argv + ["--load", str(tmp_path / "ckpt"), "--universal-checkpoint",
                                      "--pipeline-model-parallel-size", "2"])
    assert _relative(resumed, ds[2:]) < 1e-5, (resumed, ds)
    # The other layout's reading of the same files is a different model: the flag matters.
    _import(src / "global_step2", tmp_path / "wrong" / "global_step2_universal", "--qkv-layout", "grouped")
    wrong = train_losses(1, argv + ["--load", str(tmp_path / "wrong"), "--universal-checkpoint"])
    assert _relative(wrong, ds[2:]) > 1e-3


def test_pipeline_module_pp2_dp2_import_resumes_at_tp2(tmp_path: Path) -> None:
    """Megatron-DeepSpeed's GPTModelPipe layout: layer_* files, optimizer partitions per stage, the tied
    embedding on the first and last stage."""
    src = tmp_path / "ds"
    argv = TINY_GPT + FLAGS
    ds = deepspeed_checkpoint(str(src), 4, argv + ["--pipeline-model-parallel-size", "2"],
                              {"zero_optimization": {"stage": 1}}, 2, 4, pipeline=True)
    assert _relative(ds, train_losses(1, argv)) < 1e-5, "the pipeline harness must run our math"
    assert (src / "global_step2" / "layer_01-model_states.pt").exists()
    _import(src / "global_step2", tmp_path / "ckpt" / "global_step2_universal")
    resumed = train_losses(2, argv + ["--load", str(tmp_path / "ckpt"), "--universal-checkpoint",
                                      "--tensor-model-parallel-size", "2"])
    assert _relative(resumed, ds[2:]) < 1e-5, (resumed, ds)


def test_bf16_zero2_import_holds_the_fp32_master(tmp_path: Path) -> None:
    src = tmp_path / "ds"
    deepspeed_checkpoint(str(src), 2, TINY_GPT + FLAGS + ["--bf16"],
                         {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, 1, 1)
    _import(src / "global_step1", tmp_path / "ckpt" / "global_step1_universal")
    ours = read_tensors(CheckpointReader(str(tmp_path / "ckpt" / "global_step1_universal")))
    expected = load_file(str(src / "global_step1" / "expected_fp32_tp0.safetensors"))
    assert torch.equal(ours["layers.0.mlp.fc1.weight"]["fp32"],
                       expected["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"])
    assert torch.equal(ours["final_norm.bias"]["fp32"], expected["language_model.encoder.final_layernorm.bias"])


def test_missing_optimizer_partition_is_refused(gpt_zero1, tmp_path: Path, capsys) -> None:
    folder, _ = gpt_zero1
    src = tmp_path / "global_step2"
    shutil.copytree(folder / "global_step2", src)
    os.remove(src / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert cli.main(["--input-format", "deepspeed", "--input_folder", str(src),
                     "--output_folder", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "saved by 2 data-parallel ranks but 1 optimizer files" in err and str(src) in err
    assert not (tmp_path / "out").exists()


class _Payload:  # an arbitrary class: unpickling it would run code of the file's choosing
    pass


def test_pickle_with_other_classes_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "global_step1"
    src.mkdir()
    torch.save({"module": {}, "args": _Payload()}, src / "mp_rank_00_model_states.pt")
    assert cli.main(["--input-format", "deepspeed", "--input_folder", str(src),
                     "--output_folder", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt" in err and "_Payload" in err and "allowed" in err
