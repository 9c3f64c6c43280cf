"""Session fixtures of the training tests: a small preprocessed dataset and its tokenizer."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl|Apex).*")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """(dataset prefix, tokenizer model): 300 KB of the sample corpus, a 1000-piece BPE."""
    from megatron_ntp.training.data import ensure_sample_dataset

    folder = tmp_path_factory.mktemp("sample_data")
    return ensure_sample_dataset(str(folder), vocab_size=1000, corpus_bytes=300_000)
