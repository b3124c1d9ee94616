"""PyTorch DCP both ways and Megatron-Core torch_dist input: canonical tensors and Adam state
survive exactly, files are written by torch.distributed.checkpoint.save, and training resumes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron.checkpointing import CheckpointReader, convert_to_universal
from megatron.interop.canonical import read_tensors, template
from megatron.model.config import ModelConfig
from megatron.testing.training import TINY_GPT, train_losses
from tools import convert_to_universal as cli

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def all_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return read_tensors(CheckpointReader(str(path)), STATES)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for s in a[name]:
            assert torch.equal(a[name][s], b[name][s]), f"{name} ({s})"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[float]]:
    """A TP2 run saved at iteration 2 of 4, its universal conversion, and the uninterrupted losses."""
    folder = tmp_path_factory.mktemp("dcp")
    argv = TINY_GPT + ["--train-iters", "4"]
    reference = train_losses(1, argv)
    train_losses(2, argv + ["--exit-interval", "2", "--save", str(folder), "--tensor-model-parallel-size", "2"])
    convert_to_universal(str(folder / "global_step2"), str(folder / "global_step2_universal"), progress=False)
    return folder, reference


def test_dcp_export_holds_canonical_tensors_and_adam_state(trained, tmp_path: Path) -> None:
    folder, _ = trained
    assert cli.main(["--output-format", "dcp", "--input_folder", str(folder / "global_step2"),
                     "--output_folder", str(tmp_path / "dcp")]) == 0
    ours = all_states(folder / "global_step2_universal")
    state = {"model": {n: torch.empty_like(s["fp32"]) for n, s in ours.items()},
             "optimizer": {"state": {n: {"exp_avg": torch.empty_like(s["fp32"]), "exp_avg_sq": torch.empty_like(
                 s["fp32"]), "step": torch.tensor(0.0)} for n, s in ours.items()}}}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)  # as a torchtitan user would
    assert float(ours["layers.0.attention.q.weight"]["exp_avg"].abs().max()) > 0, "the model must have trained"
    for n, s in ours.items():
        assert torch.equal(state["model"][n], s["fp32"]), n
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["optimizer"]["state"][n][m], s[m]), f"{n} {m}"
        assert float(state["optimizer"]["state"][n]["step"]) == 2.0


def test_dcp_round_trip_is_bit_exact_and_resumes_the_loss_curve(trained, tmp_path: Path) -> None:
    folder, reference = trained
    assert cli.main(["--output-format", "dcp", "--input_folder", str(folder / "global_step2_universal"),
                     "--output_folder", str(tmp_path / "dcp")]) == 0
    out = tmp_path / "ckpt" / "global_step2_universal"
    assert cli.main(["--input-format", "dcp", "--input_folder", str(tmp_path / "dcp"), "--output_folder", str(out)]) == 0
    assert_same(all_states(out), all_states(folder / "global_step2_universal"))
    losses = train_losses(2, TINY_GPT + ["--train-iters", "4", "--load", str(tmp_path / "ckpt"),
                                         "--universal-checkpoint", "--pipeline-model-parallel-size", "2"])
    assert max(abs(a - b) / a for a, b in zip(losses, reference[2:], strict=True)) < 1e-5, (losses, reference)


def test_dcp_written_by_torch_without_our_metadata_imports_with_model_config(tmp_path: Path) -> None:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16)
    gen = torch.Generator().manual_seed(1)
    shapes = template(cfg)
    model = {n: torch.randn(s, generator=gen) for n, (s, _) in shapes.items()}
    dcp.save({"model": model}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json()))
    out = tmp_path / "ckpt" / "global_step0_universal"
    args = ["--input-format", "dcp", "--input_folder", str(tmp_path / "dcp"), "--output_folder", str(out)]
    assert cli.main(args) == 2, "without ucp_state.json the model config must be asked for"
    assert cli.main(args + ["--model-config", str(tmp_path / "cfg.json")]) == 0
    got = all_states(out)
    for n, t in model.items():
        assert torch.equal(got[n]["fp32"], t) and float(got[n]["exp_avg"].abs().max()) == 0, n


# --- Megatron-Core torch_dist ------------------------------------------------------------------

MCORE = {  # name -> (our config, Megatron args, TE-fused norms)
    "llama_gqa": (ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                              vocab_size=97, seq_length=16, ffn_hidden_size=96, normalization="rmsnorm",
                              swiglu=True, position_embedding_type="rope", tie_embeddings=False,
                              add_bias_linear=False, layernorm_epsilon=1e-6),
                  dict(group_query_attention=True, num_query_groups=2, normalization="RMSNorm", swiglu=True,
                       position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                       add_bias_linear=False, norm_epsilon=1e-6, ffn_hidden_size=96), True),
    "gpt": (ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=97, seq_length=16),
            dict(group_query_attention=False, normalization="LayerNorm", ffn_hidden_size=128,
                 max_position_embeddings=16), False),
}


def mcore_checkpoint(folder: Path, cfg: ModelConfig, args: dict, te_norms: bool) -> dict:
    """Write what Megatron-Core's torch_dist saves (keys, fused layouts, stacked layers, padded
    vocabulary) from random canonical tensors; returns those tensors by state."""
    gen = torch.Generator().manual_seed(5)
    canon = {s: {n: torch.randn(shape, generator=gen) for n, (shape, _) in template(cfg).items()} for s in STATES}
    pad = 128 - cfg.vocab_size
    hd, groups = cfg.head_dim, cfg.num_key_value_heads
    per = cfg.num_attention_heads // groups

    def mcore_keys(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"embedding.word_embeddings.weight": torch.cat([t["embedding.word_embeddings.weight"],
                                                              torch.zeros(pad, cfg.hidden_size)])}
        if not cfg.tie_embeddings:
            out["output_layer.weight"] = torch.cat([t["output_layer.weight"], torch.zeros(pad, cfg.hidden_size)])
        if "embedding.position_embeddings.weight" in t:
            out["embedding.position_embeddings.weight"] = t["embedding.position_embeddings.weight"]
        kinds = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
        for kind in (("weight", "bias") if cfg.normalization == "layernorm" else ("weight",)):
            out[f"decoder.final_layernorm.{kind}"] = t[f"final_norm.{kind}"]
            norm1 = f"self_attention.linear_qkv.layer_norm_{kind}" if te_norms else f"input_layernorm.{kind}"
            norm2 = f"mlp.linear_fc1.layer_norm_{kind}" if te_norms else f"pre_mlp_layernorm.{kind}"
            out[f"decoder.layers.{norm1}"] = torch.stack([t[f"layers.{i}.input_norm.{kind}"]
                                                          for i in range(cfg.num_layers)])
            out[f"decoder.layers.{norm2}"] = torch.stack([t[f"layers.{i}.post_attention_norm.{kind}"]
                                                          for i in range(cfg.num_layers)])
        for kind in kinds:
            qkv, proj, fc1, fc2 = [], [], [], []
            for i in range(cfg.num_layers):
                a = f"layers.{i}.attention"
                q = t[f"{a}.q.{kind}"].reshape(groups, per * hd, -1)
                k, v = (t[f"{a}.{x}.{kind}"].reshape(groups, hd, -1) for x in "kv")
                qkv.append(torch.cat([q, k, v], dim=1).reshape(-1, *t[f"{a}.q.{kind}"].shape[1:]))
                proj.append(t[f"{a}.dense.{kind}"])
                m = f"layers.{i}.mlp"
                fc1.append(torch.cat([t[f"{m}.gate.{kind}"], t[f"{m}.up.{kind}"]]) if cfg.swiglu else t[f"{m}.fc1.{kind}"])
                fc2.append(t[f"{m}.fc2.{kind}"])
            for key, parts in (("self_attention.linear_qkv", qkv), ("self_attention.linear_proj", proj),
                               ("mlp.linear_fc1", fc1), ("mlp.linear_fc2", fc2)):
                out[f"decoder.layers.{key}.{kind}"] = torch.stack(parts)
        return out

    state = {k: v.to(torch.bfloat16) for k, v in mcore_keys(canon["fp32"]).items()}  # bf16 model weights
    for ours, theirs in (("fp32", "fp32_param"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
        state.update({f"optimizer.state.{theirs}.{k}": v for k, v in mcore_keys(canon[ours]).items()})
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    megatron_args = argparse.Namespace(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                       num_attention_heads=cfg.num_attention_heads, padded_vocab_size=128,
                                       vocab_size=cfg.vocab_size, seq_length=cfg.seq_length,
                                       consumed_train_samples=24, **args)
    torch.save({"args": megatron_args, "iteration": 3, "optimizer": {"param_groups": [{"step": 3, "lr": 1e-3}]}},
               folder / "common.pt")
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    return canon


@pytest.mark.parametrize("name", sorted(MCORE))
def test_mcore_torch_dist_maps_to_canonical_tensors(tmp_path: Path, name: str) -> None:
    cfg, args, te_norms = MCORE[name]
    canon = mcore_checkpoint(tmp_path / "iter_0000003", cfg, args, te_norms)
    out = tmp_path / "ckpt" / "global_step3_universal"
    assert cli.main(["--input-format", "mcore", "--input_folder", str(tmp_path / "iter_0000003"),
                     "--output_folder", str(out)]) == 0
    reader = CheckpointReader(str(out))
    assert ModelConfig.from_json(reader.manifest["state"]["model_config"]) == cfg
    assert reader.manifest["state"]["optimizer_step"] == 3 and reader.manifest["state"]["consumed_samples"] == 24
    got = all_states(out)
    assert got.keys() == canon["fp32"].keys()
    for n in got:
        for s in STATES:
            assert torch.equal(got[n][s], canon[s][n]), f"{n} ({s})"
