"""The training program: `run_training(config)` on every rank (torchrun or a single process).

    config -> check_environment -> process groups -> where to start (checkpoint.py) ->
    datasets -> model chunks, DDP, optimizer, WSD schedule -> load the checkpoint, if any ->
    for each step: loss knobs of the step, forward-backward over the global batch, optimizer
    step, metrics (and validation every train.eval_interval steps), a checkpoint every
    checkpoint.save_interval steps and at the end.

Steps are numbered 1..train.steps, Megatron-LM's `iteration`: the number of optimizer steps
complete after the step. Every output uses that number: the console, metrics.jsonl, valid.jsonl,
TensorBoard, the checkpoint iter_<step> saved after it, and the loss schedule's steps.

SIGTERM (preemption.py): the current step finishes, a checkpoint is saved, and
TrainingPreempted (SystemExit with code 75) is raised; running the same command again resumes.
"""

import os
import sys
import time

import torch

from megatron_ntp.config import check_environment, dump_yaml
from megatron_ntp.config.batch import BatchLayout
from megatron_ntp.models.counting import flops_per_token
from megatron_ntp.session import is_rank0, parallel_session
from megatron_ntp.training import checkpoint as checkpoint_lib
from megatron_ntp.training import data as data_lib
from megatron_ntp.training.build import build_training_objects, force_param_sync, loss_modules
from megatron_ntp.jobs.run_folder import (
    METRICS_FILE,
    VALID_FILE,
    renumber_from_zero,
    truncate_records,
)
from megatron_ntp.training.metrics import (
    MetricsWriter,
    clear_moe_metrics,
    moe_load_balancing_loss,
    peak_flops_per_gpu,
)
from megatron_ntp.training.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionWatch,
    TrainingPreempted,
)
from megatron_ntp.training.step import eval_step, per_token_metrics, train_step


def run_training(config, stream=None) -> list[dict]:
    """Initialise parallelism for `config` (validated), train, tear down; the step records."""
    check_environment(config)  # FP8/TE without a GPU fails here, before any process group
    with parallel_session(config):
        return train(config, stream=stream)


def micro_batch_iterators(config, dataset, layout, batch, sample_offset=0):
    """Micro-batch iterators of global batch `batch` (0-based: step `batch + 1` trains on it),
    which starts at sample batch * global_sequences + sample_offset (the offset moves the data
    position of a resumed run whose global batch size changed; 0 otherwise)."""
    from megatron.core import parallel_state

    first = sample_offset + data_lib.rank_first_sample(
        batch, layout.global_sequences, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size())
    # one iterator per model chunk: with interleaving every chunk consumes every micro-batch
    return [data_lib.micro_batches(dataset, first, layout.num_microbatches,
                                   layout.micro_batch_size, data_lib.uses_attention_mask(config))
            for _ in range(config.parallel.virtual_pipeline)]


def train(config, stream=None, objects=None) -> list[dict]:
    """Train on an initialised parallel state; returns the per-step metric records of this
    invocation (global values, the same on every rank). `objects`: prebuilt TrainingObjects
    (e.g. with weights loaded), default built from the config; a checkpoint named by the
    config's checkpoint section is loaded into them. Raises TrainingPreempted (exit code 75)
    after saving when SIGTERM arrives."""
    with PreemptionWatch() as watch:  # from the start: a signal during setup stops after 1 step
        return _train(config, stream, objects, watch)


def _train(config, stream, objects, watch) -> list[dict]:
    import torch.distributed as dist

    stream = stream or sys.stdout
    rank0 = is_rank0()
    layout = BatchLayout(config)
    steps, batch = config.train.steps, layout.global_sequences
    start = checkpoint_lib.plan_start(config)
    train_data, valid_data, _ = data_lib.build_train_valid(
        config, batch, train_samples=start.consumed_samples + max(steps - start.step, 0) * batch)
    sample_offset = start.consumed_samples - start.step * batch
    objects = objects or build_training_objects(config)
    checkpoint_lib.load_for_training(config, objects, start)
    if rank0:
        os.makedirs(config.logging.run_dir, exist_ok=True)
        _announce_start(config, start, stream)
        with open(os.path.join(config.logging.run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(config))
    writer = MetricsWriter(config.logging.run_dir, rank0, config.logging.tensorboard,
                           config.logging.log_interval, stream)
    flops = flops_per_token(config.model, layout.seq_length).model
    peak = peak_flops_per_gpu()
    world = dist.get_world_size() if dist.is_initialized() else 1
    save_every = config.checkpoint.save_interval if config.checkpoint.save_dir else 0
    records = []
    try:
        # `step` is the step's number: how many optimizer steps are complete after it
        for step in range(start.step + 1, steps + 1):
            knobs = config.loss_at(step)
            for module in loss_modules(objects.model):
                module.set_loss_config(knobs)
            begin = time.perf_counter()
            sums, grad_norm, ok = train_step(
                objects, micro_batch_iterators(config, train_data, layout, step - 1,
                                               sample_offset),
                layout.num_microbatches, layout.micro_batch_size, layout.seq_length)
            elapsed = time.perf_counter() - begin
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
            writer.train(record, steps)
            interval = config.train.eval_interval
            if interval and (step % interval == 0 or step == steps):
                force_param_sync(objects)
                writer.valid({"step": step, **evaluate(config, objects, valid_data, layout)})
            # collective, every step: all ranks leave after the same step
            preempted = watch.requested() and step < steps
            if save_every and (step % save_every == 0 or step == steps or preempted):
                consumed = start.consumed_samples + (step - start.step) * batch
                force_param_sync(objects)
                path = checkpoint_lib.save_checkpoint(config, objects, step, consumed)
                if rank0:
                    print(f"saved checkpoint {path}", file=stream, flush=True)
            if preempted:
                if rank0:
                    _announce_preemption(step, steps, bool(save_every), stream)
                raise TrainingPreempted(step)
    finally:
        writer.close()
    return records


def _announce_preemption(step, steps, saved, stream) -> None:
    print(f"preempted (SIGTERM) after step {step}/{steps}: "
          + ("checkpoint saved; run the same command to resume" if saved
             else "checkpoint.save_dir is not set, nothing was saved")
          + f"; exit code {PREEMPTED_EXIT_CODE}", file=stream, flush=True)


def _announce_start(config, start, stream) -> None:
    """Rank 0: say where the run starts; drop metric records a resumed run will redo (those
    after step start.step, the checkpoint's)."""
    run_dir = config.logging.run_dir
    if start.finetune:
        print(f"starting a new phase from the weights of {start.checkpoint}"
              + (" and its optimizer state" if config.checkpoint.load_optimizer else "")
              + " (checkpoint.finetune): step 0", file=stream, flush=True)
    elif start.checkpoint:
        print(f"resuming from {start.checkpoint} at step {start.step}/{config.train.steps}",
              file=stream, flush=True)
        if start.step >= config.train.steps:
            print(f"train.steps={config.train.steps} is reached already: nothing to train "
                  f"(raise train.steps to continue)", file=stream, flush=True)
    if renumber_from_zero(run_dir):
        print(f"{METRICS_FILE}, {VALID_FILE}: renumbered from step 1 (written by a version that "
              f"numbered steps from 0)", file=stream, flush=True)
    for name in (METRICS_FILE, VALID_FILE):
        dropped = truncate_records(os.path.join(run_dir, name), start.step)
        if dropped:
            print(f"{name}: dropped {dropped} records of steps > {start.step} (redone now)",
                  file=stream, flush=True)


def evaluate(config, objects, dataset, layout) -> dict:
    """Per-token means over train.eval_steps global batches of the validation split (the same
    batches every time, so successive validations are comparable)."""
    total = torch.zeros(5, dtype=torch.float64, device="cpu")  # eval_step's sums are on CPU
    for batch in range(config.train.eval_steps):
        total += eval_step(objects, micro_batch_iterators(config, dataset, layout, batch),
                           layout.num_microbatches, layout.micro_batch_size, layout.seq_length)
    clear_moe_metrics(config)
    return per_token_metrics(total)
