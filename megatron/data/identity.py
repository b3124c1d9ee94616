"""What a checkpoint records about the seed, the data and the tokenizer, so that a resume
that silently trains on something else can be refused (``--override-data-position`` or
``--finetune`` accept it)."""
from __future__ import annotations

import argparse
import hashlib
import os

from megatron.data.gpt_dataset import parse_data_path


def file_fingerprint(path: str | None) -> str | None:
    """sha256 of a small file (an index, a vocabulary); None if there is no such file."""
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(args: argparse.Namespace, vocab_size: int) -> dict:
    """Seed, data (paths, blend weights, split, sizes, index fingerprints) and tokenizer."""
    if args.mock_data:
        data = {"mock": True, "seq_length": args.seq_length}
    elif args.data_path:
        data = {"split": args.split, "blend": _blend(args.data_path)}
    else:  # --train-data-path / --valid-data-path / --test-data-path: one blend per split
        data = {name: _blend(paths) for name in ("train", "valid", "test")
                if (paths := getattr(args, f"{name}_data_path", None))}
    tokenizer = {"type": "mock" if args.mock_data else args.tokenizer_type, "vocab_size": vocab_size,
                 "vocab_file_sha256": file_fingerprint(args.vocab_file),
                 "merge_file_sha256": file_fingerprint(args.merge_file),
                 "tokenizer_model_sha256": file_fingerprint(args.tokenizer_model)}
    return {"seed": args.seed, "data": data, "tokenizer": tokenizer}


def _blend(data_path: list[str]) -> list[dict]:
    weights, prefixes = parse_data_path(data_path)
    return [{"prefix": os.path.abspath(p), "weight": w, "bin_bytes": os.path.getsize(p + ".bin"),
             "idx_sha256": file_fingerprint(p + ".idx")} for w, p in zip(weights, prefixes, strict=True)]


def identity_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Readable 'what: checkpoint X, this run Y' lines for every differing leaf."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += identity_differences({"": x}, {"": y}, f"{prefix}{key}[{i}]") if isinstance(x, dict) \
                    else ([f"{prefix}{key}[{i}]: checkpoint {x!r}, this run {y!r}"] if x != y else [])
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, this run {b!r}")
    return out
