"""Data pipeline: corpus -> tokenizer -> preprocess_data -> indexed dataset -> GPT samples."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
import sys

import numpy as np
import pytest

from megatron.data.corpus import generate_documents, write_sample_corpus
from megatron.data.gpt_dataset import (
    BlendedDataset, GPTDataset, blend_indices, build_gpt_datasets, parse_data_path,
    split_document_ranges)
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.tokenizers import build_tokenizer, pad_vocab_size, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DOCS = 300
SAMPLE_TEXT = "Anna gave the red cake to Ben.  Then, wörld 😀 — tabs\tand\nnewlines "


def _load_preprocess_tool():
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes unpickle its Encoder by module name
    spec.loader.exec_module(module)
    return module


preprocess_data = _load_preprocess_tool()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, a GPT-2 BPE tokenizer trained on it and its preprocessed dataset."""
    root = tmp_path_factory.mktemp("data")
    corpus = write_sample_corpus(root / "corpus.jsonl", NUM_DOCS, seed=3)
    bpe = train_tokenizer([corpus], str(root / "bpe"), vocab_size=512)
    prefixes = preprocess_data.main([
        "--input", corpus, "--output-prefix", str(root / "w1" / "corpus"),
        "--vocab-file", bpe["vocab_file"], "--merge-file", bpe["merge_file"],
        "--append-eod", "--workers", "1", "--log-interval", "0"])
    return {"root": root, "corpus": corpus, "bpe": bpe, "prefix": prefixes["text"]}


def _texts(corpus: str) -> list[str]:
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------- corpus and tokenizers

def test_corpus_is_deterministic_and_prefix_stable(tmp_path):
    a = write_sample_corpus(tmp_path / "a.jsonl", 20, seed=5)
    b = write_sample_corpus(tmp_path / "b.jsonl", 20, seed=5)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert list(generate_documents(20, 5))[:10] == list(generate_documents(10, 5))
    assert list(generate_documents(5, 5)) != list(generate_documents(5, 6))


def _hf_tokenizer_dir(bpe: dict, path: str) -> str:
    """Save the trained BPE as a local HuggingFace tokenizer directory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer(bpe["vocab_file"], bpe["merge_file"])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer,
                                   eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "SentencePieceTokenizer",
                                  "HuggingFaceTokenizer", "NullTokenizer"])
def test_each_tokenizer_type_round_trips_text(work, kind, tmp_path):
    text = SAMPLE_TEXT
    if kind == "GPT2BPETokenizer":
        tokenizer = build_tokenizer(kind, **work["bpe"])
    elif kind == "SentencePieceTokenizer":
        model = train_tokenizer([work["corpus"]], str(tmp_path), 400, kind="sentencepiece")
        tokenizer = build_tokenizer(kind, **model)
    elif kind == "HuggingFaceTokenizer":
        path = _hf_tokenizer_dir(work["bpe"], str(tmp_path / "hf"))
        tokenizer = build_tokenizer(kind, tokenizer_path=path)
        assert tokenizer.tokenize(text) == build_tokenizer(
            "GPT2BPETokenizer", **work["bpe"]).tokenize(text)
    else:
        tokenizer = build_tokenizer(kind, vocab_size=100)
        text = "5 17 0 99"
    ids = tokenizer.tokenize(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.detokenize(ids) == text
    assert isinstance(tokenizer.vocab_size, int) and 0 <= tokenizer.eod < tokenizer.vocab_size


def test_gpt2bpe_eod_is_endoftext_and_training_is_deterministic(work, tmp_path):
    again = train_tokenizer([work["corpus"]], str(tmp_path), vocab_size=512)
    for key in ("vocab_file", "merge_file"):
        assert open(again[key], "rb").read() == open(work["bpe"][key], "rb").read()
    tokenizer = build_tokenizer("GPT2BPETokenizer", **work["bpe"])
    assert tokenizer.detokenize([tokenizer.eod]) == "<|endoftext|>"


def test_null_tokenizer_follows_megatron_eod_convention():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=10)
    assert (tokenizer.vocab_size, tokenizer.eod) == (11, 10)
    with pytest.raises(ValueError, match="outside"):
        tokenizer.tokenize("3 11")


def test_build_tokenizer_names_missing_arguments_and_unknown_types():
    with pytest.raises(ValueError, match="--vocab-file, --merge-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("NoSuchTokenizer")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model="missing.model")
    assert pad_vocab_size(50257, 128, 2) == 50432


# ---------------------------------------------------------------- preprocess_data

def test_preprocess_round_trip_text_tokens_text(work):
    tokenizer = build_tokenizer("GPT2BPETokenizer", **work["bpe"])
    dataset = IndexedDataset(work["prefix"])
    texts = _texts(work["corpus"])
    assert work["prefix"].endswith("corpus_text_document")
    assert len(dataset) == dataset.num_documents == len(texts)
    assert dataset.dtype == np.uint16
    for i, text in enumerate(texts):
        tokens = dataset[i]
        assert tokens[-1] == tokenizer.eod
        assert tokenizer.detokenize(tokens[:-1].tolist()) == text


def test_preprocess_output_is_identical_for_any_worker_count(work):
    bpe = work["bpe"]
    prefix = preprocess_data.main([
        "--input", work["corpus"], "--output-prefix", str(work["root"] / "w2" / "corpus"),
        "--vocab-file", bpe["vocab_file"], "--merge-file", bpe["merge_file"],
        "--append-eod", "--workers", "2", "--log-interval", "0"])["text"]
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(work["prefix"] + ext, "rb").read()


def test_preprocess_can_train_its_own_tokenizer(work):
    out = work["root"] / "trained"
    prefix = preprocess_data.main([
        "--input", work["corpus"], "--output-prefix", str(out / "corpus"),
        "--train-tokenizer-dir", str(out / "tok"), "--train-tokenizer-vocab-size", "400",
        "--dtype", "int32", "--log-interval", "0"])["text"]
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=str(out / "tok" / "vocab.json"),
                                merge_file=str(out / "tok" / "merges.txt"))
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.int32
    assert tokenizer.detokenize(dataset[7].tolist()) == _texts(work["corpus"])[7]


# ---------------------------------------------------------------- indexed dataset

def _write(prefix: str, docs: list[list[int]], dtype=np.int32) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(prefix + ".idx")


def test_indexed_dataset_round_trip_and_megatron_header(tmp_path):
    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_document([1, 2, 3])
    builder.add_item([4, 5])
    builder.add_item([6])
    builder.end_document()
    builder.add_document([])
    builder.finalize(prefix + ".idx")
    dataset = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    assert len(dataset) == 4 and dataset.num_documents == 3
    assert dataset.sequence_lengths.tolist() == [3, 2, 1, 0]
    assert dataset.document_indices.tolist() == [0, 1, 3, 4]
    assert dataset[1].tolist() == [4, 5] and dataset[-1].tolist() == []
    assert dataset.get(0, offset=1, length=2).tolist() == [2, 3]
    header = open(prefix + ".idx", "rb").read(34)
    assert struct.unpack("<9sQBQQ", header) == (b"MMIDIDX\x00\x00", 1, 8, 4, 4)
    with pytest.raises(IndexError):
        dataset.get(0, offset=2, length=2)


def test_indexed_dataset_errors_name_the_file(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, [[1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(FileNotFoundError, match="nothere.idx"):
        IndexedDataset(str(tmp_path / "nothere"))
    data = bytearray(open(prefix + ".idx", "rb").read())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"NOTMAGIC!" + data[9:])
    with pytest.raises(ValueError, match=r"d\.idx: bad magic"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:-4])
    with pytest.raises(ValueError, match=r"d\.idx.*truncated"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(data)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match=r"d\.bin.*truncated"):
        IndexedDataset(prefix)


def test_builder_rejects_tokens_that_do_not_fit_the_dtype(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        builder.add_document([1, 70000])
    builder.abort()
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- gpt_dataset

def _stream_reference(dataset: GPTDataset, epochs: int) -> np.ndarray:
    """The documents of each epoch, shuffled with the dataset's own order, end to end."""
    indexed = dataset.indexed
    parts = [indexed[int(s)] for e in range(epochs) for s in dataset._epoch(e)[0]]
    return np.concatenate(parts).astype(np.int64)


def test_samples_are_consecutive_windows_overlapping_by_one_token(work):
    train, _, _ = build_gpt_datasets([work["prefix"]], "1", 16, 9, (3000, 0, 0))
    stream = _stream_reference(train, epochs=8)
    raw = sorted(train.raw_sample_index(i) for i in range(train.block_size))
    assert raw == list(range(train.block_size))  # a block is a permutation
    for i in (0, 1, 2, 500, 2999):
        sample = train[i]
        j = train.raw_sample_index(i)
        assert sample.dtype == np.int64 and sample.shape == (17,)
        np.testing.assert_array_equal(sample, stream[16 * j:16 * j + 17])


def test_gpt_dataset_is_deterministic_and_seed_dependent(work):
    a = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 1, (400, 40, 8))
    b = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 1, (400, 40, 8))
    c = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 2, (400, 40, 8))
    for x, y in zip(a, b):
        assert all(np.array_equal(x[i], y[i]) for i in range(len(x)))
    assert not all(np.array_equal(a[0][i], c[0][i]) for i in range(20))


def test_sample_depends_only_on_seed_data_and_index(work):
    """Not on the requested sample count, on access order, or on how ranks split the batch."""
    short = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 4, (300, 0, 0))[0]
    long = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 4, (5000, 0, 0))[0]
    expected = [long[i] for i in range(len(short))]
    assert all(np.array_equal(short[i], expected[i]) for i in range(len(short)))
    for dp in (1, 2, 3):  # each rank reads its strided share from a fresh instance
        ranks = [build_gpt_datasets([work["prefix"]], "90,8,2", 32, 4, (300, 0, 0))[0]
                 for _ in range(dp)]
        seen = {i: ranks[i % dp][i] for i in reversed(range(300))}
        assert all(np.array_equal(seen[i], expected[i]) for i in range(300))


def test_split_sizes_follow_ratios(work):
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("8/1/1", 10) == [(0, 8), (8, 9), (9, 10)]
    train, valid, test = build_gpt_datasets([work["prefix"]], "80,15,5", 8, 1, (10, 10, 10))
    sizes = [len(ds.sequence_ids) for ds in (train, valid, test)]
    assert sizes == [240, 45, 15] and sum(sizes) == NUM_DOCS
    assert not set(train.sequence_ids) & set(valid.sequence_ids)
    assert build_gpt_datasets([work["prefix"]], "100,0,0", 8, 1, (10, 10, 0))[1:] == (None, None)


def test_blend_follows_weights_and_is_prefix_stable(work):
    owners, ranks = blend_indices([0.2, 0.5, 0.3], 10000)
    counts = np.bincount(owners, minlength=3)
    assert np.abs(counts - np.array([2000, 5000, 3000])).max() <= 1
    for n in (1, 7, 123, 4567):  # any prefix is balanced and matches a shorter request
        assert np.abs(np.bincount(owners[:n], minlength=3) - np.array([.2, .5, .3]) * n).max() < 2
        short_owners, short_ranks = blend_indices([0.2, 0.5, 0.3], n)
        assert np.array_equal(short_owners, owners[:n]) and np.array_equal(short_ranks, ranks[:n])
    assert parse_data_path(["1", "a", "3", "b"]) == ([0.25, 0.75], ["a", "b"])
    blend = build_gpt_datasets(["1", work["prefix"], "3", work["prefix"]], "90,8,2", 32, 5,
                               (2000, 0, 0))[0]
    assert isinstance(blend, BlendedDataset) and len(blend) == 2000
    assert [len(ds) for ds in blend.datasets] == [500, 1500]
    single = build_gpt_datasets([work["prefix"]], "90,8,2", 32, 5, (2000, 0, 0))[0]
    k = int(blend.dataset_sample_index[10])
    np.testing.assert_array_equal(blend[10], single[k])
