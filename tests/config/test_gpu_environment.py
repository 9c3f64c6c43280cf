"""check_environment on a (faked) GPU: FP8 recipes are checked against the compute capability
before any process group starts, instead of failing inside Transformer Engine at the first
forward."""

import sys
import types

import pytest
import torch

from megatron_ntp.config import ConfigError, check_environment, load_config, validate_config


@pytest.fixture
def gpu_with_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")

    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (major, minor))
    return set_capability


def fp8_config(fp8, recipe):
    return validate_config(load_config(None, [
        "model.transformer_impl=transformer_engine", f"model.fp8={fp8}",
        f"model.fp8_recipe={recipe}"]))


@pytest.mark.parametrize("capability, fp8, recipe, allowed", [
    ((8, 0), "e4m3", "delayed", False),     # A100: no FP8 tensor cores
    ((8, 9), "hybrid", "delayed", True),    # Ada
    ((9, 0), "hybrid", "tensorwise", True),  # H100
    ((9, 0), "e4m3", "blockwise", True),
    ((9, 0), "e4m3", "mxfp8", False),       # MXFP8 needs Blackwell
    ((10, 0), "e4m3", "mxfp8", True),
])
def test_fp8_recipe_checked_against_the_gpu(gpu_with_capability, capability, fp8, recipe,
                                             allowed):
    gpu_with_capability(*capability)
    config = fp8_config(fp8, recipe)
    if allowed:
        check_environment(config)
        return
    with pytest.raises(ConfigError) as err:
        check_environment(config)
    needed = "10.0" if recipe == "mxfp8" else "8.9"
    assert (f"model.fp8='{fp8}' with model.fp8_recipe='{recipe}' needs a GPU of compute "
            f"capability >= {needed}; Fake GPU has {capability[0]}.{capability[1]}") in str(err.value)


def test_bf16_transformer_engine_needs_no_fp8_capability(gpu_with_capability):
    gpu_with_capability(8, 0)
    check_environment(validate_config(load_config(None, [
        "model.transformer_impl=transformer_engine", "model.bf16=true"])))
