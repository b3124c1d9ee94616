"""Megatron's memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The ``.bin`` file is every sequence's tokens back to back in one dtype. The ``.idx``
file lets a reader find sequence ``i`` without scanning, and is byte-compatible with
Megatron-LM / Megatron-DeepSpeed so existing preprocessed data can be used as is:

    magic              9 bytes  b"MMIDIDX\\x00\\x00"
    version            uint64   1
    dtype code         uint8    (see ``DTYPE_CODES``)
    sequence count     uint64   S
    document count     uint64   D + 1 (length of the document index array)
    sequence lengths   int32[S]   in tokens
    sequence pointers  int64[S]   byte offsets into .bin
    document indices   int64[D+1] first sequence of each document, then S

All integers are little-endian. A document is one or more consecutive sequences
(one per document when preprocessing at document level).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes; keep them stable, they are part of the file format.
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def dtype_code(dtype: np.dtype | type) -> int:
    """The on-disk code of a numpy dtype; raises for dtypes the format cannot hold."""
    np_dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np_dtype:
            return code
    raise ValueError(f"dtype {np_dtype} cannot be stored in an indexed dataset")


def best_dtype(vocab_size: int | None) -> type[np.generic]:
    """Smallest token dtype for a vocabulary, as Megatron chooses it (uint16 below 65500)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


class IndexedDatasetBuilder:
    """Appends token sequences to ``bin_path`` and writes the matching index on ``finalize``.

    Tokens go to a temporary file that ``finalize`` renames, then the index is renamed
    into place last, so a reader that finds the ``.idx`` always finds a complete ``.bin``.
    """

    def __init__(self, bin_path: str, dtype: np.dtype | type = np.int32) -> None:
        self.bin_path = os.fspath(bin_path)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail early on unsupported dtypes
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._bounds: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._bounds = None
        self._tmp_bin = f"{self.bin_path}.tmp{os.getpid()}"
        self._file = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._finalized = False

    def add_item(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Append one sequence; call ``end_document`` to close the current document."""
        if self._finalized:
            raise RuntimeError(f"builder for {self.bin_path} is already finalized")
        array = np.asarray(token_ids)
        if array.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {array.shape}")
        if array.size and self._bounds is not None:
            low, high = int(array.min()), int(array.max())
            if low < self._bounds[0] or high > self._bounds[1]:
                raise ValueError(
                    f"token ids in [{low}, {high}] do not fit dtype {self.dtype} "
                    f"of {self.bin_path}; choose a wider --dtype")
        self._file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))

    def end_document(self) -> None:
        self._document_indices.append(len(self._lengths))

    def add_document(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Append a document made of a single sequence."""
        self.add_item(token_ids)
        self.end_document()

    def abort(self) -> None:
        """Discard everything written so far; the final paths are never touched."""
        self._finalized = True
        self._file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def finalize(self, idx_path: str) -> None:
        """Write the index to ``idx_path`` and move both files into place."""
        if self._finalized:
            raise RuntimeError(f"builder for {self.bin_path} is already finalized")
        self._finalized = True
        self._file.close()
        if self._document_indices[-1] != len(self._lengths):
            # Sequences added after the last end_document form a final document.
            self._document_indices.append(len(self._lengths))
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.asarray(self._document_indices, dtype=np.int64)
        idx_path = os.fspath(idx_path)
        tmp_idx = f"{idx_path}.tmp{os.getpid()}"
        with open(tmp_idx, "wb") as out:
            out.write(_HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype),
                                   len(lengths), len(documents)))
            out.write(lengths.astype("<i4").tobytes())
            out.write(pointers.astype("<i8").tobytes())
            out.write(documents.astype("<i8").tobytes())
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, idx_path)


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx`` backed by numpy memory maps.

    Nothing is read until a sequence is asked for, so opening a dataset of any size is
    cheap. Pickling reopens the files by path instead of copying the maps, which keeps
    data-loader workers light.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self._open()

    def _open(self) -> None:
        idx_path = index_file_path(self.path_prefix)
        bin_path = data_file_path(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise ValueError(f"{idx_path}: file too short ({idx_size} bytes) for an index header")
        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, num_seqs, num_docs = _HEADER.unpack_from(self._index, 0)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r}; "
                             "not a Megatron memory-mapped index")
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + num_seqs * (4 + 8) + num_docs * 8
        if idx_size != expected:
            raise ValueError(f"{idx_path}: size {idx_size} bytes, but its header "
                             f"({num_seqs} sequences, {num_docs} document entries) "
                             f"needs {expected}; the file is truncated or corrupt")
        offset = _HEADER.size
        self._lengths = np.frombuffer(self._index, "<i4", num_seqs, offset)
        offset += num_seqs * 4
        self._pointers = np.frombuffer(self._index, "<i8", num_seqs, offset)
        offset += num_seqs * 8
        self._documents = np.frombuffer(self._index, "<i8", num_docs, offset)
        self._check_bin(bin_path, idx_path)

    def _check_bin(self, bin_path: str, idx_path: str) -> None:
        bin_size = os.path.getsize(bin_path)
        needed = 0
        if len(self._lengths):
            needed = int(self._pointers[-1]) + int(self._lengths[-1]) * self.dtype.itemsize
        if bin_size < needed:
            raise ValueError(f"{bin_path}: {bin_size} bytes, but {idx_path} needs "
                             f"{needed}; the data file is truncated")
        if len(self._documents) and (self._documents[0] != 0
                                     or self._documents[-1] != len(self._lengths)):
            raise ValueError(f"{idx_path}: document indices must run from 0 to the "
                             f"sequence count {len(self._lengths)}")
        # mmap cannot map an empty file; an empty dataset needs no map at all.
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_size else b""

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        """Sequence ``idx`` as a read-only array of the stored dtype."""
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end if no length)."""
        count = len(self._lengths)
        if not -count <= idx < count:
            raise IndexError(f"sequence {idx} out of range for {count} sequences "
                             f"in {self.path_prefix}")
        idx = int(idx) % count
        size = int(self._lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"range [{offset}, {offset + length}) outside sequence {idx} "
                             f"of length {size} in {self.path_prefix}")
        start = int(self._pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, start)

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Token count of every sequence (int32)."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """Byte offset of every sequence in the ``.bin`` file (int64)."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """First sequence of each document followed by the sequence count (int64)."""
        return self._documents

    def check_token_ids(self, vocab_size: int, chunk: int = 1 << 24) -> None:
        """Refuse token ids outside ``[0, vocab_size)``: they would index past the embedding
        (an error on GPU, silently wrong rows or an INF loss elsewhere). One bounded-memory
        pass over the ``.bin`` file; the error names the file, the first bad id and where it is."""
        if not len(self._lengths):
            return
        first = int(self._pointers[0])
        total = (int(self._pointers[-1]) - first) // self.dtype.itemsize + int(self._lengths[-1])
        for start in range(0, total, chunk):
            tokens = np.frombuffer(self._bin, self.dtype, min(chunk, total - start),
                                   first + start * self.dtype.itemsize)
            bad = np.flatnonzero((tokens >= vocab_size) | (tokens < 0))
            if len(bad):
                position = first + (start + int(bad[0])) * self.dtype.itemsize
                seq = int(np.searchsorted(self._pointers, position, side="right")) - 1
                offset = (position - int(self._pointers[seq])) // self.dtype.itemsize
                raise ValueError(
                    f"{data_file_path(self.path_prefix)}: token id {int(tokens[bad[0]])} at sequence {seq}, "
                    f"position {offset} is outside the tokenizer's vocabulary of {vocab_size} ids "
                    f"({len(bad)} bad ids in this block); preprocess the data with the tokenizer given by "
                    f"--tokenizer-type / --vocab-file / --tokenizer-model")

    @property
    def num_documents(self) -> int:
        return max(len(self._documents) - 1, 0)
