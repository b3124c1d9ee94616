"""Llama-style models (GQA/MQA, SwiGLU, RoPE, RMSNorm, untied embeddings, no biases): layout
invariance, canonical fused-weight tensors in checkpoints, resume across layouts, and equality
with transformers' LlamaForCausalLM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from megatron.arguments import parse_args
from megatron.checkpointing import CheckpointReader, ConversionReport, convert_to_universal
from megatron.checkpointing.reader import STATES
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.pieces import box_slices
from megatron.core.optimizer.grad_sync import sum_row_partials
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.hf_llama import (canonical_state, canonical_to_hf, check_llama, hf_llama_config,
                                     hf_to_canonical, load_canonical_state)
from megatron.testing.distributed import run_distributed
from megatron.testing.training import train_losses

SEED = 1234
LLAMA = ("--num-layers 2 --hidden-size 64 --num-attention-heads 8 --ffn-hidden-size 128 --seq-length 16 "
         "--micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
         "--attention-dropout 0 --log-interval 1000 --swiglu --normalization rmsnorm "
         "--position-embedding-type rope --rotary-base 1000 --untie-embeddings-and-output-weights "
         "--disable-bias-linear").split()
FUSED = ("attention.q", "attention.k", "attention.v", "mlp.gate", "mlp.up")  # held fused in one local matrix


def llama_cfg(kv: int, **overrides) -> ModelConfig:
    """The model LLAMA describes, with ``kv`` key-value heads for 8 query heads."""
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=kv, vocab_size=97,
                  seq_length=16, ffn_hidden_size=128, normalization="rmsnorm", swiglu=True,
                  position_embedding_type="rope", rotary_base=1000.0, tie_embeddings=False, add_bias_linear=False)
    return ModelConfig(**{**fields, **overrides})


def batch(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


# --- layout invariance of the forward and backward pass ------------------------------------

def _logits_and_grads(rank: int, world: int, cfg: ModelConfig) -> tuple[torch.Tensor, list]:
    """Logits, and the gradient of every owned piece as (canonical name, offsets, values): repeated
    KV rows first get the TP sum the optimizer applies before its step."""
    topo = Topology(ParallelDims(world, tp=world), rank)
    model = GPTModel(cfg, topo, SEED)
    tokens, labels = batch(cfg)
    logits = model(tokens).detach()
    model(tokens, labels).mean().backward()
    grads = []
    for p in model.parameters():
        sum_row_partials(p.sharding, p.grad, topo)
        grads += [(pc.canonical, pc.canonical_offsets, p.grad[box_slices((pc.local_offsets, pc.sizes))].clone())
                  for pc in p.sharding.piece_map.pieces if pc.owner]
    return logits, grads


def _assemble(per_rank: list, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    full = {n: torch.full(s, float("nan")) for n, s in shapes.items()}  # NaN shows a hole
    for _, grads in per_rank:
        for name, offsets, g in grads:
            full[name][box_slices((offsets, tuple(g.shape)))] = g
    return full


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_tp2_tp4_logits_and_canonical_grads_equal_tp1(kv: int) -> None:
    # A larger init than training's makes attention sharp, so a KV head given to the wrong
    # query heads changes the logits well beyond the tolerance.
    cfg = llama_cfg(kv, init_method_std=0.1)
    ref = run_distributed(_logits_and_grads, 1, cfg)
    shapes = {n: tuple(g.shape) for n, _, g in ref[0][1]}
    ref_grads = _assemble(ref, shapes)
    for tp in (2, 4):
        out = run_distributed(_logits_and_grads, tp, cfg)
        for logits, _ in out:
            torch.testing.assert_close(logits, ref[0][0], rtol=1e-5, atol=1e-5, msg=f"logits, kv {kv}, TP {tp}")
        for name, g in _assemble(out, shapes).items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name}, kv {kv}, TP {tp}")


CURVE_LAYOUTS = [  # (world size, flags); the reference is one rank
    (4, "--tensor-model-parallel-size 2 --zero-stage 1"),
    (4, "--tensor-model-parallel-size 4 --micro-batch-size 4"),
    (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
    (4, "--pipeline-model-parallel-size 2 --zero-stage 2"),
]


@pytest.mark.parametrize("kv", [8, 2, 1])
def test_20_step_loss_curves_agree_across_tp_pp_dp_layouts(kv: int) -> None:
    argv = LLAMA + f"--num-key-value-heads {kv} --train-iters 20".split()
    ref = train_losses(1, argv)
    assert ref[-1] < ref[0] - 1.0, "the model must learn for the comparison to mean anything"
    for world, flags in CURVE_LAYOUTS:
        losses = train_losses(world, argv + flags.split())
        diff = max(abs(a - b) for a, b in zip(losses, ref, strict=True))
        assert diff < 1e-4, f"kv {kv}, {flags}: loss curve differs from one rank by {diff:.2e}"


# --- checkpoints: canonical fused tensors, and resume on other layouts ------------------------

STEPS = 4  # iterations before the save; resumed runs continue to 2 * STEPS
GQA = LLAMA + ["--num-key-value-heads", "2"]  # TP 4 repeats each KV head on two ranks; TP 2 splits them
SOURCES = {  # saved layouts: (world size, flags)
    "tp1": (1, ""),
    "tp4": (4, "--tensor-model-parallel-size 4 --micro-batch-size 4"),
    "tp1pp2dp2": (4, "--pipeline-model-parallel-size 2 --zero-stage 1"),
    "tp2pp2": (4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
}


def save_and_convert(folder: Path, world: int, flags: str, iters: int) -> tuple[list[float], ConversionReport]:
    """Train ``iters`` of the 2 * STEPS iterations (the LR schedule spans all of them), save, convert."""
    train = ["--train-iters", str(2 * STEPS), "--exit-interval", str(iters)] if iters else ["--train-iters", "0"]
    argv = GQA + flags.split() + train + ["--save", str(folder)]
    losses = train_losses(world, argv)
    report = convert_to_universal(str(folder / f"global_step{iters}"), str(folder / f"global_step{iters}_universal"),
                                  num_workers=2, progress=False)
    return losses, report


def universal(folder: Path, iters: int) -> CheckpointReader:
    return CheckpointReader(str(folder / f"global_step{iters}_universal"))


def read_whole(reader: CheckpointReader, name: str, state: str) -> torch.Tensor:
    shape = reader.canonical[name]
    return reader.read_region(name, ((0,) * len(shape), shape), state)


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """The uninterrupted run, on one rank."""
    return train_losses(1, GQA + ["--train-iters", str(2 * STEPS)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, list[float], ConversionReport]]:
    """Every source layout trained STEPS iterations from the same seed, saved and converted."""
    out = {}
    for name, (world, flags) in SOURCES.items():
        folder = tmp_path_factory.mktemp(name)
        losses, report = save_and_convert(folder, world, flags, STEPS)
        out[name] = (folder, losses, report)
    return out


def test_canonical_qkv_gate_up_identical_whichever_tp_pp_saved_them(saved, reference) -> None:
    ref = universal(saved["tp1"][0], STEPS)
    names = [f"layers.{i}.{t}.weight" for i in range(2) for t in FUSED]
    assert float(read_whole(ref, names[0], "exp_avg").abs().max()) > 0, "the model must have trained"
    for layout, (folder, losses, report) in saved.items():
        assert max(abs(a - b) for a, b in zip(losses, reference[:STEPS], strict=True)) < 1e-4, layout
        assert report.max_replica_diff == 0.0, f"{layout}: replicas disagree in {report.max_replica_tensor}"
        reader = universal(folder, STEPS)
        assert reader.canonical == ref.canonical, layout
        for name in names:
            for state in STATES:
                got, want = read_whole(reader, name, state), read_whole(ref, name, state)
                # Adam moves a weight by about lr whatever its gradient's size, so fp32 noise in a
                # near-zero gradient shifts it by a little of lr (measured: < 1e-3 of the tensor's
                # largest value); a misplaced head or row is off by the whole scale.
                diff, scale = float((got - want).abs().max()), float(want.abs().max())
                assert diff <= 1e-3 * scale, f"{name} ({state}) saved from {layout}: off by {diff:.2e} of {scale:.2e}"


def test_init_canonical_tensors_bitwise_equal_whichever_tp_pp_saved_them(tmp_path: Path) -> None:
    readers = {}
    for name, (world, flags) in SOURCES.items():
        save_and_convert(tmp_path / name, world, flags, 0)
        readers[name] = universal(tmp_path / name, 0)
    ref = readers.pop("tp1")
    assert {f"layers.1.{t}.weight" for t in FUSED} <= set(ref.canonical)
    for layout, reader in readers.items():
        assert reader.canonical == ref.canonical, layout
        for name in ref.canonical:
            assert torch.equal(read_whole(reader, name, "fp32"), read_whole(ref, name, "fp32")), f"{name}, {layout}"


RESUMES = [  # (source layout, target world size, target flags, through a universal checkpoint)
    ("tp4", 4, "--pipeline-model-parallel-size 2 --zero-stage 1", True),          # TP 4->1, PP 1->2, DP 1->2
    ("tp1pp2dp2", 2, "--tensor-model-parallel-size 2", False),                    # TP 1->2, PP 2->1, DP 2->1
    ("tp2pp2", 4, "--tensor-model-parallel-size 4 --micro-batch-size 4", True),   # TP 2->4, PP 2->1
    ("tp4", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", False),  # TP 4->2, PP 1->2
    ("tp1pp2dp2", 4, "--tensor-model-parallel-size 2 --zero-stage 3", True),     # TP 1->2, PP 2->1, ZeRO 1->3
]


@pytest.mark.parametrize("source,world,flags,use_universal", RESUMES)
def test_resume_on_other_layout_continues_loss_curve(saved, reference, source: str, world: int, flags: str,
                                                     use_universal: bool) -> None:
    folder = saved[source][0]
    argv = GQA + flags.split() + ["--train-iters", str(2 * STEPS), "--load", str(folder)]
    losses = train_losses(world, argv + (["--universal-checkpoint"] if use_universal else []))
    assert len(losses) == STEPS
    diff = max(abs(a - b) for a, b in zip(losses, reference[STEPS:], strict=True))
    assert diff < 1e-4, f"{source} -> {flags}: resumed losses differ from the uninterrupted run by {diff:.2e}"


# --- transformers' LlamaForCausalLM with the same canonical weights ---------------------------

def random_canonical(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Random weights of every canonical tensor; norms near one but all different, so swapped
    norms or projections show in the logits."""
    gen = torch.Generator().manual_seed(7)
    shapes = {n: t.shape for n, t in canonical_state(GPTModel(cfg, Topology(ParallelDims(1)), SEED)).items()}
    return {n: (1.0 if "norm" in n else 0.0) + 0.2 * torch.randn(s, generator=gen) for n, s in shapes.items()}


def _logits_from_canonical(rank: int, world: int, cfg: ModelConfig, tensors: dict) -> torch.Tensor:
    model = GPTModel(cfg, Topology(ParallelDims(world, tp=world), rank), SEED).eval()
    load_canonical_state(model, tensors)
    with torch.no_grad():
        return model(batch(cfg)[0])


def hf_llama(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(cfg))).eval()
    model.load_state_dict(canonical_to_hf(tensors), strict=True)  # every HF weight is given, no extra
    return model


@pytest.mark.parametrize("kv,tp", [(8, 1), (2, 1), (1, 1), (2, 4), (1, 2)])
def test_forward_equals_transformers_llama_with_same_canonical_weights(kv: int, tp: int) -> None:
    cfg = llama_cfg(kv)
    tensors = random_canonical(cfg)
    with torch.no_grad():
        expected = hf_llama(cfg, tensors)(batch(cfg)[0]).logits
    for logits in run_distributed(_logits_from_canonical, tp, cfg, tensors):
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_hf_state_dict_maps_back_to_every_canonical_tensor() -> None:
    cfg = llama_cfg(2)
    tensors = random_canonical(cfg)
    back = hf_to_canonical(hf_llama(cfg, tensors).state_dict(), cfg)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name
    tied = llama_cfg(2, tie_embeddings=True)
    state = canonical_to_hf({n: t for n, t in tensors.items() if n != "output_layer.weight"})
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert "output_layer.weight" not in hf_to_canonical(state, tied)


def test_non_llama_model_is_refused_for_hf_export() -> None:
    with pytest.raises(ValueError, match="--normalization rmsnorm"):
        check_llama(llama_cfg(2, normalization="layernorm"))


# --- refused configurations -------------------------------------------------------------------

def test_kv_heads_neither_dividing_nor_divisible_by_tp_are_refused() -> None:
    cfg = llama_cfg(3, hidden_size=96, num_attention_heads=12)
    message = "--num-key-value-heads 3 and --tensor-model-parallel-size 2: one must divide the other"
    with pytest.raises(ValueError, match=message):
        cfg.check_parallel(2, 1)
    argv = LLAMA + ("--hidden-size 96 --num-attention-heads 12 --num-key-value-heads 3 --train-iters 1 "
                    "--tensor-model-parallel-size 2").split()
    with pytest.raises(RuntimeError, match=message):  # what a user of pretrain_gpt.py sees
        train_losses(2, argv)


def test_heads_not_divisible_by_kv_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="--num-attention-heads 8 is not divisible by --num-key-value-heads 3"):
        llama_cfg(3)


def test_rope_with_odd_head_size_is_refused() -> None:
    with pytest.raises(ValueError, match="--position-embedding-type rope needs an even head size"):
        llama_cfg(8, hidden_size=24)


def test_rotary_flag_alias_selects_rope() -> None:
    argv = ["--use-rotary-position-embeddings" if a == "--position-embedding-type" else a
            for a in LLAMA if a != "rope"] + ["--train-iters", "1"]
    assert parse_args(argv, 1).position_embedding_type == "rope"
