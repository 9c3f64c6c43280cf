"""The data section of the project's config: what to train on and how to cut it into samples.

A plain dataclass (no megatron-core import) so the typed config tree can compose and validate it
before any process group starts. :func:`megatron_ntp.data.datasets.build_datasets` turns it into
megatron-core datasets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union


@dataclass
class DataConfig:
    """Datasets for training: a weighted blend of preprocessed prefixes, split train/valid/test."""

    blend: Union[str, List[str], None] = None
    """Megatron's blend: "weight prefix weight prefix ..." (weights are normalised), or just
    "prefix prefix ..." (weighted by size), as one string or a list of words. A prefix is the path
    of a preprocessed dataset without .bin/.idx, e.g. "data/wiki_text_document"."""

    split: str = "969,30,1"
    """Train, valid, test proportions of each prefix's documents, e.g. "969,30,1"."""

    seq_length: int = 2048
    """Tokens per sample (a sample holds seq_length + 1 tokens: inputs and shifted labels)."""

    seed: int = 1234
    """Seed of the document/sample shuffles and the blend order."""

    cache_dir: Optional[str] = None
    """Folder for megatron-core's index caches (document/sample/shuffle indices). None puts them
    beside each dataset, in <dataset folder>/cache."""

    tokenizer_type: str = "SentencePieceTokenizer"
    """SentencePieceTokenizer or HuggingFaceTokenizer (short names sentencepiece/huggingface)."""

    tokenizer_model: Optional[str] = None
    """The sentencepiece .model file, or a tokenizer.json file or the folder holding it."""

    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token inside a sample."""

    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens inside a sample."""

    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document token, i.e. on predicting the next
    document's first token across the boundary (megatron-core masks by input token, not label)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and value at the first invalid one."""
        if self.blend is not None:
            parse_blend(self.blend)  # raises with the field name
        parse_split(self.split)
        if not isinstance(self.seq_length, int) or isinstance(self.seq_length, bool) \
                or self.seq_length <= 0:
            raise ValueError(f"data.seq_length must be a positive integer, got {self.seq_length!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"data.seed must be a non-negative integer, got {self.seed!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"data.cache_dir must be a path or None, got {self.cache_dir!r}")
        from megatron_ntp.data.tokenizer_types import canonical_tokenizer_type

        try:
            canonical_tokenizer_type(self.tokenizer_type)
        except ValueError as err:
            raise ValueError(f"data.tokenizer_type: {err}") from None
        if self.tokenizer_model is not None and not isinstance(self.tokenizer_model, str):
            raise ValueError(
                f"data.tokenizer_model must be a path or None, got {self.tokenizer_model!r}")
        for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")

    def blend_tuple(self) -> Optional[Tuple[List[str], Optional[List[float]]]]:
        """The blend as megatron-core wants it: ([prefixes], [weights] or None)."""
        return None if self.blend is None else parse_blend(self.blend)


def parse_blend(blend: Union[str, List[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Parse Megatron's "w1 prefix1 w2 prefix2 ..." or "prefix1 prefix2 ...".

    Returns (prefixes, weights); weights is None when only prefixes are given. Weights must be
    positive numbers; they are returned as given (megatron-core normalises them).
    """
    if isinstance(blend, str):
        words = blend.split()
    elif isinstance(blend, (list, tuple)) and all(isinstance(w, (str, int, float)) for w in blend):
        words = [str(w) for w in blend]
    else:
        raise ValueError(f"data.blend must be a string or a list of strings, got {blend!r}")
    if not words:
        raise ValueError(f"data.blend is empty: {blend!r}")

    def as_number(word: str) -> Optional[float]:
        try:
            return float(word)
        except ValueError:
            return None

    numbers = [as_number(w) for w in words]
    if all(n is None for n in numbers):  # prefixes only
        return list(words), None
    if len(words) % 2:
        raise ValueError(f"data.blend must alternate weight and prefix, got an odd number of "
                         f"words ({len(words)}) in {blend!r}")
    weights, prefixes = [], []
    for i in range(0, len(words), 2):
        weight, prefix = numbers[i], words[i + 1]
        if weight is None:
            raise ValueError(f"data.blend: expected a weight at word {i + 1}, got {words[i]!r} "
                             f"in {blend!r}")
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise ValueError(f"data.blend: weight {words[i]!r} for {prefix!r} must be a positive "
                             f"finite number")
        if numbers[i + 1] is not None:
            raise ValueError(f"data.blend: expected a prefix after weight {words[i]!r}, got the "
                             f"number {prefix!r}")
        weights.append(weight)
        prefixes.append(prefix)
    return prefixes, weights


def parse_split(split: str) -> List[float]:
    """Parse "969,30,1" into three non-negative proportions that sum to 1."""
    parts = str(split).split(",")
    if not isinstance(split, str) or not 1 <= len(parts) <= 3 or \
            not all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", p) for p in parts):
        raise ValueError(f"data.split must be up to three non-negative numbers separated by "
                         f"commas, like '969,30,1'; got {split!r}")
    values = [float(p) for p in parts] + [0.0] * (3 - len(parts))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"data.split must not be all zeros, got {split!r}")
    return [v / total for v in values]
