"""Megatron sequence parallelism (``--sequence-parallel``): the loss curve does not depend on it
(TP 2 and 3, GPT and Llama-GQA, dropout on and off, with PP and ZeRO-2), the TP replicas of
norms and row-parallel biases stay identical, a checkpoint resumes with it switched off on
another layout (native and universal path), and a sequence TP cannot split is refused."""
from __future__ import annotations

import os

import pytest
import torch

from megatron.checkpointing import convert_to_universal
from megatron.core.dropout import DropoutRNG
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.sharding import PartialSum
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.testing.distributed import run_distributed
from megatron.testing.training import inspect_trained, train_losses

# Six heads, FFN 192 and sequence 12 split over TP 2 and 3; vocabulary 101 padded to a multiple
# of TP only, so at TP 2 and 3 the last rank's rows straddle the logical end.
GPT = ("--num-layers 2 --hidden-size 48 --num-attention-heads 6 --seq-length 12 --micro-batch-size 2 "
       "--global-batch-size 4 --lr 5e-3 --mock-data --vocab-size 101 --make-vocab-size-divisible-by 1 "
       "--log-interval 1000").split()
# Llama-style GQA: 12 query heads share 6 KV heads (split over TP 2 and 3), RMSNorm, SwiGLU, RoPE.
LLAMA_GQA = GPT + ("--num-attention-heads 12 --num-key-value-heads 6 --normalization rmsnorm --swiglu "
                   "--ffn-hidden-size 96 --position-embedding-type rope --disable-bias-linear "
                   "--untie-embeddings-and-output-weights").split()
MODELS = {"gpt": GPT, "llama_gqa": LLAMA_GQA}
DROPOUT = {"dropout": ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"],
           "no_dropout": ["--hidden-dropout", "0", "--attention-dropout", "0"]}
STEPS = 12
# fp32: SP changes only the reduction order (reduce-scatter instead of all-reduce, TP sums of the
# norm gradients): at most 1e-6 relative over 12 steps at this learning rate (at lr 1e-2 Adam
# amplifies TP's own reduction-order noise in the Llama model to 9e-6 with SP off already);
# 1e-5 relative is the project's fp32 tolerance.
REL_TOL = 1e-5
SP = ["--sequence-parallel"]


def tp(n: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(n)]


def run(world: int, argv: list[str], steps: int = STEPS) -> list[float]:
    return train_losses(world, argv + ["--train-iters", str(steps)])


def assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), f"{len(got)} losses, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= REL_TOL * abs(b), f"iteration {i + 1}: {a} vs {b} (relative {abs(a - b) / abs(b):.2e})"


# --- layout invariance ------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", DROPOUT)
@pytest.mark.parametrize("model", MODELS)
def test_sequence_parallel_on_and_off_train_the_same_curve_at_tp2_and_tp3(model: str, dropout: str) -> None:
    argv = MODELS[model] + DROPOUT[dropout]
    reference = run(1, argv)
    for degree in (2, 3):
        off = run(degree, argv + tp(degree))
        on = run(degree, argv + tp(degree) + SP)
        assert_same_curve(off, reference)
        assert_same_curve(on, off)


def test_dropout_changes_the_curve_so_the_dropout_cases_can_fail() -> None:
    on, off = (run(1, GPT + DROPOUT[d], steps=1)[0] for d in ("dropout", "no_dropout"))
    assert abs(on - off) > 10 * REL_TOL * abs(off)


@pytest.mark.parametrize("name,world,flags", [
    ("tp2-pp2", 4, tp(2) + ["--pipeline-model-parallel-size", "2"]),  # stages pass sequence slices
    ("tp2-dp2-zero2", 4, tp(2) + ["--zero-stage", "2"]),  # TP sums of partitioned norm gradients
    ("tp2-dp2-zero3", 4, tp(2) + ["--zero-stage", "3"]),  # weights gathered around each layer
    ("tp2-recompute", 2, tp(2) + ["--recompute-granularity", "full", "--recompute-method", "uniform"]),
])
def test_sequence_parallel_composes_with_pp_zero_and_recompute(name: str, world: int, flags: list[str]) -> None:
    argv = GPT + DROPOUT["dropout"]
    assert_same_curve(run(world, argv + flags + SP, steps=6), run(1, argv, steps=6))


def _replica_state(trainer) -> dict:
    """Every norm and row-parallel bias (TP replicas) after training, and how SP marked them."""
    model = trainer.model
    out = {"sp_size": model.sp.size, "replicas": {}, "tp_partial": set()}
    for name, p in model.named_parameters():
        if "tp" in p.sharding.replica_groups:
            out["replicas"][name] = p.detach().clone()
            if PartialSum("tp") in p.sharding.partial_sums:
                out["tp_partial"].add(name)
    return out


def test_tp_replicas_stay_bit_identical_under_sequence_parallelism() -> None:
    states = inspect_trained(2, GPT + DROPOUT["dropout"] + tp(2) + SP + ["--train-iters", "3"], _replica_state)
    assert [s["sp_size"] for s in states] == [2, 2]
    first = states[0]
    # Norms, row-parallel biases and the position table see one sequence slice: TP partial sums.
    assert first["tp_partial"] == set(first["replicas"]) and len(first["replicas"]) == 2 * 6 + 2 + 1
    for name, value in first["replicas"].items():
        assert torch.equal(states[1]["replicas"][name], value), name


def test_sequence_parallel_at_tp1_is_a_no_op() -> None:
    states = inspect_trained(1, GPT + SP + ["--train-iters", "2"], _replica_state)
    assert states[0]["sp_size"] == 1 and not states[0]["tp_partial"]
    assert run(1, GPT + SP, steps=2) == run(1, GPT, steps=2)


def _logits_and_token_losses(rank: int, world: int, sequence_parallel: bool):
    cfg = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, vocab_size=101, seq_length=12,
                      make_vocab_size_divisible_by=1)
    model = GPTModel(cfg, Topology(ParallelDims(world, tp=world), rank), seed=3, sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens), model(tokens, tokens.roll(-1, dims=1))


@pytest.mark.parametrize("world", [2, 3])
def test_sp_logits_and_per_token_losses_equal_tp1(world: int) -> None:
    """The whole sequence's logits come back from the sequence slices (evaluation, generation)."""
    ref_logits, ref_loss = run_distributed(_logits_and_token_losses, 1, False)[0]
    for logits, loss in run_distributed(_logits_and_token_losses, world, True):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_a_sequence_slice_of_the_hidden_dropout_mask_is_a_slice_of_the_whole() -> None:
    rng = DropoutRNG(seed=7, iteration=3, first_sample=40)
    x = torch.ones(2, 12, 32)
    whole = rng.hidden(x, 0.3, layer=1, site="mlp_out")
    for rank in range(3):  # TP 3: positions [4r, 4r + 4) of 12
        shard = rng.hidden(x[:, 4 * rank:4 * rank + 4], 0.3, 1, "mlp_out", seq_start=4 * rank, seq_length=12)
        assert torch.equal(shard, whole[:, 4 * rank:4 * rank + 4])
    assert not torch.equal(rng.hidden(x[:, 4:8], 0.3, 1, "mlp_out"), whole[:, 4:8])  # positions matter
    assert abs((whole == 0).float().mean().item() - 0.3) < 0.05  # 768 draws: binomial std 0.017, 3 sigma


# --- checkpoints ------------------------------------------------------------------------------

HALF = STEPS // 2


@pytest.mark.parametrize("model", MODELS)
def test_resume_sp_tp2_to_no_sp_tp1_continues_the_curve_native_and_universal(model: str, tmp_path) -> None:
    argv = MODELS[model] + DROPOUT["dropout"]
    uninterrupted = run(2, argv + tp(2) + SP)
    run(2, argv + tp(2) + SP + ["--exit-interval", str(HALF), "--save", str(tmp_path)])
    path = os.path.join(tmp_path, f"global_step{HALF}")
    convert_to_universal(path, path + "_universal", num_workers=2, progress=False)
    for universal in ([], ["--universal-checkpoint"]):
        resumed = run(1, argv + ["--load", str(tmp_path)] + universal)
        assert_same_curve(resumed, uninterrupted[HALF:])


def test_resume_no_sp_tp1_to_sp_tp3_continues_the_curve(tmp_path) -> None:
    argv = GPT + DROPOUT["dropout"]
    uninterrupted = run(1, argv)
    run(1, argv + ["--exit-interval", str(HALF), "--save", str(tmp_path)])
    assert_same_curve(run(3, argv + tp(3) + SP + ["--load", str(tmp_path)]), uninterrupted[HALF:])


def test_sp_on_and_off_checkpoints_hold_the_same_tensors(tmp_path) -> None:
    """The checkpoint does not know about SP: same files, names, shapes and piece tables."""
    folders = {}
    for key, flags in (("off", []), ("on", SP)):
        folder = tmp_path / key
        run(2, GPT + tp(2) + flags + ["--save", str(folder)], steps=2)
        convert_to_universal(str(folder / "global_step2"), str(folder / "global_step2_universal"), progress=False)
        folders[key] = folder
    from safetensors.torch import load_file
    for sub in ("global_step2", "global_step2_universal"):
        names = sorted(f for f in os.listdir(folders["off"] / sub) if f.endswith(".safetensors"))
        assert names == sorted(f for f in os.listdir(folders["on"] / sub) if f.endswith(".safetensors"))
        for f in names:
            off, on = load_file(folders["off"] / sub / f), load_file(folders["on"] / sub / f)
            assert off.keys() == on.keys(), f
            for k in off:
                assert off[k].shape == on[k].shape, k
                # Equal up to reduction order; Adam divides a near-zero gradient (a bias after two
                # steps) by its own size, so such an element may move by a few 1e-6.
                torch.testing.assert_close(on[k], off[k], rtol=1e-4, atol=1e-5, msg=k)


# --- refused configurations -------------------------------------------------------------------

def test_sequence_not_divisible_by_tp_is_refused() -> None:
    message = "--sequence-parallel: sequence length 12 is not divisible by --tensor-model-parallel-size 5"
    cfg = ModelConfig(num_layers=1, hidden_size=40, num_attention_heads=5, vocab_size=97, seq_length=12)
    with pytest.raises(ValueError, match=message):
        GPTModel(cfg, Topology(ParallelDims(5, tp=5), 0), seed=1, sequence_parallel=True)
    GPTModel(cfg, Topology(ParallelDims(5, tp=5), 0), seed=1)  # without SP the layout is fine
    argv = GPT + tp(2) + SP + ["--seq-length", "13", "--train-iters", "1"]
    with pytest.raises(RuntimeError, match="sequence length 13 is not divisible by --tensor-model-parallel-size 2"):
        train_losses(2, argv)  # what a user of pretrain_gpt.py sees
