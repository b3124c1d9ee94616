"""Prepare the offline dataset the example scripts train on: corpus -> tokenizer -> indexed data.

    python tools/prepare_sample_data.py --output-dir runs/data [--num-docs 4000] \
        [--tokenizer gpt2bpe|sentencepiece] [--vocab-size 1024] [--print-args]

Writes the built-in English-like corpus (``megatron/data/corpus.py``) as JSON lines,
trains a small tokenizer on it and runs ``tools/preprocess_data.py`` with
``--append-eod``, so the examples need no download. A second call with the same
settings finds the stamp file and reuses what is there. With ``--print-args``, stdout
holds only the ``pretrain_gpt.py`` flags that select this data (one per line, for
``mapfile`` in the shell scripts); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))
sys.path.insert(0, _TOOLS)

import preprocess_data  # noqa: E402  (tools/preprocess_data.py)

from megatron.data.corpus import write_sample_corpus  # noqa: E402
from megatron.data.indexed_dataset import dataset_exists  # noqa: E402
from megatron.data.tokenizers import train_tokenizer  # noqa: E402

_TOKENIZER_TYPES = {"gpt2bpe": "GPT2BPETokenizer", "sentencepiece": "SentencePieceTokenizer"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="folder for corpus, tokenizer and .bin/.idx")
    p.add_argument("--num-docs", type=int, default=4000, help="documents of the built-in corpus")
    p.add_argument("--seed", type=int, default=1234, help="corpus seed")
    p.add_argument("--tokenizer", choices=sorted(_TOKENIZER_TYPES), default="gpt2bpe",
                   help="gpt2bpe (vocab.json + merges.txt) or sentencepiece (tokenizer.model, as Llama)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary to train")
    p.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    p.add_argument("--print-args", action="store_true",
                   help="print only the training flags on stdout, one per line")
    args = p.parse_args(argv)
    if args.num_docs < 1:
        p.error(f"--num-docs must be >= 1, got {args.num_docs}")
    return args


def _file_flags(files: dict[str, str]) -> list[str]:
    """``{"vocab_file": p}`` -> ``["--vocab-file", p]``: the same names in both CLIs."""
    flags = []
    for key, path in sorted(files.items()):
        flags += ["--" + key.replace("_", "-"), path]
    return flags


def _reusable(stamp_path: str, settings: dict) -> list[str] | None:
    """The flags of an earlier identical preparation whose files all still exist, else None."""
    if not os.path.isfile(stamp_path):
        return None
    with open(stamp_path, encoding="utf-8") as f:
        stamp = json.load(f)
    if stamp.get("settings") != settings:
        return None
    if not dataset_exists(stamp["data_prefix"]) or not all(map(os.path.isfile, stamp["files"].values())):
        return None
    return stamp["flags"]


def prepare(output_dir: str, num_docs: int, seed: int, tokenizer: str, vocab_size: int,
            workers: int = 1) -> list[str]:
    """Build (or reuse) the sample dataset under ``output_dir``; returns its training flags."""
    output_dir = os.path.abspath(output_dir)
    settings = {"num_docs": num_docs, "seed": seed, "tokenizer": tokenizer, "vocab_size": vocab_size}
    stamp_path = os.path.join(output_dir, f"sample_data_{tokenizer}.json")
    flags = _reusable(stamp_path, settings)
    if flags is not None:
        print(f"reusing the sample dataset in {output_dir}", flush=True)
        return flags
    corpus = write_sample_corpus(os.path.join(output_dir, "corpus.jsonl"), num_docs, seed)
    print(f"wrote {num_docs} documents to {corpus}; training a {tokenizer} tokenizer "
          f"({vocab_size} tokens)", flush=True)
    files = train_tokenizer([corpus], os.path.join(output_dir, f"tokenizer_{tokenizer}"), vocab_size,
                            kind=tokenizer)
    tokenizer_type = _TOKENIZER_TYPES[tokenizer]
    prefixes = preprocess_data.main(["--input", corpus, "--output-prefix", os.path.join(output_dir, f"corpus_{tokenizer}"),
                                     "--tokenizer-type", tokenizer_type, *_file_flags(files), "--append-eod",
                                     "--workers", str(workers), "--log-interval", "0"])
    flags = ["--data-path", prefixes["text"], "--tokenizer-type", tokenizer_type, *_file_flags(files)]
    stamp = {"settings": settings, "data_prefix": prefixes["text"], "files": files, "flags": flags}
    tmp = f"{stamp_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stamp, f, indent=1)
    os.replace(tmp, stamp_path)  # written last: its presence means everything above is complete
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # With --print-args, stdout carries nothing but the flags.
    with contextlib.redirect_stdout(sys.stderr if args.print_args else sys.stdout):
        flags = prepare(args.output_dir, args.num_docs, args.seed, args.tokenizer, args.vocab_size, args.workers)
    if args.print_args:
        print("\n".join(flags))
    else:
        print("train with: " + " ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
