"""check_environment on a (faked) GPU: FP8 recipes are checked against the compute capability,
the Transformer Engine version and torch's CUDA version before any process group starts,
instead of failing inside Transformer Engine or megatron-core at the first forward."""

import os
import sys
import types

import pytest
import torch

from megatron_ntp.config import ConfigError, check_environment, load_config, validate_config


@pytest.fixture
def fake_gpu(monkeypatch):
    """set(capability, te_version="2.8.0", cuda="12.9"): a GPU of that compute capability with
    that Transformer Engine installed and torch built for that CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")

    def set_gpu(capability, te_version="2.8.0", cuda="12.9"):
        engine = types.ModuleType("transformer_engine")
        engine.__version__ = te_version
        monkeypatch.setitem(sys.modules, "transformer_engine", engine)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
        monkeypatch.setattr(torch.version, "cuda", cuda)
    return set_gpu


def fp8_config(fp8, recipe):
    return validate_config(load_config(None, [
        "model.transformer_impl=transformer_engine", "model.bf16=true", f"model.fp8={fp8}",
        f"model.fp8_recipe={recipe}"], cuda_available=False))


@pytest.mark.parametrize("capability, fp8, recipe, needed", [
    ((8, 0), "e4m3", "delayed", "8.9"),      # A100: no FP8 tensor cores
    ((8, 9), "hybrid", "delayed", None),     # Ada
    ((9, 0), "hybrid", "tensorwise", None),  # H100
    ((8, 9), "e4m3", "blockwise", "9.0"),    # blockwise-scaled FP8 GEMMs start with Hopper
    ((9, 0), "e4m3", "blockwise", None),
    ((9, 0), "hybrid", "blockwise", None),
    ((9, 0), "e4m3", "mxfp8", "10.0"),       # MXFP8 needs Blackwell
    ((10, 0), "e4m3", "mxfp8", None),
])
def test_fp8_recipe_checked_against_the_gpu(fake_gpu, capability, fp8, recipe, needed):
    fake_gpu(capability)
    config = fp8_config(fp8, recipe)
    if needed is None:
        check_environment(config)
        return
    with pytest.raises(ConfigError) as err:
        check_environment(config)
    assert (f"model.fp8='{fp8}' with model.fp8_recipe='{recipe}' needs a GPU of compute "
            f"capability >= {needed}; Fake GPU has {capability[0]}.{capability[1]}"
            ) in str(err.value)


@pytest.mark.parametrize("recipe, te_version, needed", [
    ("blockwise", "2.2.0", "2.3.0.dev0"),   # megatron-core builds Float8BlockScaling from TE 2.3
    ("tensorwise", "2.1.0", "2.2.0.dev0"),  # Float8CurrentScaling from TE 2.2
])
def test_fp8_recipe_checked_against_transformer_engine(fake_gpu, recipe, te_version, needed):
    fake_gpu((9, 0), te_version=te_version)
    with pytest.raises(ConfigError, match=(
            f"model.fp8_recipe='{recipe}' needs Transformer Engine >= {needed}; {te_version} "
            f"is installed")):
        check_environment(fp8_config("e4m3", recipe))
    fake_gpu((9, 0), te_version=needed)
    check_environment(fp8_config("e4m3", recipe))


def test_blockwise_needs_cuda_12_9(fake_gpu):
    fake_gpu((9, 0), cuda="12.8")
    with pytest.raises(ConfigError, match=r"model.fp8_recipe='blockwise' needs torch built with "
                                          r"CUDA >= 12.9 .* this torch has CUDA 12.8"):
        check_environment(fp8_config("e4m3", "blockwise"))
    check_environment(fp8_config("e4m3", "delayed"))  # other recipes run on CUDA 12.8


def test_bf16_transformer_engine_needs_no_fp8_capability(fake_gpu):
    fake_gpu((8, 0))
    check_environment(validate_config(load_config(None, [
        "model.transformer_impl=transformer_engine", "model.bf16=true"])))


def overlap_config():
    return validate_config(load_config(None, [
        "model.preset=tiny-moe", "parallel.expert=2", "model.transformer_impl=transformer_engine",
        "model.bf16=true", "parallel.moe_a2a_overlap=true"], cuda_available=False), world_size=2)


def test_expert_overlap_needs_a_gpu_te_2_3_and_several_connections(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    fake_gpu((9, 0), te_version="2.2.0")
    with pytest.raises(ConfigError, match=r"parallel.moe_a2a_overlap=true needs Transformer "
                                          r"Engine >= 2.3.0 \(delay_wgrad_compute\); 2.2.0"):
        check_environment(overlap_config())
    fake_gpu((9, 0), te_version="2.3.0")
    check_environment(overlap_config())
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # exported by hand
    with pytest.raises(ConfigError, match=r"needs CUDA_DEVICE_MAX_CONNECTIONS > 1 \(it is 1"):
        check_environment(overlap_config())


def test_the_trainer_sets_cuda_connections_from_the_config(monkeypatch):
    """Unless the environment sets it, `train` sets CUDA_DEVICE_MAX_CONNECTIONS before CUDA
    starts: 32 for the expert all-to-all overlap, 1 otherwise (slurm/train.sbatch no longer
    exports 1, which stopped the MoE examples)."""
    import argparse

    from megatron_ntp import config as config_package
    from megatron_ntp import training
    from megatron_ntp.training import cli

    seen = []
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "")  # restored (to absent) afterwards
    monkeypatch.setattr(config_package, "check_environment", lambda config: seen.append(
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"]))
    monkeypatch.setattr(training, "run_training", lambda config: None)
    short = ["train.steps=1", "train.lr_warmup_steps=0"]
    overlap = ["model.preset=tiny-moe", "parallel.expert=2", "parallel.moe_a2a_overlap=true",
               "model.transformer_impl=transformer_engine", "model.bf16=true"]
    for overrides, expected in ((short, "1"), (short + overlap, "32")):
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
        monkeypatch.setenv("WORLD_SIZE", "2")
        cli._run_train(argparse.Namespace(config=None, overrides=overrides))
        assert seen[-1] == expected
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # the user's value wins
    cli._run_train(argparse.Namespace(config=None, overrides=short))
    assert seen[-1] == "8"


def test_expert_overlap_is_refused_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="parallel.moe_a2a_overlap=true and model."
                                          "transformer_impl='transformer_engine' needs a CUDA GPU"):
        check_environment(overlap_config())
