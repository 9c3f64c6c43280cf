"""CPU checks of tests/gpu/layer_names.py, the name mapping of the TE vs local comparison: mapped
onto the local model's parameter names, it gives exactly the parameter names of the layers
megatron-core's Transformer Engine spec builds (read from the spec's modules, which
megatron-core provides as placeholders where Transformer Engine is not installed), and
copy_weights copies every parameter or names what it cannot."""

import functools
import json
import types

import pytest
import torch

from megatron_ntp.config import load_config, validate_config
from tests.distributed import run_distributed
from tests.gpu.layer_names import copy_weights, local_to_te_keys_map, renamed


def _config(impl):
    return validate_config(load_config(None, [
        "model.preset=tiny-dense", "model.num_layers=2", "model.vocab_size=1024",
        "data.seq_length=16", f"model.transformer_impl={impl}"]), world_size=1)


def _te_parameters_by_module():
    """{module of the TE spec: its parameter names} for the modules a Qwen3-style dense layer
    uses (RMSNorm, no biases)."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.extensions.transformer_engine_spec_provider import _TENormWithResidual
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    fused = te.TELayerNormColumnParallelLinear
    linears = (te.TEColumnParallelLinear, te.TERowParallelLinear)
    # without TE these are placeholders: distinct objects, or the table would mean nothing
    assert len({id(fused), *map(id, linears), id(te.TEDotProductAttention)}) == 4
    table = {fused: ("weight", "layer_norm_weight"), te.TEDotProductAttention: (),
             IdentityOp: (), IdentityFuncOp: ()}
    table.update({module: ("weight",) for module in linears})
    table.update({norm: ("weight",) for norm in (te.TENorm, _TENormWithResidual,
                                                  FusedLayerNorm, WrappedTorchNorm)})
    return table


def _walk(submodules, prefix, table):
    """Parameter names (inside one layer) of a spec's submodules dataclass."""
    names = []
    for field, value in vars(submodules).items():
        if field in ("sharded_state_dict_keys_map", "activation_func") or value is None:
            continue
        if isinstance(value, functools.partial):  # MLP.as_mlp_submodule(submodules=...)
            value = types.SimpleNamespace(module=None, submodules=value.keywords["submodules"])
        if hasattr(value, "submodules"):  # a ModuleSpec
            names += _walk(value.submodules, f"{prefix}{field}.", table)
        elif isinstance(value, types.FunctionType):  # bias-dropout-add builders
            continue
        else:
            assert any(value is module for module in table), \
                f"{prefix}{field}: {value!r} is not in the test's table of TE modules"
            names += [f"{prefix}{field}.{name}" for name in
                      next(params for module, params in table.items() if value is module)]
    return names


def te_layer_parameter_names(monkeypatch):
    """Parameter names inside one layer of the TE spec the project builds (models.gpt)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_ntp.models.gpt import layer_spec

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider)  # None without TE
    return sorted(_walk(layer_spec(_config("transformer_engine")).submodules, "",
                        _te_parameters_by_module()))


def _local_parameter_names(rank, world_size, out):
    from megatron.core.parallel_state import destroy_model_parallel

    from megatron_ntp.models.gpt import build_gpt_model
    from megatron_ntp.parallel import initialize_parallel_from_config

    initialize_parallel_from_config(_config("local"))
    names = [name for name, _ in build_gpt_model(_config("local")).named_parameters()]
    with open(out, "w") as f:
        json.dump(names, f)
    destroy_model_parallel()


def test_mapping_gives_exactly_the_te_spec_parameter_names(monkeypatch, tmp_path):
    run_distributed(1, _local_parameter_names, str(tmp_path / "names.json"))
    local_names = json.loads((tmp_path / "names.json").read_text())
    keys_map = local_to_te_keys_map(_config("local"))
    assert keys_map  # megatron-core's local spec states the renaming
    mapped = [renamed(name, keys_map) for name in local_names]
    expected_layer = te_layer_parameter_names(monkeypatch)
    for layer in (0, 1):
        prefix = f"decoder.layers.{layer}."
        got = sorted(name[len(prefix):] for name in mapped if name.startswith(prefix))
        assert got == expected_layer
    # outside the layers GPTModel's own modules, the same in both specs
    outside = sorted(name for name in mapped if ".layers." not in name)
    assert outside == ["decoder.final_layernorm.weight", "embedding.word_embeddings.weight",
                       "output_layer.weight"]
    assert sorted(name for name in local_names if ".layers." not in name) == outside


def test_renamed_inside_layers_only():
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    assert renamed("decoder.layers.3.input_layernorm.weight", keys_map) == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert renamed("module.decoder.layers.12.pre_mlp_layernorm.weight", keys_map) == \
        "module.decoder.layers.12.mlp.linear_fc1.layer_norm_weight"
    for same in ("decoder.layers.3.self_attention.linear_qkv.weight",
                 "decoder.final_layernorm.weight", "embedding.word_embeddings.weight"):
        assert renamed(same, keys_map) == same


def test_local_to_te_keys_map_wants_a_local_config():
    with pytest.raises(ValueError, match="transformer_impl='transformer_engine'"):
        local_to_te_keys_map(_config("transformer_engine"))


def _module(shapes: dict[str, tuple]) -> torch.nn.Module:
    """A module whose named_parameters are `shapes`' dotted names (float32 on the CPU)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.randn(shape, device="cpu")))
    return root


KEYS_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
LOCAL = {"layers.0.input_layernorm.weight": (4,), "layers.0.self_attention.linear_qkv.weight":
         (12, 4)}
TE = {"layers.0.self_attention.linear_qkv.layer_norm_weight": (4,),
      "layers.0.self_attention.linear_qkv.weight": (12, 4)}


def test_copy_weights_renames_and_casts():
    source, target = _module(LOCAL), _module(TE).to(torch.bfloat16)
    assert copy_weights(source, target, KEYS_MAP) == 2
    got = dict(target.named_parameters())
    assert got["layers.0.self_attention.linear_qkv.layer_norm_weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["layers.0.self_attention.linear_qkv.layer_norm_weight"],
                               dict(source.named_parameters())["layers.0.input_layernorm.weight"]
                               .to(torch.bfloat16))


def test_copy_weights_names_what_it_cannot_copy():
    target = _module({**TE, "layers.0.mlp.linear_fc1.layer_norm_weight": (4,)})
    before = [p.clone() for p in target.parameters()]
    with pytest.raises(ValueError, match="mlp.linear_fc1.layer_norm_weight"):
        copy_weights(_module(LOCAL), target, KEYS_MAP)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))  # untouched
    with pytest.raises(ValueError, match=r"linear_qkv.weight: \(12, 4\) -> \(8, 4\)"):
        copy_weights(_module(LOCAL), _module({**TE, "layers.0.self_attention.linear_qkv.weight":
                                               (8, 4)}), KEYS_MAP)
    with pytest.raises(ValueError, match="input_layernorm"):  # no map: the local name is unmatched
        copy_weights(_module(LOCAL), _module(TE), {})
