"""Start torch.distributed and megatron-core's parallel state for a parallel layout.

One entry point, `initialize_parallel`, does what every rank must do before building a model:
join the default process group (NCCL on GPU, gloo on CPU; every collective times out after
parallel.distributed_timeout_minutes), apply the CPU patches where CUDA is absent and the exact
gradient norm where megatron-core has no fused one, create megatron-core's TP/PP/VPP/EP/DP
groups and seed the model-parallel RNG tracker.
`destroy_parallel` undoes it (tests run several layouts in one process).
"""

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_ntp.compat.cpu import (
    apply_cpu_patches,
    apply_exact_grad_norm,
    apply_torch_adam_patches,
)
from megatron_ntp.config.schema import ParallelConfig

DEFAULT_TIMEOUT_MINUTES = ParallelConfig.distributed_timeout_minutes


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def overlap_settings(config, gpu: bool | None = None) -> dict:
    """megatron-core DistributedDataParallelConfig fields of the overlapped data-parallel
    communication (parallel.overlap_*): on a GPU only (gpu default: whether CUDA is available);
    the parameter all-gather exists with the distributed optimizer only."""
    p = config.parallel
    gpu = torch.cuda.is_available() if gpu is None else gpu
    param_gather = gpu and p.overlap_param_gather and p.distributed_optimizer
    # Megatron-LM aligns the all-gathers of all pipeline stages under the interleaved schedule
    # only (its --no-align-param-gather default, reset without interleaving)
    return dict(overlap_grad_reduce=gpu and p.overlap_grad_reduce,
                overlap_param_gather=param_gather,
                align_param_gather=param_gather and p.virtual_pipeline > 1)


def bind_local_gpu() -> int:
    """Bind this process to its GPU and return the index: LOCAL_RANK among the visible GPUs.

    When Slurm binds one GPU per task (--gpus-per-task=1, or a CUDA_VISIBLE_DEVICES per task)
    the only visible GPU is 0 whatever LOCAL_RANK is, so the index wraps around the visible
    count, as Megatron-LM's `rank % device_count` does.
    """
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


def init_process_group(
    backend: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES,
) -> None:
    """Join the default process group unless already joined.

    Without arguments it reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK). On GPU it binds this process to its GPU first (bind_local_gpu),
    as NCCL requires.
    """
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        bind_local_gpu()
    kwargs = {}
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )


def initialize_parallel(
    tensor: int = 1,
    pipeline: int = 1,
    virtual_pipeline: int = 1,
    expert: int = 1,
    expert_tensor: int = 1,
    seed: int = 1234,
    **process_group,
) -> None:
    """Process group + megatron-core parallel state + seeds, for one rank.

    `process_group`: init_process_group's keywords (backend, rank, world_size, init_method,
    timeout_minutes), passed on.

    The data-parallel size is what is left: world_size / (tensor * pipeline). The layout is
    expected to be validated already (megatron_ntp.config.validate_config); megatron-core's own
    asserts are the last line of defence. `virtual_pipeline` is the number of model chunks per
    pipeline rank (1 = no interleaving). `expert_tensor` is the tensor-parallel size inside
    experts (1 is the usual choice for fine-grained MoE).
    """
    from megatron.core import parallel_state

    apply_cpu_patches()  # no-op with CUDA
    apply_exact_grad_norm()  # no-op where megatron-core has a fused norm (TE or apex)
    apply_torch_adam_patches()  # no-op with Apex or Transformer Engine
    init_process_group(**process_group)
    timeout = process_group.get("timeout_minutes", DEFAULT_TIMEOUT_MINUTES)
    parallel_state.initialize_model_parallel(
        distributed_timeout_minutes=timeout,  # megatron-core's own default is 30 minutes
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=expert_tensor,
    )
    set_group_timeouts(timeout)
    set_seed(seed)


def megatron_core_groups() -> list:
    """The process groups megatron-core keeps in parallel_state (its module globals, single or
    in lists), each once."""
    from megatron.core import parallel_state

    groups = []
    for value in vars(parallel_state).values():
        for group in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(group, dist.ProcessGroup) and all(group is not g for g in groups):
                groups.append(group)
    return groups


def set_group_timeouts(minutes: int) -> None:
    """The collective timeout on every megatron-core group. initialize_model_parallel passes its
    distributed_timeout_minutes to most groups, but megatron-core 0.19.2 creates its expert
    data-parallel gloo groups (the distributed optimizer's CPU gathers) without it, so they kept
    torch's default (30 minutes)."""
    timeout = datetime.timedelta(minutes=minutes)
    for group in megatron_core_groups():
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def initialize_parallel_from_config(config, **kwargs) -> None:
    """initialize_parallel with the layout of a validated Config (parallel section, train.seed);
    kwargs (backend, rank, world_size, init_method) pass through to init_process_group."""
    p = config.parallel
    initialize_parallel(tensor=p.tensor, pipeline=p.pipeline, virtual_pipeline=p.virtual_pipeline,
                        expert=p.expert, expert_tensor=p.expert_tensor, seed=config.train.seed,
                        timeout_minutes=p.distributed_timeout_minutes, **kwargs)


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's model-parallel RNG tracker.

    As megatron-core's training loop does, the pipeline rank offsets the seed (100 per stage),
    so different stages draw different dropout masks; tensor-parallel ranks share the default
    generator (CPU initialisation of full master weights then gives identical weights at any TP)
    and differ only inside the tracker's model-parallel state.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down megatron-core's parallel state and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
