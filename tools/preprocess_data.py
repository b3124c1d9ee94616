"""Tokenize a JSON-lines corpus into Megatron's indexed dataset format.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --append-eod --workers 4

writes ``data/corpus_text_document.bin`` and ``.idx`` (one per ``--json-keys`` entry),
the names ``--data-path data/corpus_text_document`` expects. Documents keep their input
order whatever ``--workers`` is, so the output files are identical for any worker count.
With ``--train-tokenizer-dir`` and no tokenizer files, a GPT-2 BPE tokenizer is first
trained on the input itself, so a corpus can be prepared with no download.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder, best_dtype, data_file_path, index_file_path)
from megatron.data.tokenizers import (  # noqa: E402
    TOKENIZER_TYPES, MegatronTokenizer, build_tokenizer, train_tokenizer)

_DTYPES = {"uint16": np.uint16, "int32": np.int32, "int64": np.int64}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON-lines file, one document a line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; each gets its own output dataset")
    group.add_argument("--split-sentences", action="store_true",
                       help="each sentence its own sequence within its document (NLTK punkt, as upstream; "
                            "needs nltk and its punkt data); writes PREFIX_{key}_sentence")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the newlines between sentences")
    group.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_model", default=None,
                       help="SentencePiece .model file, or a local HuggingFace tokenizer directory "
                            "(the same two flags and meaning as in pretrain_gpt.py)")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer size")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")
    group.add_argument("--train-tokenizer-dir", default=None,
                       help="train a GPT-2 BPE tokenizer on the input into this directory "
                            "when no tokenizer files are given")
    group.add_argument("--train-tokenizer-vocab-size", type=int, default=2048)
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document.bin/.idx")
    group.add_argument("--dtype", default="auto", choices=("auto", *_DTYPES),
                       help="token dtype on disk; auto picks uint16 for small vocabularies")
    group.add_argument("--dataset-impl", choices=["mmap"], default="mmap",
                       help="no-op: the memory-mapped .bin/.idx format is the only one written")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for upstream command lines; the output is the same for any value: "
                            "the --workers pool already reads one stream in order, so nothing is split "
                            "into partition files and merged")
    group.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="tqdm progress bar even when stderr is not a terminal (default: only on a terminal)")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="report progress every this many documents (0: never)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.partitions < 1:
        parser.error("--workers and --partitions must be >= 1")
    if args.keep_newlines and not args.split_sentences:
        parser.error("--keep-newlines only applies with --split-sentences")
    if args.train_tokenizer_dir is not None:
        if args.tokenizer_type != "GPT2BPETokenizer":
            parser.error("--train-tokenizer-dir trains a GPT2BPETokenizer; "
                         f"got --tokenizer-type {args.tokenizer_type}")
        if args.vocab_file is not None or args.merge_file is not None:
            parser.error("give either --vocab-file/--merge-file or --train-tokenizer-dir, not both")
    return args


def tokenizer_kwargs(args: argparse.Namespace) -> dict:
    return {"vocab_file": args.vocab_file, "merge_file": args.merge_file,
            "tokenizer_model": args.tokenizer_model, "tokenizer_path": args.tokenizer_model,
            "vocab_size": args.vocab_size}


def sentence_splitter(lang: str, keep_newlines: bool):
    """Upstream's splitter: NLTK's trained punkt model for ``lang``; a clear error without it."""
    try:
        import nltk
    except ImportError:
        raise SystemExit("error: --split-sentences needs nltk (pip install nltk) and its punkt data "
                         "(python -m nltk.downloader punkt)") from None
    try:
        splitter = nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except LookupError:
        raise SystemExit(f"error: --split-sentences: NLTK's punkt data for {lang!r} is not installed "
                         f"(python -m nltk.downloader punkt)") from None
    if keep_newlines:  # upstream: sentences may end at a newline, which is kept in the text
        class _NewlineVars(nltk.tokenize.punkt.PunktLanguageVars):
            _period_context_fmt = r"""
                \S*                          # some word material
                %(SentEndChars)s             # a potential sentence ending
                \s*                       #  <-- THIS is what I changed
                (?=(?P<after_tok>
                    %(NonWord)s              # either other punctuation
                    |
                    (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
                ))"""
        splitter = nltk.tokenize.punkt.PunktSentenceTokenizer(splitter._params, lang_vars=_NewlineVars())
    return splitter.tokenize


class Encoder:
    """Turns one JSON line into token arrays; one instance (and tokenizer) per worker."""

    _tokenizer: MegatronTokenizer | None = None

    _split = None

    def __init__(self, tokenizer_type: str, kwargs: dict, json_keys: Sequence[str],
                 append_eod: bool, split_sentences: tuple[str, bool] | None = None) -> None:
        self.tokenizer_type = tokenizer_type
        self.kwargs = kwargs
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.split_sentences = split_sentences  # (lang, keep newlines) or None

    def initialize(self) -> None:
        # Built in each worker: tokenizer objects are not all picklable.
        Encoder._tokenizer = build_tokenizer(self.tokenizer_type, **self.kwargs)
        Encoder._split = sentence_splitter(*self.split_sentences) if self.split_sentences else None

    def encode(self, line: str) -> tuple[dict[str, list[np.ndarray]], int]:
        """Token ids of each sequence (the whole text, or each sentence) per JSON key of one
        document, and the line's size in bytes. The end-of-document token ends the last one."""
        record = json.loads(line)
        tokenizer = Encoder._tokenizer
        out = {}
        for key in self.json_keys:
            if key not in record:
                raise KeyError(f"input document has no key {key!r}: {line[:80]!r}")
            text = str(record[key])
            pieces = Encoder._split(text) if Encoder._split else [text]
            sequences = [ids for ids in (tokenizer.tokenize(p) for p in pieces) if ids]
            if self.append_eod and sequences:
                sequences[-1].append(tokenizer.eod)
            out[key] = [np.asarray(ids, dtype=np.int64) for ids in sequences]
        return out, len(line.encode("utf-8"))


def _read_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def _encoded_documents(encoder: Encoder, path: str,
                       workers: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Encoded documents in input order, from this process or a pool of workers."""
    if workers == 1:
        encoder.initialize()
        for line in _read_lines(path):
            yield encoder.encode(line)
        return
    # Training the tokenizer used its thread pool in this process; the forked workers
    # must not, or the tokenizers library warns and disables it anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with context.Pool(workers, initializer=encoder.initialize) as pool:
        # imap (not imap_unordered) keeps document order, so output is worker-count invariant.
        yield from pool.imap(encoder.encode, _read_lines(path), chunksize=64)


def _write_documents(encoder: Encoder, args: argparse.Namespace,
                     builders: dict[str, IndexedDatasetBuilder]) -> int:
    """Feed every encoded document to its builder; returns the document count."""
    from megatron.progress import progress_bar

    start = time.time()
    total_bytes = 0
    count = 0
    bar = progress_bar(os.path.getsize(args.input), "tokenizing", "B", args.progress, unit_scale=True,
                       mininterval=1.0)
    for count, (docs, num_bytes) in enumerate(
            _encoded_documents(encoder, args.input, args.workers), start=1):
        total_bytes += num_bytes
        bar.update(num_bytes)
        for key, sequences in docs.items():
            # A document with no tokens carries nothing to train on; Megatron skips it too.
            if sequences:
                for ids in sequences:
                    builders[key].add_item(ids)
                builders[key].end_document()
        if args.log_interval and count % args.log_interval == 0:
            elapsed = max(time.time() - start, 1e-9)
            bar.write(f"processed {count} documents ({count / elapsed:.1f} docs/s, "
                      f"{total_bytes / elapsed / 2**20:.2f} MB/s)")
    bar.close()
    elapsed = max(time.time() - start, 1e-9)
    print(f"processed {count} documents in {elapsed:.2f} s: {count / elapsed:.1f} docs/s, "
          f"{total_bytes / elapsed / 2**20:.2f} MB/s", flush=True)
    return count


def output_prefix(prefix: str, key: str, level: str = "document") -> str:
    """Megatron's naming: ``PREFIX_{key}_document`` (``_sentence`` with --split-sentences)."""
    return f"{prefix}_{key}_{level}"


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Run the tool; returns the written dataset prefix for each JSON key."""
    args = parse_args(argv)
    kwargs = tokenizer_kwargs(args)
    if args.train_tokenizer_dir is not None:
        print(f"training a GPT-2 BPE tokenizer ({args.train_tokenizer_vocab_size} tokens) "
              f"on {args.input} into {args.train_tokenizer_dir}", flush=True)
        kwargs.update(train_tokenizer([args.input], args.train_tokenizer_dir,
                                      args.train_tokenizer_vocab_size, kind="gpt2bpe",
                                      json_keys=args.json_keys))
    tokenizer = build_tokenizer(args.tokenizer_type, **kwargs)
    dtype = best_dtype(tokenizer.vocab_size) if args.dtype == "auto" else _DTYPES[args.dtype]
    print(f"tokenizer {args.tokenizer_type}: vocab size {tokenizer.vocab_size}, "
          f"eod {tokenizer.eod}; token dtype {np.dtype(dtype).name}", flush=True)

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    level = "sentence" if args.split_sentences else "document"
    prefixes = {key: output_prefix(args.output_prefix, key, level) for key in args.json_keys}
    split = (args.lang, args.keep_newlines) if args.split_sentences else None
    if split:
        sentence_splitter(*split)  # fail before any output exists if nltk or its data is missing
    builders = {key: IndexedDatasetBuilder(data_file_path(p), dtype) for key, p in prefixes.items()}
    encoder = Encoder(args.tokenizer_type, kwargs, args.json_keys, args.append_eod, split)

    try:
        count = _write_documents(encoder, args, builders)
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    for key, builder in builders.items():
        builder.finalize(index_file_path(prefixes[key]))
    print(f"done: {count} documents -> {', '.join(prefixes.values())}", flush=True)
    return prefixes


if __name__ == "__main__":
    main()
