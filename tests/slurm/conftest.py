"""Session harness of the Slurm tests: a real single-node Slurm started by slurm/local/up.sh
(which installs the Debian packages with apt-get when they are missing and this runs as root),
shared by the tests of this folder and stopped by slurm/local/down.sh at the end.

The tests skip, with the reason printed, only when up.sh reports that Slurm cannot be installed
(exit status 3: not root, no apt-get, or apt-get failed); any other failure to start is an
error. The install and start-up times are printed in the test summary.
"""

import os
import subprocess
import sys
import time
import warnings

import pytest

from tests.slurm.harness import LocalSlurm

warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl|Apex).*")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UP = os.path.join(ROOT, "slurm", "local", "up.sh")
DOWN = os.path.join(ROOT, "slurm", "local", "down.sh")


def _report(config, line: str):
    """Print past pytest's output capture (the install time belongs in the CI log)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        print(line, file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def slurm(request, tmp_path_factory):
    state = str(tmp_path_factory.mktemp("slurm_state"))
    start = time.monotonic()
    try:
        result = subprocess.run(["bash", UP, state], capture_output=True, text=True,
                                timeout=1500)
    except subprocess.TimeoutExpired:
        pytest.fail("slurm/local/up.sh did not finish in 1500 s")
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    installed = [line for line in output.splitlines() if "installed in" in line]
    _report(request.config, f"\n[tests/slurm] local Slurm up in {elapsed:.1f} s"
                            f"{' (' + installed[0].split('] ')[-1] + ')' if installed else ''}")
    if result.returncode == 3:
        reason = f"Slurm cannot be installed here: {output.strip().splitlines()[-1]}"
        _report(request.config, f"[tests/slurm] skipping: {reason}")
        pytest.skip(reason)
    if result.returncode != 0:
        subprocess.run(["bash", DOWN, state], capture_output=True, timeout=120)
        pytest.fail(f"slurm/local/up.sh failed ({result.returncode}):\n{output[-4000:]}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(state, "slurm.conf")
    try:
        yield LocalSlurm(state)
    finally:
        subprocess.run(["bash", DOWN, state], capture_output=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(dataset prefix, tokenizer model): 300 KB of the sample corpus, a 1000-piece BPE."""
    from megatron_ntp.training.data import ensure_sample_dataset

    folder = tmp_path_factory.mktemp("slurm_sample_data")
    return ensure_sample_dataset(str(folder), vocab_size=1000, corpus_bytes=300_000)
