"""Helpers shared by the data tests."""

import os

EOD_TOKEN = "<|endoftext|>"


def train_tokenizer_json(texts, path, vocab_size=400, special_tokens=(EOD_TOKEN, "<|pad|>")):
    """A byte-level BPE tokenizer.json trained with the `tokenizers` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return str(path)


def read_documents(prefix):
    """The documents of an indexed dataset, read with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


def file_bytes(*paths):
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def leftover_outputs(folder):
    """Output files (final or temporary) left in a folder."""
    return sorted(name for name in os.listdir(folder)
                  if ".bin" in name or ".idx" in name)
