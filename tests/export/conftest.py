"""Fixtures of the export tests (shared with tests/eval): sample dataset, TP=2 checkpoints."""

import warnings

import pytest

from tests.eval.checkpoints import sample_data_once, trained_checkpoints

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl|Apex).*")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    return sample_data_once(tmp_path_factory)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sample_data):
    return trained_checkpoints(tmp_path_factory, sample_data)
