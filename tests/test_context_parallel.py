"""DeepSpeed-Ulysses (``--ds-sequence-parallel-size``) and ring-attention context parallelism
(``--context-parallel-size``): the same losses as one rank, exact ring attention and its
gradients, resume across any sequence split, and clear refusals."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.arguments import parse_args
from megatron.checkpointing import CheckpointReader, convert_to_universal
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.ring_attention import Ring, ring_attention
from megatron.core.sequence_layout import SequenceLayout
from megatron.testing.distributed import run_distributed
from megatron.testing.training import train_losses

# fp32: layouts differ only in reduction order (all-to-all is exact; the ring's log-sum-exp merge
# and the gradient sums reorder additions), ~1e-6 relative; 1e-5 is the project's fp32 tolerance.
REL_TOL = 1e-5
STEPS = 12
COMMON = ("--seq-length 32 --micro-batch-size 2 --global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 "
          "--log-interval 1000").split()
MODELS = {
    "gpt": "--num-layers 2 --hidden-size 32 --num-attention-heads 4".split(),
    # 8 query heads, 2 KV heads: S=2 splits the KV heads, TP2 x S2 and S4 replicate them
    "llama-gqa": ("--num-layers 2 --hidden-size 64 --num-attention-heads 8 --num-key-value-heads 2 "
                  "--ffn-hidden-size 128 --swiglu --normalization rmsnorm --position-embedding-type rope "
                  "--rotary-base 1000 --untie-embeddings-and-output-weights --disable-bias-linear").split(),
}
DROPOUT = {"off": "--hidden-dropout 0 --attention-dropout 0".split(),
           "on": "--hidden-dropout 0.1 --attention-dropout 0.1".split()}
LAYOUTS = {  # name: (world, flags); the reference is S = C = 1 on one rank
    "s2dp2": (4, "--ds-sequence-parallel-size 2"),
    "s4": (4, "--ds-sequence-parallel-size 4"),
    "s2tp2": (4, "--ds-sequence-parallel-size 2 --tensor-model-parallel-size 2"),
    "c2tp2": (4, "--context-parallel-size 2 --tensor-model-parallel-size 2"),
    "c4": (4, "--context-parallel-size 4"),
    "c2s2": (4, "--context-parallel-size 2 --ds-sequence-parallel-size 2"),
}


def argv(model: str, dropout: str, steps: int = STEPS) -> list[str]:
    return MODELS[model] + DROPOUT[dropout] + COMMON + ["--train-iters", str(steps)]


def assert_same_curve(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} losses, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= REL_TOL * abs(b), f"{what}: step {i + 1} loss {a!r} vs {b!r} (one rank)"


# --- where the tokens go ---------------------------------------------------------------------

def test_ring_chunks_are_load_balanced_and_ulysses_slices_them() -> None:
    """cp rank i holds chunks i and 2C-1-i of 2C; its sp ranks split those contiguously; every
    position is held exactly once."""
    seq, held = 32, []
    for cp_rank in range(2):
        for sp_rank in range(2):
            held += SequenceLayout(sp=2, sp_rank=sp_rank, cp=2, cp_rank=cp_rank).positions(8).tolist()
    assert held == [*range(0, 8), *range(24, 32), *range(8, 16), *range(16, 24)]
    assert sorted(held) == list(range(seq))
    assert SequenceLayout(cp=4, cp_rank=1).cp_positions(16, 1).tolist() == [2, 3, 12, 13]


# --- ring attention against one rank -----------------------------------------------------------

def _ring_vs_full(rank: int, world: int, alibi: bool) -> tuple[float, float]:
    """Max relative error of the ring's output and q/k/v gradients against full causal attention."""
    g = torch.Generator().manual_seed(7)
    b, h, s, d = 2, 3, 16, 8
    q, k, v, grad = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(4))
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)[:, None, None]
    pos = torch.arange(s)
    bias = slopes * (pos[None, :] - pos[:, None]) if alibi else torch.zeros(s, s, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, attn_mask=bias.masked_fill(pos[None, :] > pos[:, None],
                                                                           float("-inf")))
    ref.backward(grad)
    topo = Topology(ParallelDims(world, cp=world), rank)
    layout = SequenceLayout.of(topo)
    mine = layout.positions(s // world)
    ring = Ring(topo.group("cp"), topo.group_ranks["cp"], rank, [layout.cp_positions(s, r) for r in range(world)],
                bias=(lambda qp, kp: slopes * (kp[None, :] - qp[:, None])) if alibi else None)
    local = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, ring)
    out.backward(grad[:, :, mine])
    err = lambda a, r: float((a - r).abs().max() / r.abs().max())  # noqa: E731
    return err(out.detach(), ref.detach()[:, :, mine]), max(err(t.grad, f.grad[:, :, mine]) for t, f in zip(local, full))


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("alibi", [False, True], ids=["causal", "alibi"])
def test_ring_attention_output_and_gradients_match_full_attention(cp: int, alibi: bool) -> None:
    for out_err, grad_err in run_distributed(_ring_vs_full, cp, alibi):
        assert out_err < 1e-12 and grad_err < 1e-12, (out_err, grad_err)


# --- layout invariance of training ---------------------------------------------------------------

@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str, int], list[float]]:
    return {}


def reference(references: dict, model: str, dropout: str, steps: int = STEPS) -> list[float]:
    """The one-rank curve (S = C = 1), trained once per module."""
    if (model, dropout, steps) not in references:
        references[model, dropout, steps] = train_losses(1, argv(model, dropout, steps))
    return references[model, dropout, steps]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model,dropout", [("gpt", "on"), ("llama-gqa", "off"), ("llama-gqa", "on")])
def test_sequence_split_trains_like_one_rank(references, model: str, dropout: str, layout: str) -> None:
    want = reference(references, model, dropout)
    assert want[-1] < want[0], "the model must learn for the comparison to mean anything"
    world, flags = LAYOUTS[layout]
    assert_same_curve(train_losses(world, argv(model, dropout) + flags.split()), want, f"{model} {layout}")


def test_dropout_changes_the_curve(references) -> None:
    """Else the dropout-on comparisons could not fail."""
    off = train_losses(1, argv("gpt", "off", steps=3))
    assert abs(off[-1] - reference(references, "gpt", "on")[2]) > 1e-3


# --- resume on another sequence split -------------------------------------------------------------

N = 3  # iterations before the save; the resumed run trains the next N
RESUMES = {  # name: (model, (world, source flags), (world, target flags))
    "s2dp2-to-s1dp4z2": ("gpt", (4, "--ds-sequence-parallel-size 2"), (4, "--zero-stage 2")),
    "s4-to-tp2s2z3": ("gpt", (4, "--ds-sequence-parallel-size 4"),
                      (4, "--tensor-model-parallel-size 2 --ds-sequence-parallel-size 2 --zero-stage 3")),
    "c2tp2-to-c1dp2z0": ("gpt", (4, "--context-parallel-size 2 --tensor-model-parallel-size 2"), (2, "--zero-stage 0")),
    "gqa-s2-to-s1pp2": ("llama-gqa", (2, "--ds-sequence-parallel-size 2"), (2, "--pipeline-model-parallel-size 2")),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_resume_on_another_sequence_split_continues_the_curve(tmp_path, references, case: str) -> None:
    """Save under one split, resume under another through the native files and through the
    universal checkpoint: the losses continue the one-rank curve."""
    model, (src_world, src), (dst_world, dst) = RESUMES[case]
    want, base = reference(references, model, "on", 2 * N), argv(model, "on", steps=2 * N)
    train_losses(src_world, base + src.split() + ["--exit-interval", str(N), "--save", str(tmp_path)])
    step = os.path.join(tmp_path, f"global_step{N}")
    coords = [tuple(sorted(src_["coords"].items())) for src_ in CheckpointReader(step).manifest["sources"]]
    assert len(set(coords)) == src_world and all({"sp", "cp"} <= dict(c).keys() for c in coords), coords
    convert_to_universal(step, step + "_universal", num_workers=2, progress=False)
    for universal in ([], ["--universal-checkpoint"]):
        got = train_losses(dst_world, base + dst.split() + ["--load", str(tmp_path)] + universal)
        assert_same_curve(got, want[N:], f"{case} {'universal' if universal else 'native'}")


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,flags,message", [
    (8, "--tensor-model-parallel-size 2 --ds-sequence-parallel-size 4",
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 2 x --ds-sequence-parallel-size 4 = 8"),
    (4, "--ds-sequence-parallel-size 4 --seq-length 30",
     "--seq-length 30 is not divisible by --ds-sequence-parallel-size 4 = 4"),
    (4, "--context-parallel-size 4 --seq-length 36",
     "--seq-length 36 is not divisible by --ds-sequence-parallel-size 1 x 2 x --context-parallel-size 4 = 8"),
    (4, "--context-parallel-size 2 --ds-sequence-parallel-size 2 --seq-length 36",
     r"--seq-length 36 is not divisible by --ds-sequence-parallel-size 2 x 2 x --context-parallel-size 2 = 8"),
    (6, "--context-parallel-size 4",
     "world size 6 is not divisible by --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 x "
     "--context-parallel-size 4"),
], ids=["heads-tp-x-s", "seq-s", "seq-2c", "seq-s-x-2c", "world"])
def test_splits_that_do_not_divide_are_refused(world: int, flags: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        parse_args(argv("gpt", "off") + flags.split(), world)


def test_model_refuses_heads_not_divisible_by_tp_x_s_without_the_cli() -> None:
    from megatron.model.config import ModelConfig
    from megatron.model.gpt import GPTModel
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=32)
    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 2 "
                                         "x --ds-sequence-parallel-size 4"):
        GPTModel(cfg, Topology(ParallelDims(8, tp=2, sp=4), 0), seed=1)
