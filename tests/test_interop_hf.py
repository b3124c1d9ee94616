"""Hugging Face interop: export (GPT-2, Llama-GQA, BLOOM, Mixtral) loads in transformers with equal logits;
import of folders written by save_pretrained, HF -> universal -> HF bit-exact, and training
from the import on other layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron.checkpointing import CheckpointReader, convert_to_universal
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.interop.canonical import read_tensors, template, write_imported
from megatron.interop.hf import read_hf_state
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.hf_llama import load_canonical_state
from megatron.testing.training import TINY_GPT, inspect_trained, train_losses
from tools import export_hf, import_hf

TEXT = ("Universal checkpoints let a run resume on another layout. The quick brown fox jumps over the "
        "lazy dog, and a converted model must say the same thing in transformers as it said here.")
BLOOM = TINY_GPT + ["--position-embedding-type", "alibi", "--embed-layernorm", "--openai-gelu"]


def text_batch(vocab: int, seq: int) -> torch.Tensor:
    """Two rows of real text as byte-level ids folded into the tiny vocabulary."""
    ids = torch.tensor(list(TEXT.encode()), dtype=torch.long) % vocab
    return torch.stack([ids[:seq], ids[seq:2 * seq]])


def our_logits(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model = GPTModel(cfg, Topology(ParallelDims(1), 0), seed=0).eval()
    load_canonical_state(model, tensors)
    with torch.no_grad():
        return model(tokens)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def check_export(ckpt: Path, out: Path, *extra: str) -> tuple[ModelConfig, torch.Tensor, torch.Tensor]:
    assert export_hf.main(["--input_folder", str(ckpt), "--output_folder", str(out), *extra]) == 0
    reader = CheckpointReader(str(ckpt)) if (ckpt / "manifest.json").exists() else None
    reader = reader or CheckpointReader(str(ckpt / (ckpt / "latest").read_text()))
    cfg = ModelConfig.from_json(reader.manifest["state"]["model_config"])
    tensors = {n: s["fp32"] for n, s in read_tensors(reader).items()}
    tokens = text_batch(cfg.vocab_size, cfg.seq_length)
    return cfg, our_logits(cfg, tensors, tokens), hf_logits(out, tokens)


def train_and_save(folder: Path, world: int, argv: list[str], *flags: str) -> None:
    train_losses(world, argv + ["--train-iters", "2", "--save", str(folder), *flags])


def test_gpt2_export_from_native_and_universal_logits_equal_transformers(tmp_path: Path) -> None:
    train_and_save(tmp_path / "ckpt", 2, TINY_GPT, "--tensor-model-parallel-size", "2")
    native = tmp_path / "ckpt" / "global_step2"
    convert_to_universal(str(native), str(tmp_path / "ckpt" / "global_step2_universal"), progress=False)
    for source in (native, tmp_path / "ckpt" / "global_step2_universal"):
        _, ours, theirs = check_export(source, tmp_path / f"hf_{source.name}")
        assert json.loads((tmp_path / f"hf_{source.name}" / "config.json").read_text())["model_type"] == "gpt2"
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def random_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {n: (1.0 if "norm" in n else 0.0) + 0.2 * torch.randn(shape, generator=gen)
            for n, (shape, _) in template(cfg).items()}


def test_llama_gqa_export_sharded_bf16_and_fp32_loads_with_equal_logits(tmp_path: Path) -> None:
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=97,
                      seq_length=16, ffn_hidden_size=96, normalization="rmsnorm", swiglu=True,
                      position_embedding_type="rope", tie_embeddings=False, add_bias_linear=False)
    write_imported(str(tmp_path / "ckpt" / "global_step0_universal"), cfg,
                   {n: {"fp32": t} for n, t in random_weights(cfg).items()}, {"test": "random"}, str(tmp_path / "random"))
    _, ours, theirs = check_export(tmp_path / "ckpt" / "global_step0_universal", tmp_path / "hf",
                                   "--max-shard-size-mb", "0.02")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2, "expected several shards"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert export_hf.main(["--input_folder", str(tmp_path / "ckpt"), "--output_folder", str(tmp_path / "bf16"),
                           "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
    bf16 = hf_logits(tmp_path / "bf16", text_batch(97, 16))
    assert (bf16 - ours).abs().max() < 0.05 * ours.abs().max()  # bf16 weights: close, not equal


def test_bloom_trained_tp2_exports_to_bloomforcausallm_with_equal_logits(tmp_path: Path) -> None:
    train_and_save(tmp_path / "ckpt", 2, BLOOM, "--tensor-model-parallel-size", "2")
    cfg, ours, theirs = check_export(tmp_path / "ckpt", tmp_path / "hf")
    assert cfg.position_embedding_type == "alibi" and cfg.embed_layernorm
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "bloom"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_mixtral_trained_with_ep2_exports_to_mixtralforcausallm_with_equal_logits(tmp_path: Path) -> None:
    """Experts held two per rank (EP2) leave as one tensor per global expert; routing agrees."""
    train_and_save(tmp_path / "ckpt", 2, TINY_GPT + HF_MODELS["mixtral"][1].split(), "--expert-model-parallel-size", "2")
    convert_to_universal(str(tmp_path / "ckpt" / "global_step2"), str(tmp_path / "ckpt" / "global_step2_universal"),
                         progress=False)
    cfg, ours, theirs = check_export(tmp_path / "ckpt" / "global_step2_universal", tmp_path / "hf")
    assert cfg.moe is not None and transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "mixtral"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_tokenizer_files_are_copied_into_the_export(tmp_path: Path) -> None:
    train_and_save(tmp_path / "ckpt", 1, TINY_GPT)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text('{"a": 0}')
    (tok / "merges.txt").write_text("#version: 0.2\n")
    assert export_hf.main(["--input_folder", str(tmp_path / "ckpt"), "--output_folder", str(tmp_path / "hf"),
                           "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "hf" / "vocab.json").read_text() == '{"a": 0}' and (tmp_path / "hf" / "merges.txt").exists()
    assert export_hf.main(["--input_folder", str(tmp_path / "ckpt"), "--output_folder", str(tmp_path / "x"),
                           "--tokenizer", str(tmp_path)]) == 2


# --- import of folders written by transformers' save_pretrained --------------------------------

HF_MODELS = {  # family -> (config, flags of the matching pretrain_gpt.py run)
    "gpt2": (transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     activation_function="gelu_new"),
             "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --max-position-embeddings 32 --openai-gelu"),
    "llama": (transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32),
              "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-key-value-heads 2 --ffn-hidden-size 64 "
              "--swiglu --normalization rmsnorm --position-embedding-type rope --untie-embeddings-and-output-weights "
              "--disable-bias-linear --layernorm-epsilon 1e-6"),
    "mixtral": (transformers.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, max_position_embeddings=32),
                "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-key-value-heads 2 --ffn-hidden-size 48 "
                "--swiglu --normalization rmsnorm --position-embedding-type rope --untie-embeddings-and-output-weights "
                "--disable-bias-linear --layernorm-epsilon 1e-5 --num-experts 4 --moe-router-topk 2 "
                "--moe-router-topk-then-softmax --rotary-base 1000000"),
    "bloom": (transformers.BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4),
              "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --position-embedding-type alibi "
              "--embed-layernorm --openai-gelu"),
}


def save_hf(tmp_path: Path, family: str) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_MODELS[family][0])
    with torch.no_grad():  # norms away from one, so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf_in")
    return tmp_path / "hf_in"


@pytest.mark.parametrize("family", sorted(HF_MODELS))
def test_hf_to_universal_to_hf_is_bit_exact(tmp_path: Path, family: str) -> None:
    folder = save_hf(tmp_path, family)
    out = tmp_path / "ckpt" / "global_step0_universal"
    assert import_hf.main(["--input_folder", str(folder), "--output_folder", str(out), "--seq-length", "16"]) == 0
    assert (tmp_path / "ckpt" / "latest_universal").read_text() == "global_step0_universal"
    again = ["--input_folder", str(folder), "--output_folder", str(out)]
    assert import_hf.main(again) == 2, "an existing checkpoint is replaced only with --overwrite"
    assert import_hf.main(again + ["--overwrite", "--seq-length", "16"]) == 0
    reader = CheckpointReader(str(out))
    assert all(float(reader.read_region(n, ((0,) * len(s), s), "exp_avg").abs().max()) == 0
               for n, s in reader.canonical.items()), "imported optimizer state must be fresh"
    assert export_hf.main(["--input_folder", str(tmp_path / "ckpt"), "--output_folder", str(tmp_path / "hf_out")]) == 0
    before, after = read_hf_state(str(folder)), read_hf_state(str(tmp_path / "hf_out"))
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    tokens = text_batch(97, 16)
    torch.testing.assert_close(hf_logits(tmp_path / "hf_out", tokens), hf_logits(folder, tokens), rtol=0, atol=0)


def _eval_logits(trainer) -> torch.Tensor:
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(text_batch(97, 16))


@pytest.mark.parametrize("family", sorted(HF_MODELS))
def test_training_from_hf_import_is_layout_invariant(tmp_path: Path, family: str) -> None:
    """Loaded on TP2, the import gives transformers' logits; fine-tuning from it gives the same
    losses on TP1 and on TP2 x PP2 (to fp32 noise), so every rank read its pieces of the weights."""
    folder = save_hf(tmp_path, family)
    assert import_hf.main(["--input_folder", str(folder), "--output_folder",
                           str(tmp_path / "ckpt" / "global_step0_universal")]) == 0
    base = ("--seq-length 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --mock-data --vocab-size 97 "
            "--hidden-dropout 0 --attention-dropout 0 --log-interval 1000 --universal-checkpoint --finetune "
            f"--load {tmp_path / 'ckpt'} ").split() + HF_MODELS[family][1].split()
    expected = hf_logits(folder, text_batch(97, 16))
    frozen = ["--train-iters", "1", "--lr", "0", "--min-lr", "0", "--tensor-model-parallel-size", "2"]  # one step of lr 0
    for logits in inspect_trained(2, base + frozen, _eval_logits):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    base += ["--train-iters", "3"]
    ref = train_losses(1, base)
    other = train_losses(4, base + "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2".split())
    assert len(ref) == 3
    assert max(abs(a - b) / abs(a) for a, b in zip(ref, other, strict=True)) < 1e-5, (ref, other)
