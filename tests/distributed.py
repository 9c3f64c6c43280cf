"""Run a function on N gloo ranks spawned from a test (CPU, one thread per rank)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int, fn, *args):
    """Call fn(rank, world_size, *args) on each of world_size spawned ranks.

    fn must be importable (module level). A failure on any rank fails the caller with that
    rank's traceback.
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
