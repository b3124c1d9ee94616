"""TP layers equal the single-process model: logits, loss, canonical gradients, cross-entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.pieces import box_slices
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.testing.distributed import run_distributed

GPT = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=8, vocab_size=97, seq_length=16)
GPT_HEADS6 = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, vocab_size=101, seq_length=12,
                         make_vocab_size_divisible_by=16)


def _forward_and_grads(rank: int, world: int, tp: int, cfg: ModelConfig):
    """Logits, loss and canonical-form gradients of every owned piece on this rank."""
    topo = Topology(ParallelDims(world, tp=tp), rank)
    model = GPTModel(cfg, topo, seed=1234)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=gen)
    logits = model(tokens).detach()
    loss = model(tokens, tokens.roll(-1, dims=1)).mean()
    loss.backward()
    grads = {}
    for p in model.parameters():
        for piece in p.sharding.piece_map.pieces:
            if piece.owner:
                grads[(piece.canonical, piece.canonical_offsets)] = p.grad[box_slices((piece.local_offsets, piece.sizes))].clone()
    return logits, loss.item(), grads


def _assemble(results, cfg_shapes) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for _, _, grads in results:
        for (name, offsets), g in grads.items():
            t = full.setdefault(name, torch.zeros(cfg_shapes[name]))
            t[box_slices((offsets, tuple(g.shape)))] = g
    return full


@pytest.mark.parametrize("tp,cfg", [(2, GPT), (4, GPT), (3, GPT_HEADS6)])
def test_tp_logits_loss_and_canonical_grads_equal_tp1(tp: int, cfg: ModelConfig) -> None:
    ref = run_distributed(_forward_and_grads, 1, 1, cfg)
    out = run_distributed(_forward_and_grads, tp, tp, cfg)
    shapes = {n: tuple(g.shape) for (n, _), g in ref[0][2].items()}
    for logits, loss, _ in out:
        torch.testing.assert_close(logits, ref[0][0], rtol=1e-5, atol=1e-5)
        assert abs(loss - ref[0][1]) < 1e-5
    ref_grads, tp_grads = _assemble(ref, shapes), _assemble(out, shapes)
    assert ref_grads.keys() == tp_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(tp_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _vocab_ce(rank: int, world: int, logits: torch.Tensor, target: torch.Tensor, padded: int):
    topo = Topology(ParallelDims(world, tp=world), rank)
    vocab = logits.shape[-1]
    full = torch.cat([logits, torch.randn(*logits.shape[:-1], padded - vocab) * 100], dim=-1)  # junk padding
    per = padded // world
    local = full[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target, rank * per, vocab, topo.tp_group)
    loss.sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("world", [1, 2, 4])
def test_vocab_parallel_cross_entropy_equals_torch(world: int) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 97, generator=gen)
    target = torch.randint(0, 97, (3, 5), generator=gen)
    ref_logits = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, 97), target.view(-1), reduction="none").view(3, 5)
    ref.sum().backward()
    out = run_distributed(_vocab_ce, world, logits, target, 128)
    for loss, _ in out:
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    grad = torch.cat([g for _, g in out], dim=-1)
    torch.testing.assert_close(grad[..., :97], ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert grad[..., 97:].abs().max() == 0  # padding columns get no gradient


def test_world_size_that_does_not_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor-parallel size 4"):
        ParallelDims(6, tp=4)


def test_heads_not_divisible_by_tp_is_refused() -> None:
    with pytest.raises(ValueError, match="--num-attention-heads 8 is not divisible by --tensor-model-parallel-size 3"):
        GPT.check_parallel(3, 1)


def test_vocab_is_padded_to_multiple_of_divisible_by_times_tp() -> None:
    assert GPT.padded_vocab_size(1) == 128
    assert GPT.padded_vocab_size(4) == 512
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=8,
                      make_vocab_size_divisible_by=8)
    assert cfg.padded_vocab_size(3) == 120
