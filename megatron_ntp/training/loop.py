"""The training program: `run_training(config)` on every rank (torchrun or a single process).

    config -> check_environment -> process groups -> datasets -> model chunks, DDP, optimizer,
    WSD schedule -> for each step: loss knobs of the step, forward-backward over the global
    batch, optimizer step, metrics (and validation every train.eval_interval steps).
"""

import os
import sys
import time

import torch

from megatron_ntp.config import check_environment, dump_yaml
from megatron_ntp.models.counting import flops_per_token
from megatron_ntp.training import data as data_lib
from megatron_ntp.training.build import build_training_objects, loss_modules
from megatron_ntp.training.metrics import (
    MetricsWriter,
    clear_moe_metrics,
    moe_load_balancing_loss,
    peak_flops_per_gpu,
)
from megatron_ntp.training.step import eval_step, per_token_metrics, train_step


class BatchLayout:
    """Global batch in tokens -> sequences, micro-batches per data-parallel rank."""

    def __init__(self, config):
        t, p = config.train, config.parallel
        self.seq_length = config.data.seq_length
        self.micro_batch_size = t.micro_batch_size
        self.global_sequences = t.global_batch_tokens // self.seq_length
        self.num_microbatches = self.global_sequences // (t.micro_batch_size * p.data)


def run_training(config, stream=None) -> list[dict]:
    """Initialise parallelism for `config` (validated), train, tear down; the step records."""
    from megatron_ntp.parallel import destroy_parallel, initialize_parallel_from_config

    check_environment(config)  # FP8/TE without a GPU fails here, before any process group
    if "RANK" in os.environ:  # torchrun (or Slurm with its variables exported)
        initialize_parallel_from_config(config)
    else:  # a single process: a one-rank group on a free local port
        initialize_parallel_from_config(config, rank=0, world_size=1,
                                        init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        return train(config, stream=stream)
    finally:
        destroy_parallel()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _iterators(config, dataset, layout, step):
    from megatron.core import parallel_state

    first = data_lib.rank_first_sample(step, layout.global_sequences,
                                       parallel_state.get_data_parallel_rank(),
                                       parallel_state.get_data_parallel_world_size())
    # one iterator per model chunk: with interleaving every chunk consumes every micro-batch
    return [data_lib.micro_batches(dataset, first, layout.num_microbatches,
                                   layout.micro_batch_size)
            for _ in range(config.parallel.virtual_pipeline)]


def train(config, stream=None, objects=None) -> list[dict]:
    """Train on an initialised parallel state; returns the per-step metric records (global
    values, the same on every rank). `objects`: prebuilt TrainingObjects (e.g. with weights
    loaded), default built from the config."""
    import torch.distributed as dist

    stream = stream or sys.stdout
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    layout = BatchLayout(config)
    train_data, valid_data, _ = data_lib.build_train_valid(config, layout.global_sequences)
    objects = objects or build_training_objects(config)
    writer = MetricsWriter(config.logging.run_dir, rank0, config.logging.tensorboard,
                           config.logging.log_interval, stream)
    if rank0:
        with open(os.path.join(config.logging.run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(config))
        if config.checkpoint.save_dir or config.checkpoint.load_dir:
            # checkpoint/resume is a separate piece of work (issue 4 does not cover it)
            print("warning: checkpoint.save_dir/load_dir are set but this training program does "
                  "not save or load checkpoints yet; training starts from scratch and nothing is "
                  "saved", file=stream, flush=True)
    flops = flops_per_token(config.model, layout.seq_length, config.parallel.recompute).model
    peak = peak_flops_per_gpu()
    world = dist.get_world_size() if dist.is_initialized() else 1
    records = []
    try:
        for step in range(config.train.steps):
            knobs = config.loss_at(step)
            for module in loss_modules(objects.model):
                module.set_loss_config(knobs)
            start = time.perf_counter()
            sums, grad_norm, ok = train_step(objects, _iterators(config, train_data, layout, step),
                                             layout.num_microbatches, layout.micro_batch_size,
                                             layout.seq_length)
            elapsed = time.perf_counter() - start
            record = {"step": step, **per_token_metrics(sums),
                      "lr": objects.scheduler.get_lr({}),
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                      "tokens_per_s": config.train.global_batch_tokens / elapsed,
                      "beta": knobs.beta, "lambda_topk": knobs.lambda_topk,
                      "lambda_tail": knobs.lambda_tail, "update_skipped": not ok}
            moe = moe_load_balancing_loss(config, layout.num_microbatches)
            if moe is not None:
                record["moe_lb_loss"] = moe
            if peak:
                record["mfu"] = flops * record["tokens_per_s"] / (world * peak)
            records.append(record)
            writer.train(record, config.train.steps)
            interval = config.train.eval_interval
            if interval and ((step + 1) % interval == 0 or step + 1 == config.train.steps):
                writer.valid({"step": step, **evaluate(config, objects, valid_data, layout)})
    finally:
        writer.close()
    return records


def evaluate(config, objects, dataset, layout) -> dict:
    """Per-token means over train.eval_steps global batches of the validation split (the same
    batches every time, so successive validations are comparable)."""
    total = torch.zeros(5, dtype=torch.float64)
    for batch in range(config.train.eval_steps):
        total += eval_step(objects, _iterators(config, dataset, layout, batch),
                           layout.num_microbatches, layout.micro_batch_size, layout.seq_length)
    clear_moe_metrics(config)
    return per_token_metrics(total)
