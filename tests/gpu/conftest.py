"""The GPU acceptance check (bash tools/gpu_check.sh): every test here is marked `gpu` and is
skipped, with the reason, where CUDA is not available. Tests that need Transformer Engine skip
with the import error where it cannot be imported. Tests here without the `gpu` mark check the
acceptance check's own pieces on CPU (tests/gpu/test_*_cpu.py)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: part of `bash tools/gpu_check.sh --quick` (the "
                                       "tests a short GPU loan runs first)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `bash tools/gpu_check.sh` on a GPU "
                                   "machine (this one has none)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except Exception as err:  # ImportError, or OSError without libcuda
        pytest.skip(f"needs Transformer Engine ({type(err).__name__}: {err})")


@pytest.fixture
def report(request):
    """Print a figure past pytest's capture (the check's output names what it measured)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def emit(line):
        with capture.global_and_fixture_disabled():
            print(f"\n[gpu] {line}", flush=True)
    return emit
