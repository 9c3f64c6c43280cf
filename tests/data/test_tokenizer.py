"""Tokenizer wrappers: what GPTDataset reads, and encoding equal to the raw backends."""

import json
import os
import shutil

import pytest
import sentencepiece
import tokenizers

from megatron_ntp.data.tokenizer import EncoderSpec, build_tokenizer, make_batch_encoder
from tests.data.helpers import EOD_TOKEN, train_tokenizer_json

SAMPLES = ["The quick brown fox jumps over the lazy dog.", "Return a new list.\n\n  Indented  x",
           "naïve café – ünïcödé ✓ 日本語", "  leading and trailing spaces  ", "x"]


def test_sentencepiece_wrapper(spm_model, spm_tokenizer):
    raw = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    tok = spm_tokenizer
    assert tok.vocab_size == raw.get_piece_size() == 1000
    # train_sentencepiece's fixed ids: pad 0, unk 1, bos 2, eos 3 (eos is the end of document).
    assert (tok.pad, tok.eod) == (0, 3) == (raw.pad_id(), raw.eos_id())
    assert tok.unique_identifiers["tokenizer_path"] == spm_model
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids == raw.encode(text)
        assert tok.detokenize(ids) == raw.decode(ids)
    assert tok.detokenize(tok.tokenize(SAMPLES[0])) == SAMPLES[0]
    # The batch encoder used by preprocessing gives exactly tokenize() per text.
    encode = make_batch_encoder(tok.encoder_spec)
    assert encode(SAMPLES) == [tok.tokenize(t) for t in SAMPLES]


def test_sentencepiece_special_token_is_one_piece(spm_tokenizer):
    ids = spm_tokenizer.tokenize("a <|im_start|> b")
    assert 4 in ids  # the first user-defined symbol comes after the 4 fixed ids


def test_tokenizer_json_wrapper(hf_tokenizer_json):
    raw = tokenizers.Tokenizer.from_file(hf_tokenizer_json)
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_json)
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 400
    assert tok.eod == raw.token_to_id(EOD_TOKEN) == 0
    assert tok.pad == -1  # no tokenizer_config.json: no pad (megatron-core's "none" value)
    assert tok.unique_identifiers["tokenizer_path"] == hf_tokenizer_json
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert ids == raw.encode(text).ids
        assert tok.detokenize(ids) == text  # byte-level BPE is lossless
    encode = make_batch_encoder(tok.encoder_spec)
    assert encode(SAMPLES) == [tok.tokenize(t) for t in SAMPLES]


def test_tokenizer_json_folder_with_config(hf_tokenizer_json, tmp_path):
    """A model folder (like a Qwen3 download): tokenizer_config.json names eos and pad."""
    shutil.copy(hf_tokenizer_json, tmp_path / "tokenizer.json")
    config = {"eos_token": {"content": "<|pad|>"}, "pad_token": EOD_TOKEN, "bos_token": "Ġthe"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = build_tokenizer("huggingface", str(tmp_path))
    assert (tok.eod, tok.pad) == (1, 0)
    the = tokenizers.Tokenizer.from_file(hf_tokenizer_json).token_to_id("Ġthe")
    assert the is not None and tok.bos == the
    # Explicit arguments override the config file.
    tok = build_tokenizer("huggingface", str(tmp_path), eod_token=EOD_TOKEN, pad_token="<|pad|>")
    assert (tok.eod, tok.pad) == (0, 1)


def test_tokenizer_json_vocab_size_is_largest_id_plus_one(tmp_path):
    """Ids with a gap (an added token far above the base vocabulary) must fit the dtype."""
    from tokenizers import Tokenizer, models

    base = {"[UNK]": 0, "a": 1, "b": 2}
    tok = Tokenizer(models.WordLevel({**base, EOD_TOKEN: 70_000}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    wrapped = build_tokenizer("huggingface", str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 4 and wrapped.vocab_size == 70_001
    assert wrapped.eod == 70_000


def test_tokenizer_json_without_eod_fails(corpus_texts, tmp_path):
    path = train_tokenizer_json(corpus_texts[:50], tmp_path / "tokenizer.json",
                                vocab_size=300, special_tokens=("<unk>",))
    with pytest.raises(ValueError, match="end-of-document token"):
        build_tokenizer("huggingface", path)
    with pytest.raises(ValueError, match="'<nope>' is not in its vocabulary"):
        build_tokenizer("huggingface", path, eod_token="<unk>", pad_token="<nope>")


def test_tokenizer_errors(spm_model, tmp_path):
    with pytest.raises(ValueError, match="tokenizer type 'GPT2BPETokenizer' is not supported"):
        build_tokenizer("GPT2BPETokenizer", spm_model)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer("huggingface", str(tmp_path))
    with pytest.raises(ValueError, match="huggingface tokenizers only"):
        build_tokenizer("sentencepiece", spm_model, eod_token="</s>")
    with pytest.raises(ValueError, match="kind 'bpe'"):
        make_batch_encoder(EncoderSpec("bpe", os.fspath(spm_model)))
