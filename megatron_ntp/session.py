"""What every program (train, eval, generate, passk, the benchmarks) does around its work on the
ranks of a launch: join the process groups of a config and leave them, tell rank 0, pick the
local device.

Under torchrun (RANK in the environment) the process groups come from torchrun's variables;
a plain process makes a one-rank group on a free local port.
"""

import contextlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a one-rank process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def parallel_session(config):
    """Process groups and megatron-core's parallel state for the layout of a validated config,
    torn down when the block ends (also on error)."""
    from megatron_ntp.parallel import destroy_parallel, initialize_parallel_from_config

    if "RANK" in os.environ:  # torchrun (or Slurm with its variables exported)
        initialize_parallel_from_config(config)
    else:
        initialize_parallel_from_config(config, rank=0, world_size=1,
                                        init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        destroy_parallel()


def is_rank0() -> bool:
    """Global rank 0, or a process outside any process group: the one that prints and writes."""
    return not dist.is_initialized() or dist.get_rank() == 0


def local_device() -> torch.device:
    """This rank's device: its current GPU (bound by initialize_parallel), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
