"""Data: tokenizers, JSONL preprocessing to megatron-core indexed datasets, dataset blends, and an
offline sample corpus.

Submodules are imported on first use, because megatron-core's import costs about 5 s and the
sample corpus and config need none of it:

- ``DataConfig`` (config): the data section of the config tree.
- ``build_datasets``, ``build_tokenizer_from_config`` (datasets): train/valid/test GPTDatasets
  and the tokenizer from a DataConfig.
- ``build_tokenizer`` (tokenizer): sentencepiece or tokenizer.json as a megatron-core tokenizer.
- ``preprocess``, ``PreprocessOptions`` (preprocess): JSONL -> .bin/.idx.
- ``train_sentencepiece`` (train_tokenizer): a sentencepiece BPE model from JSONL.
- ``write_sample_corpus`` (sample_corpus): JSONL of standard-library docstrings.
"""

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "parse_blend": "config",
    "build_datasets": "datasets",
    "build_tokenizer_from_config": "datasets",
    "build_tokenizer": "tokenizer",
    "preprocess": "preprocess",
    "PreprocessOptions": "preprocess",
    "train_sentencepiece": "train_tokenizer",
    "write_sample_corpus": "sample_corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
