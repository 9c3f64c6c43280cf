"""Dataset blends: weighted lists of preprocessed prefixes, inline or from a file, whole or per
split.

`data.blend` takes one of:

- inline words, Megatron-LM's --data-path: "w1 prefix1 w2 prefix2 ..." (weights normalised by
  megatron-core) or "prefix1 prefix2 ..." (weighted by size), as a string or a list;
- "file:path": a blend file, Megatron-LM's --data-args-path: the same words spread over lines,
  "#" starting a comment, blank lines ignored, e.g. one "weight prefix" pair per line;
- a mapping {train: ..., valid: ..., test: ...} of such blends: a blend per split
  (Megatron-LM's --train-data-path, --valid-data-path, --test-data-path; megatron-core's
  blend_per_split). A split left out gets no dataset; data.split is not used.

Every prefix remembers where it was written (`data.blend`, or `file:line`), so a missing
dataset is reported at its line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

SPLITS = ("train", "valid", "test")
FILE_MARK = "file:"  # (not "@": YAML reserves it, so it would need quoting)

BlendValue = Union[str, List[str], Dict[str, Union[str, List[str]]], None]


@dataclass(frozen=True)
class Blend:
    """One blend: prefixes, their weights (None: weighted by size) and where each was written."""

    prefixes: List[str]
    weights: Optional[List[float]]
    sources: List[str]  # per prefix: "data.blend" or "<file>:<line>"

    def as_tuple(self) -> Tuple[List[str], Optional[List[float]]]:
        """megatron-core's form: ([prefixes], [weights] or None)."""
        return list(self.prefixes), None if self.weights is None else list(self.weights)


def _as_number(word: str) -> Optional[float]:
    try:
        return float(word)
    except ValueError:
        return None


def blend_from_words(words: Sequence[str], sources: Sequence[str], field: str) -> Blend:
    """Megatron's "w1 prefix1 w2 prefix2 ..." or "prefix1 prefix2 ..."; sources[i] says where
    words[i] was written (for the error messages)."""
    if not words:
        raise ValueError(f"{field} is empty: no prefix given")
    numbers = [_as_number(w) for w in words]
    if all(n is None for n in numbers):  # prefixes only
        return Blend(list(words), None, list(sources))
    if len(words) % 2:
        raise ValueError(f"{field} must alternate weight and prefix, got an odd number of "
                         f"words ({len(words)}): {' '.join(words)[:200]!r}")
    weights, prefixes, where = [], [], []
    for i in range(0, len(words), 2):
        weight, prefix = numbers[i], words[i + 1]
        if weight is None:
            raise ValueError(f"{sources[i]}: expected a weight, got {words[i]!r}")
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"{sources[i]}: weight {words[i]!r} for {prefix!r} must be a "
                             f"positive finite number")
        if numbers[i + 1] is not None:
            raise ValueError(f"{sources[i + 1]}: expected a prefix after weight {words[i]!r}, "
                             f"got the number {prefix!r}")
        weights.append(weight)
        prefixes.append(prefix)
        where.append(sources[i + 1])
    return Blend(prefixes, weights, where)


def read_blend_file(path: str, field: str) -> Blend:
    """A blend file: the words of a blend over any number of lines, "#" comments allowed."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ValueError(f"{field}: cannot read the blend file {path!r} "
                                f"({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{field}: the blend file {path!r} is not UTF-8 text ({err})") from None
    words, sources = [], []
    for number, line in enumerate(lines, start=1):
        line_words = line.split("#", 1)[0].split()
        words += line_words
        sources += [f"{path}:{number}"] * len(line_words)
    if not words:
        raise ValueError(f"{field}: the blend file {path!r} names no prefix")
    return blend_from_words(words, sources, f"{field} (file {path})")


def parse_one_blend(value, field: str) -> Blend:
    """Inline words (a string or a list) or FILE_MARK + path of a blend file."""
    if isinstance(value, str):
        words = value.split()
    elif isinstance(value, (list, tuple)) and all(isinstance(w, (str, int, float))
                                                  and not isinstance(w, bool) for w in value):
        words = [str(w) for w in value]
    else:
        raise ValueError(f"{field} must be a string, a list of words or a mapping of splits, "
                         f"got {value!r}")
    if len(words) == 1 and words[0].startswith(FILE_MARK):
        return read_blend_file(words[0][len(FILE_MARK):], field)
    if any(w.startswith(FILE_MARK) for w in words):
        raise ValueError(f"{field}: a blend file ({FILE_MARK}path) must be the blend's only "
                         f"word, got {value!r}")
    return blend_from_words(words, [field] * len(words), field)


def parse_blend_value(value: BlendValue, field: str = "data.blend"
                      ) -> Union[Blend, List[Optional[Blend]], None]:
    """None, one Blend, or [train, valid, test] Blends (None where a split has none)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return parse_one_blend(value, field)
    unknown = sorted(set(value) - set(SPLITS))
    if unknown:
        raise ValueError(f"{field}: unknown split(s) {unknown}; a per-split blend has keys "
                         f"{', '.join(SPLITS)}")
    if not any(value.get(s) is not None for s in SPLITS):
        raise ValueError(f"{field}: the per-split blend names no split")
    return [None if value.get(s) is None else parse_one_blend(value[s], f"{field}.{s}")
            for s in SPLITS]


def check_prefixes_exist(blends: Sequence[Optional[Blend]]) -> None:
    """FileNotFoundError naming the first prefix without its .bin/.idx, and where it was
    written (the blend file's line)."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    for blend in blends:
        for prefix, source in zip(blend.prefixes, blend.sources) if blend else ():
            for path in (get_idx_path(prefix), get_bin_path(prefix)):
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{source}: dataset prefix {prefix!r} has no {os.path.basename(path)} "
                        f"(looked for {path}); run tools/preprocess_data.py first")
