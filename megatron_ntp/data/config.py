"""The data section of the project's config: what to train on and how to cut it into samples.

A plain dataclass (no megatron-core import) so the typed config tree can compose and validate it
before any process group starts. :func:`megatron_ntp.data.datasets.build_datasets` turns it into
megatron-core datasets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from megatron_ntp.data.blend import Blend, parse_blend_value, parse_one_blend


@dataclass
class DataConfig:
    """Datasets for training: a weighted blend of preprocessed prefixes, split train/valid/test."""

    blend: Union[str, List[str], Dict[str, Union[str, List[str]]], None] = None
    """Megatron's blend: "weight prefix weight prefix ..." (weights are normalised), or just
    "prefix prefix ..." (weighted by size), as one string or a list of words; or "file:path", a
    blend file (the same words over lines, "#" comments; Megatron-LM's --data-args-path); or
    a mapping {train: ..., valid: ..., test: ...} of such blends, one per split (data.split is
    then unused). A prefix is the path of a preprocessed dataset without .bin/.idx, e.g.
    "data/wiki_text_document"."""

    split: str = "969,30,1"
    """Train, valid, test proportions of each prefix's documents, e.g. "969,30,1" (not used
    with a per-split blend)."""

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
        parse_blend_value(self.blend)  # raises naming the field, or the blend file's line
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

    def blends(self) -> Union[Blend, List[Optional[Blend]], None]:
        """None, one Blend, or [train, valid, test] Blends (reads a blend file each call)."""
        return parse_blend_value(self.blend)

    def blend_tuple(self) -> Optional[Tuple[List[str], Optional[List[float]]]]:
        """The blend as megatron-core wants it: ([prefixes], [weights] or None); None when
        unset or per split (see `blend_per_split`)."""
        blends = self.blends()
        return blends.as_tuple() if isinstance(blends, Blend) else None

    def blend_per_split(self) -> Optional[List[Optional[Tuple[List[str], Optional[List[float]]]]]]:
        """megatron-core's blend_per_split ([train, valid, test], None for a split without
        data), or None when the blend is not per split."""
        blends = self.blends()
        if not isinstance(blends, list):
            return None
        return [None if b is None else b.as_tuple() for b in blends]


def parse_blend(blend: Union[str, List[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Parse one blend (inline words or "file:path") of data.blend into (prefixes, weights);
    weights is None when only prefixes are given, else as given (megatron-core normalises)."""
    return parse_one_blend(blend, "data.blend").as_tuple()


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
