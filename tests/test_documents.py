"""--reset-position-ids, --reset-attention-mask, --eod-mask-loss: a sample of two documents
behaves as the two documents run apart, the loss is the mean over non-EOD positions, and
training with the flags is the same on every TP / PP / DP layout."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.core.documents import DocumentMasking, document_causal_mask
from megatron.core.micro_batches import loss_denominator, micro_batches
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.schedules import forward_backward
from megatron.data.mock import MockGPTDataset
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT, train_losses

EOD = 96
ALL_FLAGS = DocumentMasking(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)


def _megatron_masks(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's definition, element by element: after each EOD at i, positions restart and
    rows i+1.. may not see columns ..i; the loss skips EOD inputs."""
    b, s = tokens.shape
    allowed = torch.ones(b, s, s, dtype=torch.bool).tril()
    positions = torch.arange(s).repeat(b, 1)
    for row in range(b):
        previous = 0
        for i in (tokens[row] == eod).nonzero().flatten().tolist():
            allowed[row, i + 1:, :i + 1] = False
            positions[row, i + 1:] -= i + 1 - previous
            previous = i + 1
    return allowed, positions, (tokens != eod).float()


def test_layout_equals_megatron_masks_and_position_ids() -> None:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 8, (3, 20), generator=gen)
    tokens[tokens == 7] = EOD  # about one token in eight ends a document
    tokens[0, 0], tokens[1, -1], tokens[2, 5:7] = EOD, EOD, EOD  # EOD first, last, twice in a row
    layout = ALL_FLAGS.layout(tokens)
    allowed, positions, loss_mask = _megatron_masks(tokens, EOD)
    assert torch.equal(document_causal_mask(layout.segment_ids)[:, 0], allowed)
    assert torch.equal(layout.position_ids, positions)
    assert torch.equal(layout.loss_mask, loss_mask)
    assert DocumentMasking(EOD).layout(tokens) is None  # flags off: the plain causal path


CONFIGS = {
    "learned": ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16),
    "rope": ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16,
                        position_embedding_type="rope", normalization="rmsnorm", swiglu=True,
                        num_key_value_heads=2),
    "alibi": ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16,
                         position_embedding_type="alibi"),
}
FIRST_LEN = 6  # document A: 5 tokens and its EOD; document B: the other 10 tokens


def _two_documents_logits(rank: int, world: int, cfg: ModelConfig, dropout_path: bool) -> tuple:
    """Logits of [A, EOD, B] with reset positions and attention, and of A+EOD and B alone."""
    topo = Topology(ParallelDims(world, tp=world), rank)
    if dropout_path:  # attention dropout on, its mask made the identity: the masked path with p > 0
        cfg = dataclasses.replace(cfg, attention_dropout=0.5)
    model = GPTModel(cfg, topo, seed=1234)
    model.train(dropout_path)
    model.dropout_rng.attention = lambda probs, *args: probs
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, EOD, (2, cfg.seq_length), generator=gen)
    tokens[:, FIRST_LEN - 1] = EOD
    with torch.no_grad():
        joint = model(tokens, None, ALL_FLAGS.layout(tokens))
        first = model(tokens[:, :FIRST_LEN])
        second = model(tokens[:, FIRST_LEN:])
    return joint, first, second


@pytest.mark.parametrize("dropout_path", [False, True], ids=["sdpa", "dropout_path"])
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("tp", [1, 2])
def test_two_documents_in_one_sample_give_the_logits_of_each_alone(kind: str, tp: int, dropout_path: bool) -> None:
    cfg = CONFIGS[kind]
    joint, first, second = run_distributed(_two_documents_logits, tp, cfg, dropout_path)[0]
    torch.testing.assert_close(joint[:, :FIRST_LEN], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint[:, FIRST_LEN:], second, rtol=1e-5, atol=1e-5)


def test_reset_position_ids_matter_for_learned_positions() -> None:
    """The check above cannot pass by accident: without the position reset B's logits differ
    (for learned positions; RoPE scores depend only on distances, so there they agree anyway)."""
    cfg = CONFIGS["learned"]
    model = GPTModel(cfg, Topology(ParallelDims(1)), seed=1234)
    tokens = torch.randint(0, EOD, (1, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    tokens[:, FIRST_LEN - 1] = EOD
    with torch.no_grad():
        masked_only = model(tokens, None, DocumentMasking(EOD, reset_attention_mask=True).layout(tokens))
        alone = model(tokens[:, FIRST_LEN:])
    assert (masked_only[:, FIRST_LEN:] - alone).abs().max() > 1e-3


def test_eod_mask_loss_is_the_mean_over_non_eod_positions() -> None:
    """The schedule's loss over 4 micro-batches equals the masked mean of per-token cross
    entropy over the whole global batch (not the mean of per-micro-batch means)."""
    vocab, seq, gbs, micro = 16, 16, 8, 2
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=vocab, seq_length=seq)
    topo = Topology(ParallelDims(1))
    model = GPTModel(cfg, topo, seed=1234)
    data = MockGPTDataset(vocab, seq, 1234, gbs)
    masking = DocumentMasking(vocab - 1, eod_mask_loss=True)
    batches = micro_batches(data, 0, gbs, micro, topo, torch.device("cpu"), masking)
    denom = loss_denominator(batches, gbs, seq, topo, torch.device("cpu"))
    with torch.no_grad():
        loss = forward_backward(model, batches, topo, 1.0, denom, torch.device("cpu"), backward=False).item()
        samples = torch.from_numpy(np.stack([data[i] for i in range(gbs)]))
        tokens, labels = samples[:, :-1], samples[:, 1:]
        per_token = F.cross_entropy(model(tokens).reshape(-1, vocab), labels.reshape(-1), reduction="none")
    keep = (tokens != vocab - 1).reshape(-1)
    assert 0 < int((~keep).sum()) and denom == int(keep.sum())
    assert abs(loss - per_token[keep].mean().item()) < 1e-5 * abs(loss)
    assert abs(loss - per_token.mean().item()) > 1e-4  # the mask changes the loss


STEPS = "--train-iters 3 --vocab-size 16 --num-layers 4".split()
FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]


@pytest.mark.parametrize("rope", [False, True], ids=["learned", "rope"])
def test_document_flags_loss_curve_same_on_tp_pp_dp_layouts(rope: bool) -> None:
    base = TINY_GPT + STEPS + FLAGS + (["--position-embedding-type", "rope"] if rope else [])
    reference = train_losses(1, base)
    plain = train_losses(1, TINY_GPT + STEPS + (["--position-embedding-type", "rope"] if rope else []))
    assert max(abs(a - b) for a, b in zip(reference, plain)) > 1e-3, "the flags changed nothing"
    for tp, pp, world, zero in ((2, 2, 4, 1), (1, 2, 2, 1), (2, 1, 4, 1), (1, 1, 2, 3)):
        losses = train_losses(world, base + ["--tensor-model-parallel-size", str(tp), "--zero-stage", str(zero),
                                             "--pipeline-model-parallel-size", str(pp)])
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=f"tp{tp} pp{pp} world{world} zero{zero}")


DROPOUT = "--hidden-dropout 0.1 --attention-dropout 0.1".split()
POSITIONS = {"learned": [], "rope": ["--position-embedding-type", "rope"],
             "alibi": ["--position-embedding-type", "alibi"]}
SPLITS = {  # the sequence split over ranks: Ulysses, ring, both, Megatron-SP (also under the interleaved pipeline)
    "ulysses2": (2, "--ds-sequence-parallel-size 2"),
    "ring2": (2, "--context-parallel-size 2"),
    "ring2_ulysses2": (4, "--context-parallel-size 2 --ds-sequence-parallel-size 2"),
    "megatron_sp_tp2": (2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    "interleaved_tp2_sp": (4, "--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 "
                              "--num-layers-per-virtual-pipeline-stage 1"),
}


@pytest.fixture(scope="module")
def one_rank_curves() -> dict[str, list[float]]:
    return {}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("positions", list(POSITIONS))
def test_document_flags_compose_with_sequence_splits(one_rank_curves, positions: str, split: str) -> None:
    """Masks derived from whole samples, then cut as the tokens: each split (with dropout on)
    trains the one-rank curve; the ring applies the document mask block by block."""
    base = TINY_GPT + STEPS + FLAGS + DROPOUT + POSITIONS[positions]
    if positions not in one_rank_curves:
        one_rank_curves[positions] = train_losses(1, base)
    world, flags = SPLITS[split]
    np.testing.assert_allclose(train_losses(world, base + flags.split()), one_rank_curves[positions], rtol=1e-5,
                               err_msg=f"{positions} {split}")
