"""CPU checks of tests/gpu/runs.py's train_from_same_weights, the harness of the TE vs local
comparison, with local layers on both sides (a spawned process: it joins a gloo group): two
bf16 models from the same weights train bit for bit alike, and an fp32 source copied into a
bf16 target stays within the tolerances the GPU test applies to TE vs local (this is their
calibration). A TE target fails before any process group on a machine without CUDA."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ntp.config import ConfigError
from tests.gpu.layer_names import local_to_te_keys_map
from tests.gpu.runs import (
    config_of,
    keys_map_between,
    tiny_overrides,
    train_from_same_weights,
)

STEPS = 3


def _two_pairs(sample, folder, out):
    def run(name, source_extra, target_extra):
        runs = train_from_same_weights(
            tiny_overrides(sample, f"{folder}/{name}-source", *source_extra, steps=STEPS),
            tiny_overrides(sample, f"{folder}/{name}-target", *target_extra, steps=STEPS))
        gap = (runs.first_ce[1] - runs.first_ce[0]).abs()
        return {"ce_max": gap.max().item(), "ce_mean": gap.mean().item(),
                "losses": [[r["loss"] for r in records] for records in runs.records]}

    results = {"same": run("same", (), ()), "fp32": run("fp32", ("model.bf16=false",), ())}
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def pairs(sample_data, tmp_path_factory):
    if torch.cuda.is_available():  # on a GPU bit-for-bit needs deterministic kernels
        pytest.skip("a CPU check: on a GPU machine tests/gpu runs the TE vs local comparison")
    folder = tmp_path_factory.mktemp("same_weights")
    process = mp.get_context("spawn").Process(
        target=_two_pairs, args=(tuple(sample_data), str(folder), str(folder / "out.json")))
    process.start()
    process.join()
    assert process.exitcode == 0
    return json.loads((folder / "out.json").read_text())


def test_same_weights_train_alike(pairs):
    same = pairs["same"]
    assert same["ce_max"] == 0.0
    assert same["losses"][0] == same["losses"][1] and len(same["losses"][0]) == STEPS


def test_fp32_to_bf16_is_within_the_gpu_tolerances(pairs):
    fp32 = pairs["fp32"]
    assert 0 < fp32["ce_max"] <= 0.05 and fp32["ce_mean"] <= 0.01
    source, target = fp32["losses"]
    assert all(math.isfinite(v) for v in source + target)
    assert max(abs(a - b) / abs(b) for a, b in zip(target, source)) <= 1e-2


def test_te_target_needs_a_gpu(sample_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/gpu runs the real comparison")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train_from_same_weights(
            tiny_overrides(sample_data, tmp_path / "a"),
            tiny_overrides(sample_data, tmp_path / "b",
                           "model.transformer_impl=transformer_engine"))


def test_names_are_mapped_local_to_te_only(sample_data, tmp_path):
    local = config_of(tiny_overrides(sample_data, tmp_path))
    te = config_of(tiny_overrides(sample_data, tmp_path, "model.transformer_impl="
                                  "transformer_engine"))
    assert keys_map_between(local, te) == local_to_te_keys_map(local) != {}
    assert keys_map_between(local, local) == {}
    with pytest.raises(ValueError, match="not transformer_engine -> local"):
        keys_map_between(te, local)
