"""Build the train / valid / test datasets from the command line."""
from __future__ import annotations

import argparse

from megatron.arguments import planned_train_iters, total_train_samples
from megatron.data.mock import MockGPTDataset


def build_datasets(args: argparse.Namespace) -> tuple[tuple, int, int]:
    """((train, valid, test), vocab size, end-of-document id). Sample ``i`` depends only on
    seed, data and ``i``.

    With ``--data-path`` the vocabulary is the tokenizer's own size (the model pads it
    for tensor parallelism), so every token id the data holds has an embedding row. Mock
    data's end-of-document id is its top id, as NullTokenizer's.
    """
    samples = total_train_samples(args)
    eval_samples = (planned_train_iters(args) // max(args.eval_interval, 1) + 1) * args.eval_iters * args.global_batch_size
    if args.mock_data:
        datasets = tuple(MockGPTDataset(args.vocab_size, args.seq_length, args.seed, n, split)
                         for n, split in ((samples, "train"), (eval_samples, "valid"), (eval_samples, "test")))
        return datasets, args.vocab_size, args.vocab_size - 1
    from megatron.data.gpt_dataset import build_gpt_datasets
    from megatron.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                tokenizer_model=args.tokenizer_model, tokenizer_path=args.tokenizer_model,
                                vocab_size=args.vocab_size)
    if args.train_data_path:  # one prefix (or blend) per split, each used whole
        datasets = tuple(
            build_gpt_datasets(paths, "1,0,0", args.seq_length, args.seed, (n, 0, 0),
                               vocab_size=tokenizer.vocab_size)[0] if paths else None
            for paths, n in ((args.train_data_path, samples), (args.valid_data_path, eval_samples),
                             (args.test_data_path, eval_samples)))
        if datasets[0] is None:
            raise ValueError(f"--train-data-path {' '.join(args.train_data_path)} holds no documents")
        return datasets, tokenizer.vocab_size, tokenizer.eod
    datasets = build_gpt_datasets(args.data_path, args.split, args.seq_length, args.seed,
                                  (samples, eval_samples, eval_samples), vocab_size=tokenizer.vocab_size)
    if datasets[0] is None:
        raise ValueError(f"--split {args.split} leaves no training documents in --data-path "
                         f"{' '.join(args.data_path)}: give the first (train) ratio a positive share")
    return datasets, tokenizer.vocab_size, tokenizer.eod
