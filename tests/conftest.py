"""Session fixtures shared by the suites (each built once per session, only when used)."""

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl|Apex).*")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """(dataset prefix, tokenizer model): 300 KB of the sample corpus, a 1000-piece BPE."""
    from megatron_ntp.training.data import ensure_sample_dataset

    folder = tmp_path_factory.mktemp("sample_data")
    return ensure_sample_dataset(str(folder), vocab_size=1000, corpus_bytes=300_000)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sample_data):
    """Tiny dense and MoE checkpoints trained at TP = 2 (tests/eval and tests/export)."""
    from tests.eval.checkpoints import trained_checkpoints

    return trained_checkpoints(tmp_path_factory, sample_data)
