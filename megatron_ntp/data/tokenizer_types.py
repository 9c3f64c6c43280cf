"""Tokenizer type names (no megatron-core import: config validation uses them)."""

# Accepted spellings of --tokenizer-type / data.tokenizer_type: Megatron-LM's class names and
# short names, mapped to the two backends.
_TYPE_ALIASES = {
    "sentencepiece": "sentencepiece",
    "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece",
    "huggingface": "huggingface",
    "huggingfacetokenizer": "huggingface",
}
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


def canonical_tokenizer_type(tokenizer_type: str) -> str:
    """Map a Megatron-style type name to "sentencepiece" or "huggingface" (else ValueError)."""
    kind = _TYPE_ALIASES.get(str(tokenizer_type).lower())
    if kind is None:
        raise ValueError(
            f"tokenizer type {tokenizer_type!r} is not supported; use one of {TOKENIZER_TYPES} "
            f"(or the short names 'sentencepiece', 'huggingface')"
        )
    return kind
