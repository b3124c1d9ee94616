"""Tokenizers behind Megatron's ``--tokenizer-type`` names, plus offline training.

Every tokenizer offers the same small interface that preprocessing and training need:
``vocab_size`` (the tokenizer's own size, before padding for tensor parallelism),
``tokenize(text) -> list[int]``, ``detokenize(ids) -> str`` and ``eod`` (the id
appended after each document). ``train_tokenizer`` builds small GPT-2 BPE or
SentencePiece models from local text, so examples run with no download.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Iterator, Sequence

EOD_TOKEN = "<|endoftext|>"


class MegatronTokenizer(abc.ABC):
    """The interface every tokenizer type implements."""

    vocab_size: int
    eod: int

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document id appended)."""

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""


class GPT2BPETokenizer(MegatronTokenizer):
    """Byte-level BPE from GPT-2 style ``vocab.json`` + ``merges.txt``.

    Byte-level pre-tokenisation means every string round-trips exactly. The end of
    document id is ``<|endoftext|>``'s entry in the vocabulary, as in GPT-2.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for path in (vocab_file, merge_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GPT2BPETokenizer file not found: {path}")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if EOD_TOKEN not in vocab:
            raise ValueError(f"{vocab_file} has no {EOD_TOKEN} entry to use as end of document")
        model = models.BPE.from_file(vocab_file, merge_file)
        self._tokenizer = Tokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = len(vocab)
        self.eod = int(vocab[EOD_TOKEN])

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(MegatronTokenizer):
    """A SentencePiece ``.model`` file used directly, like Megatron's GPTSentencePieceTokenizer.

    The end of document id is the model's ``</s>`` (eos) piece; no extra tokens are
    appended to the vocabulary.
    """

    def __init__(self, tokenizer_model: str) -> None:
        import sentencepiece

        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"SentencePiece model not found: {tokenizer_model}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        if self.eod < 0:
            raise ValueError(f"{tokenizer_model} has no eos piece to use as end of document")

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(MegatronTokenizer):
    """A local directory loadable by ``transformers.AutoTokenizer``; never goes online.

    ``tokenize`` adds whatever the tokenizer's own template adds (a BOS for Llama), as
    Megatron does; ``detokenize`` drops special tokens so text round-trips. ``eod`` is
    the tokenizer's eos token.
    """

    def __init__(self, tokenizer_path: str) -> None:
        if not os.path.isdir(tokenizer_path):
            raise FileNotFoundError(f"HuggingFace tokenizer directory not found: {tokenizer_path}")
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.vocab_size = len(self._tokenizer)
        eos = self._tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer in {tokenizer_path} defines no eos token "
                             "to use as end of document")
        self.eod = int(eos)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class NullTokenizer(MegatronTokenizer):
    """Text is already token ids separated by whitespace; for synthetic data and benchmarks.

    As in Megatron, ``vocab_size`` passed in counts the ordinary ids ``0..n-1``; the end
    of document id is ``n`` and the reported ``vocab_size`` is ``n + 1``.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError as err:
            raise ValueError(f"NullTokenizer reads whitespace-separated integers: {err}") from err
        for tok in ids:
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"token {tok} outside NullTokenizer range [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


_ALIASES = {
    "GPT2BPETokenizer": "GPT2BPETokenizer",
    "SentencePieceTokenizer": "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
    "HFTokenizer": "HuggingFaceTokenizer",
    "NullTokenizer": "NullTokenizer",
}
TOKENIZER_TYPES = tuple(_ALIASES)


def _require(tokenizer_type: str, **values: object) -> None:
    missing = [name for name, value in values.items() if value is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ValueError(f"{tokenizer_type} needs {flags}")


def build_tokenizer(tokenizer_type: str, *, vocab_file: str | None = None,
                    merge_file: str | None = None, tokenizer_model: str | None = None,
                    tokenizer_path: str | None = None,
                    vocab_size: int | None = None) -> MegatronTokenizer:
    """Build a tokenizer from Megatron-style arguments.

    ``vocab_size`` is read only by NullTokenizer; the others know their own size.
    """
    kind = _ALIASES.get(tokenizer_type)
    if kind is None:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; "
                         f"choose one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "GPT2BPETokenizer":
        _require(tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
        return GPT2BPETokenizer(vocab_file, merge_file)
    if kind == "SentencePieceTokenizer":
        _require(tokenizer_type, tokenizer_model=tokenizer_model)
        return SentencePieceTokenizer(tokenizer_model)
    if kind == "HuggingFaceTokenizer":
        _require(tokenizer_type, tokenizer_path=tokenizer_path)
        return HuggingFaceTokenizer(tokenizer_path)
    _require(tokenizer_type, vocab_size=vocab_size)
    return NullTokenizer(vocab_size)


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                   tensor_parallel_size: int = 1) -> int:
    """Round the vocabulary up so every tensor-parallel shard of it is a multiple of the divisor."""
    multiple = make_vocab_size_divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def iter_corpus_texts(corpus_files: Iterable[str],
                      json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Texts of the files: JSON lines (``.json``/``.jsonl``, given keys) or plain text lines."""
    for path in corpus_files:
        path = os.fspath(path)
        is_json = path.endswith((".json", ".jsonl"))
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                if not is_json:
                    yield line.rstrip("\n")
                    continue
                record = json.loads(line)
                for key in json_keys:
                    if key in record:
                        yield str(record[key])


def train_tokenizer(corpus_files: Sequence[str], output_dir: str, vocab_size: int,
                    kind: str = "gpt2bpe", json_keys: Sequence[str] = ("text",)) -> dict[str, str]:
    """Train a small tokenizer offline; returns the ``build_tokenizer`` keyword arguments for it.

    ``gpt2bpe`` writes ``vocab.json`` + ``merges.txt`` with ``<|endoftext|>``;
    ``sentencepiece`` writes ``tokenizer.model`` (BPE with byte fallback, no text
    normalisation, so text round-trips).
    """
    os.makedirs(output_dir, exist_ok=True)
    if kind == "gpt2bpe":
        from tokenizers import ByteLevelBPETokenizer

        trainer = ByteLevelBPETokenizer()
        trainer.train_from_iterator(iter_corpus_texts(corpus_files, json_keys),
                                    vocab_size=vocab_size, min_frequency=2,
                                    special_tokens=[EOD_TOKEN], show_progress=False)
        vocab_file, merge_file = trainer.save_model(output_dir)
        return {"vocab_file": vocab_file, "merge_file": merge_file}
    if kind == "sentencepiece":
        import sentencepiece

        prefix = os.path.join(output_dir, "tokenizer")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter_corpus_texts(corpus_files, json_keys),
            model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1,
            max_sentence_length=1 << 16, minloglevel=2)
        return {"tokenizer_model": prefix + ".model"}
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'gpt2bpe' or 'sentencepiece'")
