"""A deterministic, learnable synthetic corpus for ``--mock-data``.

Sample ``i`` depends only on (seed, i): a Markov chain that follows a fixed
permutation of the vocabulary with probability 0.9 and jumps uniformly otherwise,
so a tiny model quickly gets well below ln(V).
"""
from __future__ import annotations

import hashlib

import numpy as np


class MockGPTDataset:
    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int, split: str = "train") -> None:
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.split = seed, split
        self.successor = np.random.default_rng(seed).permutation(vocab_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        key = hashlib.sha256(f"{self.seed}/{self.split}/{index}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        n = self.seq_length + 1
        jumps = rng.random(n) < 0.1
        random_tokens = rng.integers(0, self.vocab_size, n)
        out = np.empty(n, dtype=np.int64)
        out[0] = random_tokens[0]
        for j in range(1, n):
            out[j] = random_tokens[j] if jumps[j] else self.successor[out[j - 1]]
        return out
