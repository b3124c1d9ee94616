"""GPT training samples from indexed datasets, with Megatron's --data-path and --split.

A split's documents, shuffled afresh in every epoch, are laid end to end into one
endless token stream; raw sample ``j`` is stream tokens ``[j*L, j*L + L + 1)`` for
``L = seq_length``, so consecutive samples overlap by one token (the last label of one
is the first input of the next), as in Megatron. Raw samples are then shuffled in
blocks of about one epoch.

Invariant (DESIGN.md section 4): sample ``i`` depends only on the seed, the data (files,
split, sequence length, blend weights) and ``i``. Unlike Megatron, whose single
shuffle over all samples changes when the requested sample count changes, every
permutation here is seeded per epoch or per block, so asking for more samples (a
longer run, a resumed run with more iterations) only appends; nothing depends on the
data-parallel size or the micro-batch size, and nothing is cached on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron.data.indexed_dataset import IndexedDataset

_SPLIT_NAMES = ("train", "valid", "test")
# Purposes mixed into the seed so the document and the sample shuffles are independent.
_DOC_SHUFFLE, _SAMPLE_SHUFFLE = 1, 2
_CACHE_ENTRIES = 2


def parse_data_path(data_path: Sequence[str]) -> tuple[list[float], list[str]]:
    """``[prefix]`` or ``[w1, p1, w2, p2, ...]`` -> (normalised weights, prefixes)."""
    items = [str(x) for x in data_path]
    if len(items) == 1:
        return [1.0], items
    if not items or len(items) % 2:
        raise ValueError("--data-path takes one prefix or pairs 'weight prefix ...', "
                         f"got {items}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError as err:
        raise ValueError(f"--data-path blend weights must be numbers: {items}") from err
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path blend weights must be >= 0 with a positive sum: {items}")
    total = sum(weights)
    return [w / total for w in weights], items[1::2]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Megatron's ``--split`` (e.g. ``"969,30,1"``) as train/valid/test document ranges.

    Ratios are rounded per split, and the rounding error is taken off every boundary
    so the ranges cover the documents exactly, as Megatron does.
    """
    text = split.replace("/", ",")
    try:
        ratios = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--split must be comma separated numbers, got {split!r}") from err
    if not ratios or len(ratios) > 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"--split needs 1 to 3 non-negative ratios with a positive sum, "
                         f"got {split!r}")
    ratios += [0.0] * (3 - len(ratios))
    total = sum(ratios)
    bounds = [0]
    for ratio in ratios:
        bounds.append(bounds[-1] + int(round(ratio / total * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [0] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _rng(seed: int, purpose: int, counter: int) -> np.random.RandomState:
    # RandomState's streams are frozen across numpy versions, so orders stay reproducible.
    return np.random.RandomState([seed & 0xFFFFFFFF, seed >> 32, purpose, counter])


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens from a set of sequences of one indexed dataset."""

    def __init__(self, indexed: IndexedDataset, sequence_ids: np.ndarray, seq_length: int,
                 seed: int, num_samples: int, name: str = "") -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if seed < 0 or seed >= 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.indexed = indexed
        self.sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = int(num_samples)
        self.name = name or indexed.path_prefix
        self._sizes = indexed.sequence_lengths[self.sequence_ids].astype(np.int64)
        self.tokens_per_epoch = int(self._sizes.sum())
        if self.tokens_per_epoch < 1:
            raise ValueError(f"{self.name}: the split holds no tokens")
        # About one epoch of samples per shuffle block: samples mix across a whole epoch.
        self.block_size = max(1, self.tokens_per_epoch // self.seq_length)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Sequence ids of an epoch in its shuffled order, and their cumulative token ends."""
        cached = self._epochs.get(epoch)
        if cached is None:
            perm = _rng(self.seed, _DOC_SHUFFLE, epoch).permutation(len(self.sequence_ids))
            cached = (self.sequence_ids[perm], np.cumsum(self._sizes[perm]))
            if len(self._epochs) >= _CACHE_ENTRIES:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[epoch] = cached
        return cached

    def _block(self, block: int) -> np.ndarray:
        cached = self._blocks.get(block)
        if cached is None:
            cached = _rng(self.seed, _SAMPLE_SHUFFLE, block).permutation(self.block_size)
            if len(self._blocks) >= _CACHE_ENTRIES:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = cached
        return cached

    def raw_sample_index(self, idx: int) -> int:
        """Position in the unshuffled stream of samples of shuffled sample ``idx``."""
        block, offset = divmod(idx, self.block_size)
        return block * self.block_size + int(self._block(block)[offset])

    def _stream_tokens(self, position: int, count: int) -> np.ndarray:
        """Tokens ``[position, position + count)`` of the endless shuffled-epoch stream."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, within = divmod(position, self.tokens_per_epoch)
            order, ends = self._epoch(epoch)
            slot = int(np.searchsorted(ends, within, side="right"))
            begin = int(ends[slot - 1]) if slot else 0
            offset = within - begin
            take = min(int(ends[slot]) - within, count - filled)
            out[filled:filled + take] = self.indexed.get(int(order[slot]), offset, take)
            filled += take
            position += take
        return out

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sample ``idx``: ``seq_length + 1`` int64 tokens (inputs ``[:-1]``, labels ``[1:]``)."""
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.name} "
                             f"({self.num_samples} samples)")
        start = self.raw_sample_index(idx) * self.seq_length
        return self._stream_tokens(start, self.seq_length + 1)


def blend_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """For each global sample: which dataset serves it, and which sample of that dataset.

    Dataset ``d``'s ``k``-th sample is due at time ``(k + 0.5) / w_d``; samples are served
    in order of due time (ties to the lower dataset index). After any ``n`` samples each
    dataset has served ``w_d * n`` of them to within about one, like Megatron's greedy
    error-minimising choice, and the first ``n`` choices never depend on the total.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum: {weights}")
    w = w / w.sum()
    times, owners, ranks = [], [], []
    for d, weight in enumerate(w):
        if weight == 0:
            continue
        # Enough candidates that every one due before the n-th chosen sample is present.
        count = int(np.ceil(weight * (num_samples + len(w) + 1))) + 1
        k = np.arange(count, dtype=np.int64)
        times.append((k + 0.5) / weight)
        owners.append(np.full(count, d, dtype=np.int16))
        ranks.append(k)
    order = np.argsort(np.concatenate(times), kind="stable")[:num_samples]
    return np.concatenate(owners)[order], np.concatenate(ranks)[order]


class BlendedDataset:
    """Mixes datasets by weight; sample ``i`` is ``datasets[d][k]`` for ``blend_indices``."""

    def __init__(self, datasets: Sequence[GPTDataset], weights: Sequence[float],
                 num_samples: int, *,
                 indices: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``indices``: ``blend_indices(weights, num_samples)`` if the caller already has it."""
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.num_samples = int(num_samples)
        if indices is None:
            indices = blend_indices(self.weights, self.num_samples)
        self.dataset_index, self.dataset_sample_index = indices
        for d, dataset in enumerate(self.datasets):
            served = self.dataset_sample_index[self.dataset_index == d]
            if served.size and int(served.max()) >= len(dataset):
                raise ValueError(f"{dataset.name} has {len(dataset)} samples, "
                                 f"the blend needs {int(served.max()) + 1}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        idx = int(idx)
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for a blend of {self.num_samples}")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]


def _split_sequences(indexed: IndexedDataset, doc_range: tuple[int, int]) -> np.ndarray:
    """Sequence ids of documents ``[start, end)``; documents may hold several sequences."""
    documents = indexed.document_indices
    return np.arange(documents[doc_range[0]], documents[doc_range[1]], dtype=np.int64)


def build_gpt_datasets(data_path: Sequence[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], vocab_size: int | None = None
                       ) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """Train, valid and test datasets for Megatron's ``--data-path`` and ``--split``.

    A split is ``None`` when it holds no documents or is asked for no samples. In a
    blend, a prefix whose split is empty is left out and the other weights renormalised.
    With ``vocab_size`` every file's token ids are checked against it first.
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    weights, prefixes = parse_data_path(data_path)
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    if vocab_size is not None:  # a bad id must fail here, not as a wrong loss later
        for ds in indexed:
            ds.check_token_ids(vocab_size)
    ranges = [split_document_ranges(split, ds.num_documents) for ds in indexed]
    result: list[GPTDataset | BlendedDataset | None] = []
    for s, wanted in enumerate(num_samples):
        members = [(w, ds, r[s]) for w, ds, r in zip(weights, indexed, ranges)
                   if r[s][1] > r[s][0] and w > 0]
        if wanted <= 0 or not members:
            result.append(None)
            continue
        if len(members) == 1:
            _, ds, doc_range = members[0]
            result.append(GPTDataset(ds, _split_sequences(ds, doc_range), seq_length, seed,
                                     wanted, f"{ds.path_prefix}[{_SPLIT_NAMES[s]}]"))
            continue
        member_weights = [w for w, _, _ in members]
        indices = blend_indices(member_weights, wanted)
        counts = np.bincount(indices[0], minlength=len(members))
        datasets = [GPTDataset(ds, _split_sequences(ds, doc_range), seq_length, seed,
                               int(counts[d]), f"{ds.path_prefix}[{_SPLIT_NAMES[s]}]")
                    for d, (_, ds, doc_range) in enumerate(members)]
        result.append(BlendedDataset(datasets, member_weights, wanted, indices=indices))
    return tuple(result)
