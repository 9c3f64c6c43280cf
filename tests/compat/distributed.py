"""Spawn N gloo ranks inside a test: each runs fn(rank, world_size, init_method, *args).

An exception in any rank fails the test with that rank's traceback (torch.multiprocessing).
"""

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_run_rank, args=(fn, world_size, init_method, args), nprocs=world_size, join=True)


def _run_rank(rank, fn, world_size, init_method, args):
    os.environ["OMP_NUM_THREADS"] = "1"  # two cores, shared by every rank
    torch.set_num_threads(1)
    fn(rank, world_size, init_method, *args)
