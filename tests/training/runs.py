"""Training runs for the layout tests, executed inside spawned gloo ranks (tests/distributed.py).

`run_cases(rank, world_size, cases, out_dir)` trains each case in turn in one spawn (one
import of megatron-core for many layouts) and writes rank 0's per-step records to
<out_dir>/<name>.json. A reference case (world size 1) also saves its initial weights; every
other case of the same model loads them, resharded for its layout, so that all layouts start
from the same weights (megatron-core's initialisation is not layout-invariant: pipeline stages
are seeded differently and each expert-parallel rank initialises its local experts as if they
were experts 0..n-1).
"""

import json
import os
import re

import torch


def save_initial_weights(objects, path):
    from megatron_ntp.training.build import loss_modules

    (module,) = loss_modules(objects.model)
    torch.save({name: p.detach().clone() for name, p in module.named_parameters()}, path)


def _global_name(module, name):
    """Map a rank-local parameter name to the single-rank model's name (layer offsets for
    pipeline stages / chunks, expert offsets for expert parallelism)."""
    from megatron.core import parallel_state

    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match:
        layer = module.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
    match = re.search(r"local_experts\.(\d+)\.", name)
    if match:
        local = len(module.decoder.layers[0].mlp.experts.local_experts)
        expert = parallel_state.get_expert_model_parallel_rank() * local + int(match.group(1))
        name = name[:match.start()] + f"local_experts.{expert}." + name[match.end():]
    return name


def _shard(full, param, local_shape):
    """This rank's slice of a full weight, as megatron-core's CPU initialisation cuts it."""
    from megatron.core import parallel_state

    if tuple(full.shape) == tuple(local_shape):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    pieces = torch.split(full, local_shape[dim] // stride, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def load_initial_weights(objects, path):
    from megatron_ntp.training.build import loss_modules

    full = torch.load(path)
    with torch.no_grad():
        for module in loss_modules(objects.model):
            for name, param in module.named_parameters():
                param.copy_(_shard(full[_global_name(module, name)], param, param.shape))
    objects.optimizer.reload_model_params()


def _shard_key(module, name, param, full_numel):
    """(single-rank name, shard index): equal for replicas of the same elements, so that each
    element of the gathered gradient is counted once (TP shards differ, DP/TP replicas not)."""
    from megatron.core import parallel_state

    if param.numel() == full_numel:
        return _global_name(module, name), 0
    if not getattr(param, "allreduce", True):  # an expert weight, cut over the expert-TP group
        return _global_name(module, name), parallel_state.get_expert_tensor_parallel_rank()
    return _global_name(module, name), parallel_state.get_tensor_model_parallel_rank()


def gathered_grad_norm_float64(objects, full_shapes):
    """The 2-norm, summed in float64, of the gradients of all ranks gathered into the
    single-rank model's parameters: what the reported grad_norm must equal. Read from the
    main_grad buffers after finalize_model_grads (not valid with the distributed optimizer,
    whose buffers hold only this rank's reduced shard)."""
    from megatron_ntp.training.build import loss_modules

    squares = {}
    for module in loss_modules(objects.model):
        for name, param in module.named_parameters():
            full_numel = full_shapes[_global_name(module, name)].numel()
            key = _shard_key(module, name, param, full_numel)
            squares[key] = param.main_grad.double().square().sum().item()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, squares)
    union = {key: value for part in gathered for key, value in part.items()}
    return sum(union.values()) ** 0.5


def record_step0_gathered_grad_norm(objects, full_shapes, into: list):
    """Append gathered_grad_norm_float64 to `into` just before the first optimizer step."""
    step = objects.optimizer.step

    def first_step():
        into.append(gathered_grad_norm_float64(objects, full_shapes))
        objects.optimizer.step = step
        return step()

    objects.optimizer.step = first_step


def run_cases(rank, world_size, cases, out_dir):
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training.build import build_training_objects
    from megatron_ntp.training.loop import train

    for name, overrides, weights in cases:
        config = validate_config(load_config(None, overrides), world_size=world_size)
        initialize_parallel_from_config(config)
        objects = build_training_objects(config)
        if world_size == 1:
            save_initial_weights(objects, weights)
        else:
            load_initial_weights(objects, weights)
        step0_norm = []
        if not config.parallel.distributed_optimizer:
            record_step0_gathered_grad_norm(objects, torch.load(weights), step0_norm)
        with open(os.devnull, "w") as quiet:
            records = train(config, stream=quiet, objects=objects)
        if step0_norm:
            records[0]["gathered_grad_norm_float64"] = step0_norm[0]
        if rank == 0:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(records, f)
        parallel_state.destroy_model_parallel()
        destroy_moe_metrics_tracker()
