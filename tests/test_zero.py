"""ZeRO stages 0-3: one loss curve on every stage and DP size, resume from any stage into any
other through native and universal checkpoints, and what each stage keeps per rank."""
from __future__ import annotations

import json
import math
import os

import pytest

from megatron.arguments import ConfigError, parse_args
from megatron.checkpointing import convert_to_universal
from megatron.core.optimizer.footprint import resident_bytes
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.model.gpt import GPTModel
from megatron.testing.distributed import run_distributed
from megatron.testing.training import inspect_trained, train_losses
from megatron.training import model_config_from_args

# Hidden 30 over 2 heads: norm weights and biases have 30 elements, so DP 4 needs padding.
MODEL = ("--num-layers 2 --hidden-size 30 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
         "--global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
         "--attention-dropout 0 --log-interval 1000").split()
ITERS, HALF, TOL = 20, 10, 1e-4


def layout(stage: int, dp: int, tp: int = 1) -> tuple[int, list[str]]:
    """(world size, flags) of a ZeRO stage on DP x TP ranks."""
    return dp * tp, ["--zero-stage", str(stage), "--tensor-model-parallel-size", str(tp)]


def assert_curves_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} losses, expected {len(want)}"
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= TOL, f"{what}: losses differ by up to {worst:.3e} (> {TOL})\n got  {got}\n want {want}"


@pytest.fixture(scope="module")
def reference() -> list[float]:
    """The uninterrupted 20-step curve on one rank without ZeRO."""
    return train_losses(1, MODEL + ["--train-iters", str(ITERS), "--zero-stage", "0"])


def test_model_needs_padding_at_dp2_and_dp4() -> None:
    args = parse_args(MODEL + ["--train-iters", "1"], 1)
    model = GPTModel(model_config_from_args(args, args.vocab_size), Topology(ParallelDims(1)), args.seed)
    sizes = [p.numel() for p in model.parameters()]
    assert any(n % 4 for n in sizes), f"no parameter size is indivisible by 4: {sizes}"


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_loss_curve_is_the_same_on_every_zero_stage_and_dp(reference: list[float], stage: int, dp: int) -> None:
    world, flags = layout(stage, dp)
    losses = train_losses(world, MODEL + flags + ["--train-iters", str(ITERS)])
    assert_curves_close(losses, reference, f"ZeRO-{stage} DP{dp}")


def test_zero3_with_tp2_dp2_matches_reference(reference: list[float]) -> None:
    world, flags = layout(3, 2, tp=2)
    losses = train_losses(world, MODEL + flags + ["--train-iters", str(ITERS), "--exit-interval", str(HALF)])
    assert_curves_close(losses, reference[:HALF], "ZeRO-3 TP2 DP2")


def test_zero3_with_untied_output_layer_matches_stage0() -> None:
    untied = MODEL + ["--untie-embeddings-and-output-weights", "--train-iters", str(HALF)]
    want = train_losses(1, untied + ["--zero-stage", "0"])
    world, flags = layout(3, 4)
    assert_curves_close(train_losses(world, untied + flags), want, "untied ZeRO-3 DP4")


@pytest.mark.parametrize("recompute", [[], ["--checkpoint-activations"]], ids=["kept", "recomputed"])
def test_zero3_with_dropout_matches_zero1(recompute: list[str]) -> None:
    """Units that keep their activations use the forward's dropout masks; units that recompute
    replay them from the saved RNG state: either way the curve is ZeRO-1's."""
    dropout = [a for a in MODEL if a not in ("--hidden-dropout", "--attention-dropout", "0")]
    dropout += ["--hidden-dropout", "0.2", "--attention-dropout", "0.2", "--train-iters", "6"]
    want = train_losses(*_with(layout(1, 2), dropout + recompute))
    got = train_losses(*_with(layout(3, 2), dropout + recompute))
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= 1e-6, f"ZeRO-3 with dropout differs from ZeRO-1 by {worst:.3e}: {got} vs {want}"


def _unit_lifecycle(trainer) -> dict:
    """One forward and backward by hand: how often the head unit's forward ran, how many
    parameter storages attached in the forward outlived it, and how many gathers the backward
    made."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    from megatron.core.optimizer import zero3
    model, calls, attached, gathers = trainer.model, [], [], []
    model.final_norm.register_forward_hook(lambda *_: calls.append(1))
    attach, start_gather = zero3.Unit.attach, zero3.Unit.start_gather

    def recording_attach(unit, values) -> None:
        attach(unit, values)
        attached.extend(StorageWeakRef(p.untyped_storage()) for p in unit.params)

    def counting_gather(unit, async_op, which=None):
        gathers.extend(unit.params[i] for i in (range(len(unit.params)) if which is None else which))
        return start_gather(unit, async_op, which)
    zero3.Unit.attach, zero3.Unit.start_gather = recording_attach, counting_gather
    try:
        tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
        loss = model(tokens, tokens.roll(-1, 1)).mean()
        forward_calls, alive, forward_gathers = len(calls), sum(not ref.expired() for ref in attached), len(gathers)
        names = {id(p): n for n, p in model.named_parameters()}
        twice = sorted({names[id(p)] for p in gathers if sum(q is p for q in gathers) > 1})
        loss.backward()
    finally:
        zero3.Unit.attach, zero3.Unit.start_gather = attach, start_gather
    return {"forward": forward_calls, "all": len(calls), "alive": alive, "attached": len(attached),
            "forward_gathers": forward_gathers, "backward_gathers": len(gathers) - forward_gathers,
            "full": max(p.numel() for p in model.parameters()), "live": trainer.param_gather.live,
            "gathered_twice_in_forward": twice}


STRICT = ["--zero3-max-live-parameters", "0"]


@pytest.mark.parametrize("flags,head_calls", [(STRICT, 1), (STRICT + ["--checkpoint-activations"], 2), ([], 1)],
                         ids=["strict", "recomputed", "kept-whole"])
def test_zero3_unit_lifecycle(flags: list[str], head_calls: int) -> None:
    """Without recomputation a unit's forward runs once per micro-batch. With no live budget
    no parameter gathered in the forward stays alive until the backward (the graph refers to
    it, the backward gathers it again); with DeepSpeed's default budget the forward's values
    serve the backward, which gathers nothing, and the output layer takes the tied word embedding
    the embedding unit keeps. Either way nothing full outlives the backward."""
    world, layout_flags = layout(3, 2)
    argv = MODEL + layout_flags + flags + ["--train-iters", "1"]
    for rank, got in enumerate(inspect_trained(world, argv, _unit_lifecycle)):
        assert got["forward"] == 1 and got["all"] == head_calls, f"rank {rank}: head unit ran {got['all']} times"
        assert got["forward_gathers"] > 0 and got["attached"] > 0
        if flags:
            assert got["alive"] == 0, f"rank {rank}: {got['alive']} of {got['attached']} parameters outlived the forward"
            assert got["backward_gathers"] == got["forward_gathers"], f"rank {rank}: {got}"
            assert got["gathered_twice_in_forward"] == ["embedding.word_embeddings.weight"]
        else:  # the output layer takes the tied weight the embedding unit keeps
            assert got["alive"] > 0 and got["backward_gathers"] == 0, f"rank {rank}: {got}"
            assert got["gathered_twice_in_forward"] == [], f"rank {rank}: {got}"
        assert got["full"] == 0 and got["live"] == 0, f"rank {rank}: a full parameter outlived the backward"


def _curve_and_master(trainer) -> dict:
    import torch
    return {"losses": list(trainer.state.losses), "master": torch.cat([g.master for g in trainer.optimizer.groups])}


LLAMA_GQA = ("--num-layers 2 --hidden-size 48 --num-attention-heads 6 --num-key-value-heads 3 --ffn-hidden-size 96 "
             "--seq-length 16 --micro-batch-size 2 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
             "--attention-dropout 0 --log-interval 1000 --swiglu --normalization rmsnorm "
             "--position-embedding-type rope --untie-embeddings-and-output-weights").split()


@pytest.mark.parametrize("model,dp", [(MODEL, 2), (LLAMA_GQA, 3)], ids=["gpt-dp2", "llama-gqa-dp3"])
def test_zero3_live_budget_and_recomputation_give_the_same_bits(model: list[str], dp: int) -> None:
    """Keeping the forward's values whole, gathering again in backward, a budget that fits only
    some units, and recomputing each unit: one loss curve and one set of master weights."""
    import torch
    world, layout_flags = layout(3, dp)
    argv = model + layout_flags + ["--train-iters", "3", "--global-batch-size", str(4 * dp)]  # two micro-batches
    runs = {name: inspect_trained(world, argv + flags, _curve_and_master) for name, flags in
            {"kept": [], "strict": STRICT, "partial": ["--zero3-max-live-parameters", "4000"],
             "recomputed": STRICT + ["--checkpoint-activations"]}.items()}
    for name, got in runs.items():
        for rank in range(world):
            want = runs["kept"][rank]
            assert got[rank]["losses"] == want["losses"], f"{name} rank {rank}: {got[rank]['losses']} vs {want['losses']}"
            assert torch.equal(got[rank]["master"], want["master"]), f"{name} rank {rank}: master weights differ"


def _scatters_per_fragment(trainer) -> dict:
    """How many times one backward queued each fragment's gradient for the reduce-scatter."""
    import collections

    import torch
    optimizer, queued = trainer.optimizer, collections.Counter()
    queue = optimizer._queue_for_scatter

    def counting(g, f, record, grad) -> None:
        queued[f.name] += 1
        queue(g, f, record, grad)
    optimizer._queue_for_scatter = counting
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    trainer.model(tokens, tokens.roll(-1, 1)).mean().backward()
    return dict(queued)


def test_zero3_reduces_a_tied_weight_once_per_backward() -> None:
    """The word embedding is read by the first and the last unit: its two gradients are added
    before one reduce-scatter (the loss curve equal to ZeRO-0 is checked above)."""
    world, flags = layout(3, 2)
    for rank, queued in enumerate(inspect_trained(world, MODEL + flags + ["--train-iters", "1"], _scatters_per_fragment)):
        assert "embedding.word_embeddings.weight" in queued, sorted(queued)
        assert set(queued.values()) == {1}, f"rank {rank}: fragments reduced more than once: {queued}"


def test_negative_live_budget_is_refused() -> None:
    with pytest.raises(ConfigError, match="--zero3-max-live-parameters -1 is negative"):
        parse_args(MODEL + ["--zero3-max-live-parameters", "-1"], 1)


def _with(world_flags: tuple[int, list[str]], argv: list[str]) -> tuple[int, list[str]]:
    world, flags = world_flags
    return world, argv + flags


# --- resume across stages and DP sizes ------------------------------------------------

SOURCES = {"z3dp4": layout(3, 4), "z1dp2": layout(1, 2), "z2tp2dp2": layout(2, 2, tp=2), "z3dp2": layout(3, 2)}
TARGETS = {"z1dp2": layout(1, 2), "z3dp4": layout(3, 4), "z0dp1": layout(0, 1)}
PAIRS = [("z3dp4", "z1dp2"), ("z1dp2", "z3dp4"), ("z2tp2dp2", "z3dp4"), ("z3dp4", "z0dp1"), ("z3dp2", "z3dp4")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, reference):
    """Train the first half on a source layout, save, convert; each source once."""
    cache: dict[str, str] = {}

    def get(source: str) -> str:
        if source not in cache:
            folder = str(tmp_path_factory.mktemp(source))
            world, flags = SOURCES[source]
            losses = train_losses(world, MODEL + flags + ["--train-iters", str(ITERS), "--exit-interval", str(HALF),
                                                          "--save", folder])
            assert_curves_close(losses, reference[:HALF], f"{source} before saving")
            convert_to_universal(os.path.join(folder, f"global_step{HALF}"),
                                 os.path.join(folder, f"global_step{HALF}_universal"), progress=False)
            cache[source] = folder
        return cache[source]
    return get


@pytest.mark.parametrize("universal", [False, True], ids=["native", "universal"])
@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_on_another_zero_stage_and_dp_continues_loss(saved, reference, source: str, target: str,
                                                           universal: bool) -> None:
    folder = saved(source)
    world, flags = TARGETS[target]
    argv = MODEL + flags + ["--train-iters", str(ITERS), "--load", folder]
    losses = train_losses(world, argv + (["--universal-checkpoint"] if universal else []))
    assert_curves_close(losses, reference[HALF:], f"{source} -> {target} ({'universal' if universal else 'native'})")


def _native_and_universal_states(rank: int, world: int, argv: list[str], folder: str) -> dict:
    """Load one checkpoint natively (counting reads straight from the rank's own file) and its
    universal conversion into the same trainer; whether the two states are bit for bit equal."""
    from megatron.checkpointing import load_checkpoint
    from megatron.checkpointing.reader import CheckpointReader
    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    opt, direct, states = trainer.optimizer, [], []
    read_stored = CheckpointReader.read_stored

    def counting(self, *a):
        direct.append(1)
        return read_stored(self, *a)
    CheckpointReader.read_stored = counting
    for universal in (False, True):
        path = os.path.join(folder, f"global_step{HALF}" + "_universal" * universal)
        load_checkpoint(path, trainer.model, opt, trainer.topo, universal=universal)
        states.append({(f.name, k): v.clone() for f in opt.fragments() for k, v in opt.fragment_state(f).items()})
    CheckpointReader.read_stored = read_stored
    return {"direct": len(direct), "equal": all(states[0][k].equal(v) for k, v in states[1].items())}


@pytest.mark.parametrize("source,stage", [("z1dp2", 3), ("z3dp2", 2)], ids=["z1-to-z3", "z3-to-z2"])
def test_same_topology_on_another_zero_stage_reads_the_rank_files_directly(saved, source: str, stage: int) -> None:
    """ZeRO stages 1-3 partition alike: a native checkpoint of the same topology is copied
    fragment by fragment from the rank's own file, and gives the universal load's bits."""
    world, flags = layout(stage, 2)
    for rank, got in enumerate(run_distributed(_native_and_universal_states, world, MODEL + flags + ["--train-iters", "1"],
                                               saved(source))):
        assert got["direct"] > 0, f"rank {rank}: the native load did not read its own rank file directly"
        assert got["equal"], f"rank {rank}: native and universal loads differ"


# --- hyperparameters survive a stage-3 round trip -------------------------------------

HYPER = ["--weight-decay", "0.05", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-6"]
WANT_GROUPS = [{"weight_decay": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6},
               {"weight_decay": 0.0, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6}]


def _groups_of(trainer) -> dict:
    """The optimizer's hyperparameters and the group of every canonical tensor it holds."""
    params = dict(trainer.model.named_parameters())
    membership = {spec: f.group for f in trainer.optimizer.fragments() for spec in params[f.name].sharding.specs}
    return {"hyper": trainer.optimizer.hyperparameters(), "groups": membership}


@pytest.mark.parametrize("universal,target", [(True, layout(3, 4)), (False, layout(0, 1))],
                         ids=["universal-to-z3dp4", "native-to-z0dp1"])
def test_every_param_group_hyperparameter_survives_a_zero3_round_trip(tmp_path, universal: bool, target) -> None:
    folder = str(tmp_path)
    world, flags = layout(3, 2)
    train_losses(world, MODEL + flags + HYPER + ["--train-iters", "2", "--save", folder])
    convert_to_universal(os.path.join(folder, "global_step2"), os.path.join(folder, "global_step2_universal"),
                         progress=False)
    for tag in ("global_step2", "global_step2_universal"):
        with open(os.path.join(folder, tag, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["param_groups"] == WANT_GROUPS, f"{tag} manifest"
        groups = {name: entry["group"] for name, entry in manifest["canonical"].items()}
        assert groups["layers.0.attention.q.weight"] == 0 and groups["embedding.word_embeddings.weight"] == 0
        assert groups["layers.0.input_norm.weight"] == 1 and groups["layers.1.mlp.fc1.bias"] == 1
    world, flags = target  # default CLI hyperparameters: the checkpoint's must win (as Megatron, when asked to)
    argv = (MODEL + flags + ["--train-iters", "2", "--load", folder, "--use-checkpoint-opt_param-scheduler"]
            + (["--universal-checkpoint"] if universal else []))
    for loaded in inspect_trained(world, argv, _groups_of):
        assert loaded["hyper"] == WANT_GROUPS
        assert loaded["groups"] == {n: groups[n] for n in loaded["groups"]}
        assert set(loaded["groups"]) == set(groups)


# --- what each stage holds between steps ----------------------------------------------

def _holdings(trainer) -> dict:
    params = list(trainer.model.parameters())
    return {
        "footprint": resident_bytes(trainer.model, trainer.optimizer).to_json(),
        "numel": sum(math.prod(p.sharding.piece_map.local_shape) for p in params),
        "chunks": sum(f.chunk for f in trainer.optimizer.fragments()),
        "count": len(params),
        "main_grad": bool(trainer.optimizer.main_grads),
        "grad": any(p.grad is not None for p in params),
        "largest_param": max(p.data.numel() for p in params),
        "itemsize": params[0].element_size() if params[0].numel() else trainer.optimizer.groups[0].param_shard.element_size(),
    }


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage2_and_3_hold_no_full_gradient_and_stage3_no_full_parameters(stage: int) -> None:
    world, flags = layout(stage, 4)
    for rank, h in enumerate(inspect_trained(world, MODEL + flags + ["--train-iters", "2"], _holdings)):
        fp, full = h["footprint"], h["numel"]
        padded_share = h["chunks"]  # this rank's padded 1/DP of every parameter
        assert padded_share < full / 4 + h["count"], "a chunk is more than a padded quarter"
        assert not h["grad"], f"rank {rank}: a parameter keeps .grad between steps"
        if stage == 1:  # the check below can fail: ZeRO-1 keeps the full fp32 main_grad
            assert h["main_grad"] and fp["grads"] >= 4 * full
            continue
        assert not h["main_grad"], f"rank {rank}: ZeRO-{stage} allocated main_grad"
        assert fp["grads"] == 4 * padded_share, f"rank {rank}: ZeRO-{stage} gradient bytes {fp['grads']}"
        if stage == 2:
            assert fp["params"] == h["itemsize"] * full
        else:
            assert h["largest_param"] == 0, f"rank {rank}: a full parameter outlived its unit"
            assert fp["params"] == h["itemsize"] * padded_share, f"rank {rank}: ZeRO-3 parameter bytes {fp['params']}"
