"""BLOOM-style models (ALiBi, embedding LayerNorm, tanh GeLU): slopes as BLOOM's for any head
count, the same losses on TP 1, 2 and 3, and resume across TP/PP/DP changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from megatron.checkpointing import convert_to_universal
from megatron.model.transformer import alibi_slopes
from megatron.testing.training import TINY_GPT, train_losses

BLOOM = TINY_GPT + ("--num-attention-heads 6 --hidden-size 48 --position-embedding-type alibi --embed-layernorm "
                    "--openai-gelu").split()


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 20])
def test_alibi_slopes_equal_bloom_for_any_head_count(heads: int) -> None:
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope x position 1
    torch.testing.assert_close(alibi_slopes(heads), bloom, rtol=1e-6, atol=0)  # fp32 pow vs float64


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return train_losses(1, BLOOM + ["--train-iters", "6"])


@pytest.mark.parametrize("tp", [2, 3])
def test_alibi_losses_equal_on_tp1_tp2_tp3(reference: list[float], tp: int) -> None:
    losses = train_losses(tp, BLOOM + ["--train-iters", "6", "--tensor-model-parallel-size", str(tp)])
    assert max(abs(a - b) / a for a, b in zip(losses, reference, strict=True)) < 1e-5, (losses, reference)


@pytest.mark.parametrize("source,target", [
    ((2, "--tensor-model-parallel-size 2"), (3, "--tensor-model-parallel-size 3")),
    ((3, "--tensor-model-parallel-size 3"), (4, "--pipeline-model-parallel-size 2 --zero-stage 1")),  # PP2 x DP2
])
def test_alibi_resume_on_other_layout_continues_loss_curve(tmp_path: Path, reference: list[float],
                                                          source: tuple, target: tuple) -> None:
    saved = train_losses(source[0], BLOOM + ["--train-iters", "6", "--exit-interval", "3", "--save", str(tmp_path)]
                         + source[1].split())
    assert max(abs(a - b) / a for a, b in zip(saved, reference[:3], strict=True)) < 1e-5, (saved, reference)
    convert_to_universal(str(tmp_path / "global_step3"), str(tmp_path / "global_step3_universal"), progress=False)
    resumed = train_losses(target[0], BLOOM + ["--train-iters", "6", "--load", str(tmp_path),
                                               "--universal-checkpoint"] + target[1].split())
    assert max(abs(a - b) / a for a, b in zip(resumed, reference[3:], strict=True)) < 1e-5, (resumed, reference)
