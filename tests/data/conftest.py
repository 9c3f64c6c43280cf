"""Shared, session-scoped inputs for the data tests: a small corpus and two tokenizers."""

import json
import warnings

import pytest

from tests.data.helpers import train_tokenizer_json

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl).*")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus(data_dir):
    """~300 KB of standard-library docstrings, one JSON document per line."""
    from megatron_ntp.data.sample_corpus import write_sample_corpus

    path = str(data_dir / "corpus.jsonl")
    write_sample_corpus(path, max_bytes=300_000)
    return path


@pytest.fixture(scope="session")
def corpus_texts(corpus):
    with open(corpus, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def spm_model(corpus, data_dir):
    """A 1000-piece sentencepiece BPE model trained on the corpus (pad 0, unk 1, bos 2, eos 3)."""
    from megatron_ntp.data.train_tokenizer import train_sentencepiece

    return train_sentencepiece([corpus], str(data_dir / "spm"), vocab_size=1000,
                               sample_size=50_000, special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def spm_tokenizer(spm_model):
    from megatron_ntp.data.tokenizer import build_tokenizer

    return build_tokenizer("SentencePieceTokenizer", spm_model)


@pytest.fixture(scope="session")
def hf_tokenizer_json(corpus_texts, data_dir):
    folder = data_dir / "hf_tokenizer"
    folder.mkdir()
    return train_tokenizer_json(corpus_texts[:300], folder / "tokenizer.json")
