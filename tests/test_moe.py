"""Mixture of Experts: the same losses on every EP / TP / PP / DP layout, resume across expert
layouts through native and universal checkpoints, and clear refusals of layouts that do not divide."""
from __future__ import annotations

import pytest

from megatron.testing.distributed import run_distributed

MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
       "--global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 --attention-dropout 0 "
       "--log-interval 1000 --num-experts 4 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001").split()
ITERS, TOL = 12, 1e-5


def _train(rank: int, world: int, argv: list[str]) -> tuple[list[float], list[float]]:
    from megatron.training import pretrain
    state = pretrain(argv)
    return state.losses, [m["load balancing loss"] + m["z loss"] for m in state.moe_metrics]


def curves(world: int, flags: list[str], iters: int = ITERS) -> tuple[list[float], list[float]]:
    """(lm losses, auxiliary losses) of rank 0."""
    return run_distributed(_train, world, MOE + flags + ["--train-iters", str(iters)])[0]


def layout(tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 1, etp: int = 1) -> tuple[int, list[str]]:
    return tp * pp * dp, ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                          "--expert-model-parallel-size", str(ep), "--expert-tensor-parallel-size", str(etp)]


def assert_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) > 0, f"{what}: {len(got)} values, expected {len(want)}"
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want, strict=True))
    assert worst <= TOL, f"{what}: differ by up to {worst:.3e} relative (> {TOL})\n got  {got}\n want {want}"


def assert_same_run(got, want, what: str) -> None:
    assert_close(got[0], want[0], f"{what} lm loss")
    assert_close(got[1], want[1], f"{what} aux loss")


ROUTINGS = {"top2": ["--moe-router-topk", "2"],
            "top1_capacity": ["--moe-router-topk", "1", "--moe-expert-capacity-factor", "1.0"],
            "top2_capacity_position": ["--moe-router-topk", "2", "--moe-expert-capacity-factor", "0.5",
                                       "--moe-token-drop-policy", "position", "--moe-router-topk-then-softmax"]}


@pytest.fixture(scope="module")
def references() -> dict:
    return {name: curves(1, flags) for name, flags in ROUTINGS.items()}


@pytest.mark.parametrize("routing,dims", [
    ("top2", dict(ep=2, dp=2)),
    ("top2", dict(ep=4, dp=4)),
    ("top2", dict(tp=2, ep=2)),
    ("top2", dict(tp=2, pp=2, ep=2)),
    ("top1_capacity", dict(ep=4, tp=2, dp=2)),
    ("top1_capacity", dict(pp=2, ep=2, dp=2)),
    ("top2_capacity_position", dict(ep=2, dp=2, tp=2)),
    ("top2", dict(etp=2, dp=2)),
    ("top1_capacity", dict(tp=2, dp=2, ep=2, etp=2)),
])
def test_moe_losses_are_layout_invariant(references: dict, routing: str, dims: dict) -> None:
    world, flags = layout(**dims)
    assert_same_run(curves(world, flags + ROUTINGS[routing]), references[routing], f"{routing} {dims}")


def test_allgather_dispatcher_matches_alltoall(references: dict) -> None:
    world, flags = layout(ep=4, dp=4)
    got = curves(world, flags + ROUTINGS["top2"] + ["--moe-token-dispatcher-type", "allgather"])
    assert_same_run(got, references["top2"], "allgather EP4")


@pytest.mark.parametrize("micro", [1, 4])
def test_seq_aux_loss_is_the_same_at_every_micro_batch_size(micro: int) -> None:
    """Per-sequence load balancing does not depend on how sequences are grouped in micro-batches."""
    seq_aux = ["--moe-router-load-balancing-type", "seq_aux_loss", "--moe-router-topk", "2"]
    want = curves(1, seq_aux)
    world, flags = layout(ep=2, dp=2)
    got = curves(world, flags + seq_aux + ["--micro-batch-size", str(micro)])
    assert_same_run(got, want, f"seq_aux_loss micro-batch {micro} EP2")


# --- routing is a pure function of the tokens ---------------------------------------------------

def _moe_config(**kw):
    from megatron.model.moe_config import MoEConfig
    return MoEConfig(**{"num_experts": 4, "layers": (0,), "topk": 2, **kw})


def test_routing_ties_go_to_the_lower_expert_index() -> None:
    import torch
    from megatron.model.moe import route
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    r = route(logits, _moe_config(), seq_len=2)
    assert r.experts.tolist() == [[1, 2], [0, 1]]


def test_capacity_drops_per_sequence_whatever_the_batch() -> None:
    """Which assignments an expert drops is decided within each sequence, so a sequence routes
    the same alone or with others (the drop decision cannot depend on the local batch)."""
    import torch
    from megatron.model.moe import route
    torch.manual_seed(0)
    logits = torch.randn(3 * 8, 4)
    for policy in ("probs", "position"):
        cfg = _moe_config(capacity_factor=0.5, drop_policy=policy)
        together = route(logits, cfg, seq_len=8).experts
        alone = torch.cat([route(logits[i * 8:(i + 1) * 8], cfg, seq_len=8).experts for i in range(3)])
        assert torch.equal(together, alone), policy
        per_sequence = [torch.bincount(s[s >= 0], minlength=4) for s in together.view(3, -1)]
        assert all(int(c.max()) <= 2 for c in per_sequence), f"{policy}: capacity ceil(0.5*8*2/4)=2 exceeded"
        assert int((together < 0).sum()) > 0, f"{policy}: nothing was dropped, the test checks nothing"


def test_aux_loss_gradient_equals_adding_it_to_the_loss() -> None:
    """The gradient injected in backward is that of (output + coeff * aux + z-coeff * z)."""
    import torch
    from megatron.core.parallel_state import ParallelDims, Topology
    from megatron.model.config import ModelConfig
    from megatron.model.moe import MoEStats, load_balancing_loss, route, z_loss
    from megatron.model.transformer import TransformerLayer

    def layer(moe):
        cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=31, seq_length=8, moe=moe)
        return TransformerLayer(0, cfg, Topology(ParallelDims(1)), seed=3, moe_stats=MoEStats(moe)).mlp

    x = torch.randn(2, 8, 16)
    for balancing in ("aux_loss", "seq_aux_loss"):
        with_aux = _moe_config(load_balancing=balancing, aux_loss_coeff=0.3, z_loss_coeff=0.2)
        injected = layer(with_aux)
        injected.stats.begin_step(loss_scale=1.0, micro_batches=1)
        injected(x).sum().backward()
        plain = layer(_moe_config(load_balancing=balancing))
        logits = plain.router(x.reshape(16, 16))
        r = route(logits, with_aux, 8)
        loss = (plain(x).sum() + 0.3 * load_balancing_loss(r, with_aux, 0, 16, 8) + 0.2 * z_loss(logits, 16))
        loss.backward()
        for (name, a), b in zip(injected.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=f"{balancing} {name}")
        assert injected.router.weight.grad.sub(plain.router.weight.grad).abs().max() < 1e-6


# --- resume on another expert layout -----------------------------------------------------------

HALF = ITERS // 2
MIXTRAL = ["--num-experts", "8", "--moe-router-topk", "2", "--swiglu", "--num-key-value-heads", "2",
           "--normalization", "rmsnorm", "--position-embedding-type", "rope", "--disable-bias-linear",
           "--moe-router-topk-then-softmax", "--ffn-hidden-size", "48"]
RESUMES = {  # name: (model flags, source layout + ZeRO, target layout + ZeRO, through universal?)
    "ep4-to-ep1": (ROUTINGS["top2"], (dict(ep=4, dp=4), 1), (dict(), 1), True),
    "ep1tp2-to-ep2tp1": (ROUTINGS["top2"], (dict(tp=2), 1), (dict(ep=2, dp=2), 2), False),
    "ep2pp2-to-ep4": (ROUTINGS["top1_capacity"], (dict(ep=2, pp=2, dp=2), 1), (dict(ep=4, dp=4), 3), True),
    "mixtral-tp1pp2dp2-to-tp2pp2dp1": (MIXTRAL, (dict(pp=2, dp=2, ep=2), 1), (dict(tp=2, pp=2, ep=2), 2), True),
    "mixtral-tp1pp2dp2-to-tp2dp2-zero3": (MIXTRAL, (dict(pp=2, dp=2, ep=2), 1), (dict(tp=2, dp=2, ep=4), 3), False),
    "ep2etp2-to-ep1etp1": (ROUTINGS["top2"], (dict(tp=2, dp=2, ep=2, etp=2), 2), (dict(dp=2), 1), True),
    # --moe-layer-freq 2: the second pipeline stage holds no expert at all
    "pp2-dense-stage-to-ep2": (ROUTINGS["top2"] + ["--moe-layer-freq", "2"], (dict(pp=2, dp=2, ep=2), 1),
                               (dict(ep=2, dp=2), 0), False),
}


def _zero(stage: int) -> list[str]:
    return ["--zero-stage", str(stage)]


@pytest.mark.parametrize("case", list(RESUMES))
def test_resume_on_another_expert_layout_continues_losses(tmp_path, case: str) -> None:
    from megatron.checkpointing import convert_to_universal
    model, (source, source_zero), (target, target_zero), universal = RESUMES[case]
    want = curves(1, model)
    folder = str(tmp_path)
    world, flags = layout(**source)
    first = curves(world, flags + model + _zero(source_zero) + ["--exit-interval", str(HALF), "--save", folder])
    assert_same_run(first, (want[0][:HALF], want[1][:HALF]), f"{case} before saving")
    resume = ["--load", folder]
    if universal:
        convert_to_universal(f"{folder}/global_step{HALF}", f"{folder}/global_step{HALF}_universal", progress=False)
        resume.append("--universal-checkpoint")
    world, flags = layout(**target)
    second = curves(world, flags + model + _zero(target_zero) + resume)
    assert_same_run(second, (want[0][HALF:], want[1][HALF:]), f"{case} after resuming")


# --- refusals and flags ---------------------------------------------------------------------

@pytest.mark.parametrize("world,flags,message", [
    (3, ["--expert-model-parallel-size", "3", "--global-batch-size", "6"], "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
    (2, ["--expert-model-parallel-size", "4"], "not divisible by expert-parallel 4 x expert-tensor-parallel 1"),
    (4, ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "4"],
     "not divisible by expert-parallel 2 x expert-tensor-parallel 4"),
    (1, ["--moe-layer-freq", "2", "--expert-interval", "2"], "give one"),
    (1, ["--disable-moe-token-dropping", "--moe-train-capacity-factor", "1.0"], "drop one of them"),
    (1, ["--num-experts", "4", "8"], "a different number of experts per layer"),
])
def test_layouts_that_do_not_divide_are_refused(world: int, flags: list[str], message: str) -> None:
    from megatron.arguments import ConfigError, parse_args
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parse_args(MOE + flags + ["--train-iters", "1"], world)


def test_expert_hidden_size_must_divide_over_expert_tp() -> None:
    from megatron.core.parallel_state import ParallelDims, Topology
    from megatron.model.config import ModelConfig
    from megatron.model.gpt import GPTModel
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=31, seq_length=8,
                      ffn_hidden_size=30, moe=_moe_config(ffn_hidden_size=30))
    with pytest.raises(ValueError, match="--moe-ffn-hidden-size.*size 30 is not divisible by 4"):
        GPTModel(cfg, Topology(ParallelDims(4, etp=4)), seed=1)


def test_megatron_deepspeed_flags_mean_the_same_as_megatron_lm_flags() -> None:
    from megatron.arguments import parse_args
    from megatron.model.moe_config import moe_config_from_args
    base = [a for a in MOE if a not in ("--moe-aux-loss-coeff", "0.01")] + ["--train-iters", "1", "--num-layers", "4"]
    lm = ["--moe-router-topk", "1", "--expert-model-parallel-size", "2", "--moe-aux-loss-coeff", "0.1",
          "--moe-expert-capacity-factor", "1.5", "--moe-min-capacity", "2", "--moe-layer-freq", "2"]
    ds = ["--topk", "1", "--moe-expert-parallel-size", "2", "--moe-loss-coeff", "0.1",
          "--moe-train-capacity-factor", "1.5", "--moe-min-capacity", "2", "--expert-interval", "2"]
    got_lm, got_ds = (moe_config_from_args(parse_args(base + f, 2)) for f in (lm, ds))
    assert got_lm.layers == (0, 2) and got_ds.layers == (1, 3), "Megatron-LM counts from the first layer, DS the last"
    assert got_lm == got_ds.__class__(**{**got_ds.__dict__, "layers": (0, 2)})
    assert (got_lm.topk, got_lm.aux_loss_coeff, got_lm.capacity_factor, got_lm.min_capacity) == (1, 0.1, 1.5, 2)
    dropless = moe_config_from_args(parse_args(base + ["--disable-moe-token-dropping"], 1))
    assert dropless.capacity_factor is None and dropless.layers == (0, 1, 2, 3)


def test_experts_are_canonical_tensors_named_by_global_index() -> None:
    """Each EP rank holds its own experts, named by global index; together they hold every expert once."""
    from megatron.core.parallel_state import ParallelDims, Topology
    from megatron.model.config import ModelConfig
    from megatron.model.gpt import GPTModel
    cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=31, seq_length=8, swiglu=True,
                      ffn_hidden_size=24, moe=_moe_config(layers=(1,)))
    held = []
    for rank in range(2):
        model = GPTModel(cfg, Topology(ParallelDims(2, ep=2), rank), seed=1)
        held.append({spec for p in model.parameters() for spec in p.sharding.specs if ".experts." in spec})
        assert {p.sharding.zero_group for n, p in model.named_parameters() if ".experts." in n} == {"edp"}
        assert "layers.1.mlp.router.weight" in {s for p in model.parameters() for s in p.sharding.specs}
    want = {f"layers.1.mlp.experts.{e}.{part}.{kind}" for e in range(4) for part in ("gate", "up", "fc2")
            for kind in ("weight", "bias")}
    assert held[0] | held[1] == want and not held[0] & held[1]
    assert {n.split(".")[4] for n in held[1]} == {"2", "3"}


@pytest.mark.parametrize("recompute", [["--recompute-granularity", "full", "--recompute-method", "uniform"],
                                       ["--zero-stage", "3"]], ids=["full-recompute", "zero3"])
def test_recomputed_moe_layers_count_their_losses_once(references: dict, recompute: list[str]) -> None:
    """Recomputing a layer in backward (full recomputation, ZeRO-3's units) replays the all-to-all
    but neither injects the auxiliary gradient twice nor logs the losses twice."""
    world, flags = layout(ep=2, dp=2)
    assert_same_run(curves(world, flags + ROUTINGS["top2"] + recompute), references["top2"], " ".join(recompute))


def _metrics(rank: int, world: int, argv: list[str]) -> list[dict[str, float]]:
    from megatron.training import pretrain
    return pretrain(argv).moe_metrics


def test_aux_losses_and_expert_load_reach_tensorboard(tmp_path) -> None:
    import json
    world, flags = layout(ep=2, dp=2)
    argv = MOE + flags + ["--train-iters", "3", "--tensorboard-dir", str(tmp_path), "--log-interval", "1"]
    logged = run_distributed(_metrics, world, argv)[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(logged) == 3
    for row, want in zip(rows, logged):
        for layer in (0, 1):
            load = row[f"moe/layer {layer} expert load max/mean"]
            assert load == want[f"layer {layer} expert load max/mean"] and 1.0 <= load <= 4.0
        assert row["moe/load balancing loss"] == want["load balancing loss"] > 0.0
        assert row["moe/z loss"] == want["z loss"] > 0.0
