"""Train a sentencepiece BPE model from JSONL text.

The model gets fixed special ids that the rest of the project relies on: pad=0, unk=1, bos=2,
eos=3 (eos is the end-of-document token that --append-eod writes; a real pad id lets megatron-core
mask padding). Byte fallback is on, so any UTF-8 text encodes without unknown tokens.

Usage (tools/train_tokenizer.py): ``--input corpus.jsonl --model-prefix out/spm --vocab-size 8000``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator, List, Optional, Sequence

SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
_MAX_SENTENCE_BYTES = 4192  # sentencepiece's max_sentence_length default: longer lines are cut


def iter_training_lines(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """The non-empty lines of every document's text (sentencepiece trains on lines).

    Bad lines are skipped silently here: the tokenizer only needs a sample of good text, and
    preprocessing reports bad input in detail.
    """
    from megatron_ntp.data.jsonl import open_input

    for path in paths:
        raw, stream = open_input(path)
        with raw, stream:
            for line in stream:
                try:
                    text = json.loads(line).get(json_key)
                except (ValueError, AttributeError):
                    continue
                if not isinstance(text, str):
                    continue
                for piece in text.splitlines():
                    piece = piece.strip()
                    if piece:
                        # Cut at a character boundary below sentencepiece's byte limit.
                        if len(piece.encode("utf-8", "replace")) > _MAX_SENTENCE_BYTES:
                            piece = piece.encode("utf-8", "replace")[:_MAX_SENTENCE_BYTES].decode(
                                "utf-8", "ignore")
                        yield piece


def train_sentencepiece(inputs: Sequence[str], model_prefix: str, vocab_size: int = 8000,
                        sample_size: int = 2_000_000, special_tokens: Optional[List[str]] = None,
                        json_key: str = "text", model_type: str = "bpe",
                        character_coverage: float = 0.9995, threads: Optional[int] = None,
                        seed: int = 0) -> str:
    """Train and write ``<model_prefix>.model`` (and ``.vocab``); returns the .model path.

    Args:
        inputs: JSONL files or globs (.gz accepted).
        model_prefix: output path without extension; its folder must exist.
        vocab_size: pieces in the model, special ones included.
        sample_size: at most this many text lines, sampled at random, are trained on.
        special_tokens: extra tokens kept whole and never split (user-defined symbols), e.g.
            ["<|im_start|>", "<|im_end|>"]; they get the ids after the four fixed ones.
        json_key: the JSON key holding the text.
        model_type: "bpe" (default) or "unigram".
        seed: sentencepiece's sampling seed, for repeatable models.
    """
    import sentencepiece as spm

    from megatron_ntp.data.jsonl import resolve_inputs

    paths = resolve_inputs(inputs)
    if vocab_size < len(SPECIAL_IDS) + len(special_tokens or []) + 1:
        raise ValueError(f"--vocab-size {vocab_size} is too small for the special tokens")
    if sample_size < 1:
        raise ValueError(f"--sample-size must be positive, got {sample_size}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {model_type!r}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--model-prefix {model_prefix!r}: folder {out_dir} does not exist")
    for token in special_tokens or []:
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"--special-tokens: {token!r} must be non-empty without whitespace")

    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_training_lines(paths, json_key),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        input_sentence_size=sample_size,
        shuffle_input_sentence=True,
        user_defined_symbols=list(special_tokens or []),
        num_threads=threads or len(os.sched_getaffinity(0)),
        minloglevel=2,  # sentencepiece's own INFO logging is thousands of lines
        **SPECIAL_IDS,
    )
    return model_prefix + ".model"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train a sentencepiece BPE tokenizer from JSONL.")
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or globs (.gz ok)")
    parser.add_argument("--json-key", default="text", help="JSON key holding the text")
    parser.add_argument("--model-prefix", required=True,
                        help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--sample-size", type=int, default=2_000_000,
                        help="train on at most this many text lines, sampled at random")
    parser.add_argument("--special-tokens", nargs="*", default=[],
                        help="extra tokens never split, e.g. '<|im_start|>' '<|im_end|>'")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        model = train_sentencepiece(
            args.input, args.model_prefix, vocab_size=args.vocab_size,
            sample_size=args.sample_size, special_tokens=args.special_tokens,
            json_key=args.json_key, model_type=args.model_type,
            character_coverage=args.character_coverage, seed=args.seed)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"[train_tokenizer] error: {err}", file=sys.stderr)
        return 1
    print(f"[train_tokenizer] wrote {model} (vocab {args.vocab_size}, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
