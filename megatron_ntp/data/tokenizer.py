"""Tokenizers that megatron-core's GPTDataset (and the preprocessing tool) can use.

Two backends, both returned as megatron-core ``GPTTokenizer`` objects (the class megatron-core's
``MegatronTokenizer.from_pretrained`` builds), so they carry what GPTDataset reads: ``vocab_size``,
``eod``, ``pad`` (-1 when the model has none, which is megatron-core's own "no pad" value) and
``unique_identifiers`` (hashed into the dataset index cache names), plus ``tokenize`` and
``detokenize``:

- ``sentencepiece``: a ``.model`` file, through megatron-core's own SentencePieceTokenizer library.
- ``huggingface``: a Hugging Face ``tokenizer.json`` file (or a folder holding one, such as a
  downloaded Qwen3 model), through the ``tokenizers`` package. megatron-core's own
  HuggingFaceTokenizer needs ``transformers`` (not installed, and far heavier), so this module adds
  a small library class for ``tokenizers`` and plugs it into megatron-core's GPTTokenizer.

Preprocessing encodes millions of documents, so each backend also has a batch encoder
(:func:`make_batch_encoder`) that calls the backend's batch API directly; it is built from a small
picklable :class:`EncoderSpec` inside worker processes and gives exactly ``tokenize(text)`` for each
text (a test checks this).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import tokenizers
from megatron.core.tokenizers import MegatronTokenizer
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import MegatronTokenizerTextAbstract
from megatron.core.tokenizers.text.models import GPTTokenizer

from megatron_ntp.data.tokenizer_types import canonical_tokenizer_type

# End-of-document candidates tried, in order, when a tokenizer.json comes without a
# tokenizer_config.json naming its eos token. Qwen3 and GPT-2 use <|endoftext|>.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _resolve_tokenizer_json(path: str) -> str:
    """The tokenizer.json file for ``path`` (the file itself or a folder holding it)."""
    candidate = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"tokenizer model {path!r}: no tokenizer.json file found there")
    return candidate


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker process needs to rebuild a batch encoder (picklable, small)."""

    kind: str  # "sentencepiece" or "huggingface"
    path: str  # .model file, or tokenizer.json file
    add_special_tokens: bool = True  # huggingface only: post-processor tokens (e.g. a BOS)


class TokenizerJsonLibrary(MegatronTokenizerTextAbstract):
    """A Hugging Face ``tokenizer.json`` behind megatron-core's text-library interface."""

    def __init__(
        self,
        tokenizer_path: str,
        eod_token: Optional[str] = None,
        pad_token: Optional[str] = None,
        add_special_tokens: bool = True,
    ) -> None:
        self.json_path = _resolve_tokenizer_json(tokenizer_path)
        self.tokenizer = tokenizers.Tokenizer.from_file(self.json_path)
        # Training documents must never be cut or padded by settings saved in the file.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.add_special_tokens_on_encode = add_special_tokens

        config = {}
        config_path = os.path.join(os.path.dirname(self.json_path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)

        if eod_token is None:
            eod_token = _token_content(config.get("eos_token"))
        if eod_token is None:
            eod_token = next((t for t in _EOD_CANDIDATES if t in vocab), None)
        if eod_token is None or eod_token not in vocab:
            raise ValueError(
                f"tokenizer {self.json_path}: end-of-document token {eod_token!r} is not in "
                f"its vocabulary; name one with eod_token= (tried tokenizer_config.json's "
                f"eos_token and {list(_EOD_CANDIDATES)})"
            )
        if pad_token is None:
            pad_token = _token_content(config.get("pad_token"))
        if pad_token is not None and pad_token not in vocab:
            raise ValueError(
                f"tokenizer {self.json_path}: pad token {pad_token!r} is not in its vocabulary"
            )
        self.eod_token, self.pad_token = eod_token, pad_token
        self.bos_token = _token_content(config.get("bos_token"))
        # One past the largest id, not the number of tokens: ids may have gaps, and every id
        # must fit the dtype preprocessing picks from this number.
        self._vocab_size = max(vocab.values()) + 1
        self.space_sensitive = self.text_to_tokens("x y") != (
            self.text_to_tokens("x") + self.text_to_tokens("y")
        )

    def text_to_tokens(self, text: str) -> List[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def tokens_to_ids(self, tokens: List[str]) -> List[int]:
        return [self.tokenizer.token_to_id(t) for t in tokens]

    def ids_to_tokens(self, ids: List[int]) -> List[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def text_to_ids(self, text: str) -> List[int]:
        return self.tokenizer.encode(
            text, add_special_tokens=self.add_special_tokens_on_encode
        ).ids

    def ids_to_text(self, ids, remove_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=remove_special_tokens)

    def add_special_tokens(self, special_tokens) -> None:
        if isinstance(special_tokens, dict):
            special_tokens = list(special_tokens.values())
        self.tokenizer.add_special_tokens(list(special_tokens))
        self._vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates need transformers; not used in pretraining")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> list:
        inverse = self.inv_vocab
        return [inverse.get(i) for i in range(self.vocab_size)]

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.tokenizer.get_vocab(with_added_tokens=True).items()}

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eod_token)

    @property
    def pad_id(self) -> int:
        # -1 is megatron-core's "no pad token" value (megatron_dataset._PAD_TOKEN_ID).
        return -1 if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    @property
    def unk_id(self):
        return None


class TokenizerJsonGPTTokenizer(GPTTokenizer):
    """GPTTokenizer over a Hugging Face tokenizer.json (``tokenizers`` package)."""

    def _restore_model(self, **kwargs):
        return TokenizerJsonLibrary(self.path, **kwargs)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str,
    *,
    eod_token: Optional[str] = None,
    pad_token: Optional[str] = None,
    add_special_tokens: bool = True,
):
    """Load a tokenizer as a megatron-core GPTTokenizer.

    Args:
        tokenizer_type: "SentencePieceTokenizer"/"sentencepiece" or
            "HuggingFaceTokenizer"/"huggingface".
        tokenizer_model: a sentencepiece ``.model`` file, or a ``tokenizer.json`` file or folder.
        eod_token, pad_token: huggingface only; override tokenizer_config.json's eos/pad tokens.
        add_special_tokens: huggingface only; let the post-processor add its tokens (e.g. a BOS),
            as megatron-core's HuggingFaceTokenizer does by default.

    The result has ``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``, ``tokenize`` and
    ``detokenize``, and ``encoder_spec`` for :func:`make_batch_encoder`.
    """
    kind = canonical_tokenizer_type(tokenizer_type)
    if not tokenizer_model:
        raise ValueError(f"tokenizer model path is required for tokenizer type {tokenizer_type!r}")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model {tokenizer_model!r} does not exist")

    if kind == "sentencepiece":
        if eod_token is not None or pad_token is not None:
            raise ValueError("eod_token/pad_token apply to huggingface tokenizers only; a "
                             "sentencepiece model defines its eos (used as eod) and pad ids itself")
        # A metadata dict instead of megatron-core's tokenizer_metadata.json: nothing is written
        # beside the user's model file. (from_pretrained mutates the dict: pass a fresh one.)
        tokenizer = MegatronTokenizer.from_pretrained(
            tokenizer_path=tokenizer_model,
            metadata_path={"library": "sentencepiece", "model_type": "gpt"},
        )
        if tokenizer.eod is None or tokenizer.eod < 0:
            raise ValueError(f"sentencepiece model {tokenizer_model}: it has no eos piece to use "
                             f"as end-of-document (train it with eos_id >= 0)")
        spec = EncoderSpec("sentencepiece", os.path.abspath(tokenizer_model))
    else:
        options = {"add_special_tokens": add_special_tokens}
        if eod_token is not None:
            options["eod_token"] = eod_token
        if pad_token is not None:
            options["pad_token"] = pad_token
        tokenizer = TokenizerJsonGPTTokenizer(
            path=tokenizer_model, config={"library": "huggingface", "model_type": "gpt"}, **options
        )
        spec = EncoderSpec(
            "huggingface", os.path.abspath(tokenizer._tokenizer.json_path), add_special_tokens
        )
    tokenizer.encoder_spec = spec
    return tokenizer


def make_batch_encoder(spec: EncoderSpec) -> Callable[[Sequence[str]], List[List[int]]]:
    """A function encoding a list of texts to lists of ids, equal to ``tokenize`` per text.

    It calls the backend directly (no per-text Python wrapper): sentencepiece single-threaded,
    because parallelism comes from the worker processes.
    """
    if spec.kind == "sentencepiece":
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=spec.path)

        def encode(texts: Sequence[str]) -> List[List[int]]:
            return processor.encode(list(texts), num_threads=1)

        return encode
    if spec.kind == "huggingface":
        tok = tokenizers.Tokenizer.from_file(spec.path)
        tok.no_truncation()
        tok.no_padding()
        add_special = spec.add_special_tokens

        def encode(texts: Sequence[str]) -> List[List[int]]:
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=add_special)]

        return encode
    raise ValueError(f"encoder spec kind {spec.kind!r} is not 'sentencepiece' or 'huggingface'")
