"""Start a Transformer Engine model from a local-layer model's weights (tests/gpu's TE vs local
comparison), by parameter name.

megatron-core's two layer specs name one parameter per layer differently, twice: Transformer
Engine fuses each pre-norm into the linear that follows it (TELayerNormColumnParallelLinear), so
the local spec's `input_layernorm.weight` is the TE spec's `self_attention.linear_qkv.
layer_norm_weight` and `pre_mlp_layernorm.weight` is `mlp.linear_fc1.layer_norm_weight`.
megatron-core states this renaming in the local spec itself (TransformerLayerSubmodules.
sharded_state_dict_keys_map, with which its distributed checkpoints load local-spec weights into
TE layers); it is read from there, not restated. Every other name (embedding, attention and MLP
linears, QK-norms, final norm, output layer) is the same in both specs.
"""

import re

import torch

# "decoder.layers.3.self_attention.linear_qkv.weight" -> ("decoder.layers.3.", the rest)
_LAYER = re.compile(r"^(.*\blayers\.\d+\.)(.*)$")


def local_to_te_keys_map(local_config) -> dict[str, str]:
    """{local prefix inside a layer: TE prefix} of the local layer spec the project builds for
    `local_config` (model.transformer_impl=local)."""
    from megatron_ntp.models.gpt import layer_spec

    if local_config.model.transformer_impl != "local":
        raise ValueError(f"expected a local-layer config, got model.transformer_impl="
                         f"{local_config.model.transformer_impl!r}")
    return dict(layer_spec(local_config).submodules.sharded_state_dict_keys_map or {})


def renamed(name: str, keys_map: dict[str, str]) -> str:
    """`name` of the source spec as the target spec names it (the first matching prefix of
    keys_map, applied inside a layer; names outside the layers are unchanged)."""
    match = _LAYER.match(name)
    if match is None:
        return name
    layer, rest = match.groups()
    for old, new in keys_map.items():
        if rest.startswith(old):
            return layer + new + rest[len(old):]
    return name


def copy_weights(source, target, keys_map: dict[str, str]) -> int:
    """Copy every parameter of module `source` into module `target`, renaming by keys_map
    (`{}` for two models of one spec); returns the number copied. Raises, naming them, when a
    parameter of either side has no partner or the shapes differ, before copying anything.
    Parameters only: TE's `_extra_state` (FP8 scaling state) is not a weight."""
    sources = {renamed(name, keys_map): param for name, param in source.named_parameters()}
    targets = dict(target.named_parameters())
    unmatched = sorted(set(targets) ^ set(sources))
    if unmatched:
        raise ValueError(f"no partner for {unmatched} (target-only: "
                         f"{sorted(set(targets) - set(sources))})")
    shapes = [f"{name}: {tuple(sources[name].shape)} -> {tuple(param.shape)}"
              for name, param in targets.items() if param.shape != sources[name].shape]
    if shapes:
        raise ValueError(f"shapes differ: {shapes}")
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(sources[name])  # across dtypes and devices as needed
    return len(targets)
