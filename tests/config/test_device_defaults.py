"""The GPU defaults (schema.GPU_DEFAULTS): Transformer Engine layers, bf16 and the distributed
optimizer where CUDA is present, the CPU defaults where it is not, each decided from an explicit
`cuda_available` (default: this machine)."""

import pytest
import torch

from megatron_ntp.config import load_config
from megatron_ntp.config.load import config_from_dict
from megatron_ntp.config.schema import GPU_DEFAULTS, ModelConfig, ParallelConfig, device_defaults


def numerics(config):
    return (config.model.transformer_impl, config.model.bf16,
            config.parallel.distributed_optimizer)


def test_a_preset_on_a_gpu_gets_the_gpu_defaults():
    config = load_config(None, ["model.preset=dense-1b"], cuda_available=True)
    assert numerics(config) == ("transformer_engine", True, True)
    assert config.model.hidden_size == 1536  # the preset still applies


def test_without_cuda_the_cpu_defaults_stay():
    config = load_config(None, ["model.preset=dense-1b"], cuda_available=False)
    assert numerics(config) == ("local", False, False)
    assert numerics(config) == (ModelConfig.transformer_impl, ModelConfig.bf16,
                                ParallelConfig.distributed_optimizer)
    assert device_defaults(False) == {}


def test_given_values_beat_the_gpu_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny-dense, bf16: false}\nparallel: null\n")
    config = load_config(path, ["model.transformer_impl=local"], cuda_available=True)
    assert numerics(config) == ("local", False, True)
    tree = {"model": {"preset": "tiny-dense"}, "parallel": {"distributed_optimizer": False}}
    assert numerics(config_from_dict(tree, cuda_available=True)) == (
        "transformer_engine", True, False)


def test_the_machine_decides_by_default(monkeypatch):
    here = torch.cuda.is_available()
    assert numerics(load_config(None, [])) == (
        ("transformer_engine", True, True) if here else ("local", False, False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert numerics(load_config(None, [])) == ("transformer_engine", True, True)


def test_gpu_defaults_name_real_fields():
    """Every GPU default is a field of its section with a different CPU default, and the field's
    --help text says so."""
    from megatron_ntp.config import config_help

    sections = {"model": ModelConfig, "parallel": ParallelConfig}
    text = config_help()
    for section, fields in GPU_DEFAULTS.items():
        for name, value in fields.items():
            assert getattr(sections[section], name) != value, (section, name)
            entry = text[text.index(f"{section}.{name} "):].split(f"\n  {section}.")[0]
            assert "on a machine with CUDA" in " ".join(entry.split()), (section, name)


@pytest.mark.parametrize("bad", ["model.bf16=2", "parallel.distributed_optimizer=maybe"])
def test_a_bad_value_is_named_over_a_gpu_default(bad):
    from megatron_ntp.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(None, [bad], cuda_available=True)
