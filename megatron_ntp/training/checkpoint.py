"""Checkpoints with megatron-core's dist_checkpointing: save, exact resume, mid-training starts.

Layout of checkpoint.save_dir (Megatron-LM's names, so its tools find their way):

    latest_checkpointed_iteration.txt   "300": the newest complete checkpoint (the tracker)
    iter_0000300/                       one checkpoint, complete
        metadata.json, *.distcp, ...    megatron-core's torch_dist files (every rank's shards)
        config.yaml                     the resolved config of the run that saved it
        checkpoint.json                 step, consumed samples, parallel layout (for humans/tools)
                                        and the manifest: every other file's size and CRC-32
    iter_0000400.tmp/                   a save in progress, or one that crashed (ignored, removed
                                        by the next save)
    iter_0000200.damaged/               a damaged checkpoint set aside by a new save of its step

A checkpoint holds the model (sharded tensors: loadable into any TP/PP/EP/VPP layout), the
optimizer (Adam moments and step, fp32 master weights; the distributed optimizer in megatron-
core's `fully_reshardable` format, so it reshards too), the learning-rate scheduler's position,
the step, the consumed samples (the data position), every rank's random states (python, numpy,
torch, CUDA, megatron-core's tensor-parallel RNG tracker) and the config.

Atomic saves: all ranks write into iter_N.tmp; when dist_checkpointing.save has returned on all
of them (it ends with a barrier), global rank 0 adds config.yaml, every rank checksums the
shards it wrote, rank 0 writes checkpoint.json with the manifest, renames the folder to iter_N
and then replaces the tracker (write a temporary file, os.replace). A crash at any point leaves
the previous checkpoint the latest and loadable; a failed write (a full disk) raises
CheckpointSaveFailed on every rank. Then the oldest checkpoints beyond checkpoint.keep_last are
deleted (renamed to a .tmp name first, so a half-deleted folder never looks like a checkpoint);
a damaged one is never deleted.

Verification (`verify_checkpoint`, checkpoint_manifest.py): before megatron-core reads a
checkpoint (resume, load_dir, finetune, load_model_weights for eval and export), its files are
checked against the manifest: presence and sizes always, CRC-32 with checkpoint.verify. A
damaged checkpoint raises CheckpointDamaged on every rank, naming the checkpoint, the files and
what is wrong.

Where a run starts (`plan_start`), decided on rank 0 and broadcast:
1. save_dir holds a checkpoint -> resume from its latest: same command, same run (this is what
   makes a requeued Slurm job continue, and it wins over load_dir, so a preempted mid-training
   phase resumes itself rather than restarting from the pre-training checkpoint); a damaged
   latest is skipped with a warning for the newest intact one before it (the tracker is left as
   it is until a new save succeeds), and the error comes only when none is intact;
2. load_dir is set -> its latest checkpoint (or load_dir itself when it is an iter_ folder):
   a full resume, or with checkpoint.finetune=true a new phase (weights, optimizer state when
   load_optimizer; step, schedule, data position and random states from scratch);
3. otherwise from scratch. load_dir == save_dir with nothing in it is a first run (Megatron-LM's
   `--save X --load X`); another empty load_dir is an error.

Resume keeps this config's learning-rate schedule and optimizer hyperparameters (so a run can be
extended) and takes the schedule position, moments and step counts from the checkpoint. Random
states are restored only into the same parallel layout (as Megatron-LM does); the other parts
reshard.

Beside this module: checkpoint_files (the file-system protocol: tracker, publishing, pruning),
checkpoint_manifest (sizes and checksums) and checkpoint_optimizer (which optimizer state can
load, param-group bookkeeping).
"""

import dataclasses
import json
import os
import queue
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ntp.config import Config, ConfigError, config_from_dict, dump_yaml
from megatron_ntp.config.load import load_yaml
from megatron_ntp.training.checkpoint_files import (  # noqa: F401 (part of this module's API)
    CONFIG_FILE,
    INFO_FILE,
    TEMP_SUFFIX,
    TRACKER_FILE,
    complete_checkpoints,
    iteration_dir_name,
    latest_checkpoint,
    prune_checkpoints,
    publish,
    read_checkpoint_info,
    remove_temporaries,
    resolve_checkpoint_dir,
    resume_candidates,
    write_durably,
)
from megatron_ntp.training.checkpoint_manifest import (
    FORMAT_VERSION,
    MANIFEST_KEY,
    CheckpointDamaged,
    checksum_problems,
    damage_report,
    find_problems,
    list_files,
    manifest_entries,
    read_manifest,
    share_of,
    size_problems,
)
from megatron_ntp.training.checkpoint_optimizer import (
    check_optimizer_state_fits,
    match_schedule_keys,
    optimizer_count,
    param_group_settings,
    restore_param_group_settings,
)


class CheckpointSaveFailed(ConfigError):
    """A save that could not be completed (a full disk, a lost file system); the previous
    checkpoint stays the latest."""


def read_checkpoint_config(checkpoint_dir: str) -> Config:
    """The config saved with a checkpoint (or with the latest one in a save_dir), as it was
    resolved for that run (parallel.data included); not validated again. config.yaml is checked
    against the manifest first (a small file: sizes and checksum)."""
    path = resolve_checkpoint_dir(checkpoint_dir)
    manifest, problems = read_manifest(path)
    if manifest and CONFIG_FILE in manifest:
        config_only = {CONFIG_FILE: manifest[CONFIG_FILE]}
        problems = (size_problems(path, config_only)
                    or checksum_problems(path, config_only, [CONFIG_FILE]))
    if problems:
        raise CheckpointDamaged(damage_report(path, problems))
    return config_from_dict(load_yaml(os.path.join(path, CONFIG_FILE)))


# ---------------------------------------------------------------------------------------------
# Weights only (evaluation, export, mid-training)
# ---------------------------------------------------------------------------------------------
def load_model_weights(model_chunks: list, checkpoint_dir: str, verify: bool = True) -> int:
    """Load the weights of the latest checkpoint in `checkpoint_dir` (or of that iter_XXXXXXX
    folder) into this rank's model chunks, built for the current parallel layout (any layout:
    dist_checkpointing reshards); chunks may be bare GPTModels or wrapped (Float16Module, DDP).
    Returns the checkpoint's step. Collective: call on every rank after initialize_parallel.
    With an optimizer holding master copies, call its reload_model_params() afterwards.
    The checkpoint is verified first (`verify_checkpoint`; verify: checksums too)."""
    from megatron.core import dist_checkpointing

    path = _decided_on_rank0(resolve_checkpoint_dir, checkpoint_dir)
    verify_checkpoint(path, verify)
    metadata = _sharded_metadata(False, dist_checkpointing.load_content_metadata(path))
    loaded = dist_checkpointing.load(_model_sharded_state(model_chunks, metadata), path)
    _load_model(model_chunks, loaded)
    return int(loaded["iteration"])


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_checkpoint(config: Config, objects, step: int, consumed_samples: int) -> str:
    """Save `objects` (TrainingObjects) after `step` completed steps into
    <checkpoint.save_dir>/iter_<step>; returns that folder. Collective (every rank). A write
    that fails (a full disk) raises CheckpointSaveFailed on every rank; the tracker still names
    the previous checkpoint."""
    root = config.checkpoint.save_dir
    final = os.path.join(root, iteration_dir_name(step))
    temporary = final + TEMP_SUFFIX
    try:
        _decided_on_rank0(_prepare_folder, root, temporary)  # and every rank waits for it
        _write_shards(config, objects, step, consumed_samples, temporary)
        names = _decided_on_rank0(_write_config_and_list, config, temporary)
        rank, world = _rank_and_world()
        files = dict(_gathered(list(manifest_entries(temporary, share_of(names, rank, world))
                                    .items())))  # each rank checksums the shards it wrote
        info = _checkpoint_info(config, objects, step, consumed_samples, files)
        _decided_on_rank0(write_durably, os.path.join(temporary, INFO_FILE),
                          json.dumps(info, indent=1) + "\n")
    except (OSError, CheckpointException) as err:
        raise CheckpointSaveFailed(_save_failure(final, err)) from None
    _decided_on_rank0(_publish_checkpoint, config, temporary, final, step)
    return final


def _write_shards(config: Config, objects, step: int, consumed_samples: int,
                  folder: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    metadata = _sharded_metadata(config.parallel.distributed_optimizer)
    state = _model_sharded_state(objects.model, metadata)
    state["optimizer"] = objects.optimizer.sharded_state_dict(state, metadata=metadata)
    state["opt_param_scheduler"] = objects.scheduler.state_dict()
    state["rng_state"] = _rng_sharded_object(_rng_state())
    state["iteration"] = step
    state["consumed_samples"] = consumed_samples
    _keep_write_results_in_process()
    # Writes every rank's shards and ends with a barrier: on return the folder is complete.
    dist_checkpointing.save(state, folder,
                            content_metadata=_clean_metadata_for_serialization(metadata))


def _prepare_folder(root: str, temporary: str) -> None:
    os.makedirs(root, exist_ok=True)
    remove_temporaries(root)
    os.makedirs(temporary)


def _write_config_and_list(config: Config, folder: str) -> list[str]:
    """Rank 0: config.yaml into the written folder; the files the manifest covers."""
    write_durably(os.path.join(folder, CONFIG_FILE), dump_yaml(config))
    return list_files(folder)


def _checkpoint_info(config: Config, objects, step: int, consumed_samples: int,
                     files: dict) -> dict:
    """checkpoint.json: what the checkpoint is (for humans and tools) and its manifest."""
    return {"format": FORMAT_VERSION, "step": step, "consumed_samples": consumed_samples,
            "seq_length": config.data.seq_length,
            "global_batch_tokens": config.train.global_batch_tokens,
            "layout": parallel_layout(config),
            "optimizers": optimizer_count(objects.optimizer), "bf16": config.model.bf16,
            "world_size": _rank_and_world()[1], MANIFEST_KEY: files}


def _publish_checkpoint(config: Config, temporary: str, final: str, step: int) -> None:
    """Rank 0, once every file is written: rename, tracker, pruning. A damaged iter_N already
    there (one the run fell back from) is set aside, never deleted."""
    root, checksums = config.checkpoint.save_dir, config.checkpoint.verify
    set_aside = publish(temporary, final, keep_existing=os.path.isdir(final) and bool(
        find_problems(final, checksums)))
    if set_aside:
        _warn(f"the damaged {final} was renamed to {set_aside} (kept for inspection)")
    write_durably(os.path.join(root, TRACKER_FILE), f"{step}\n", atomic=True)
    prune_checkpoints(root, config.checkpoint.keep_last, step,
                      damaged=lambda path: bool(find_problems(path, checksums=False)))


def _save_failure(final: str, err: Exception) -> str:
    if isinstance(err, CheckpointException):  # failures: {rank: (error, trace)}, on rank 0 only
        reason = "; ".join(f"rank {rank}: {error}" for rank, (error, _) in
                           sorted(err.failures.items())) or "a write failed: rank 0 names it"
    else:
        reason = str(err)
    return (f"saving checkpoint {final} failed ({reason}); the previous checkpoint stays the "
            f"latest, and the next save removes {os.path.basename(final)}{TEMP_SUFFIX}")


def parallel_layout(config: Config) -> dict:
    """The layout fields that decide how state is sharded over ranks."""
    p = config.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
            "data": p.data, "expert": p.expert, "expert_tensor": p.expert_tensor,
            "distributed_optimizer": p.distributed_optimizer}


def _keep_write_results_in_process() -> None:
    # dist_checkpointing/strategies/filesystem_async.py: every torch_dist save, synchronous ones
    # included, passes its write results through get_write_results_queue(), which starts a
    # multiprocessing Manager (a server process per rank, started with 'spawn', which re-imports
    # __main__ and so needs an `if __name__ == "__main__"` guard in the launching script). A
    # synchronous save writes and collects the results in this very process and thread, so a
    # queue.Queue (the same put / get_nowait) carries them without the extra process.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# ---------------------------------------------------------------------------------------------
# Starting a run: where from, and loading
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StartPoint:
    """Where training starts. checkpoint None: from scratch. finetune: a new phase from the
    checkpoint's weights (step and consumed_samples are then 0)."""

    step: int = 0
    consumed_samples: int = 0
    checkpoint: str | None = None
    finetune: bool = False


def plan_start(config: Config) -> StartPoint:
    """The start of this run (see the module docstring for the rules); the same on every rank.
    The checkpoint it picks is verified (`verify_checkpoint`); on resume a damaged one is
    skipped, with a warning, for the newest intact one before it. Collective."""
    c = config.checkpoint
    own, notes = _decided_on_rank0(resume_candidates, c.save_dir) if c.save_dir else ([], [])
    for note in notes:
        _warn(note)
    if own:
        return _decided_on_rank0(_start_point, _first_intact(own, c.verify), False)
    path, finetune = _decided_on_rank0(_load_dir_checkpoint, config)
    if path is None:
        return StartPoint()
    verify_checkpoint(path, c.verify)
    return _decided_on_rank0(_start_point, path, finetune)


def _first_intact(candidates: list[str], checksums: bool) -> str:
    """The first intact checkpoint of `candidates` (newest first); warns about each damaged one
    skipped; CheckpointDamaged naming them all when none is intact. Collective."""
    reports = []
    for path in candidates:
        problems = checkpoint_problems(path, checksums)
        if not problems:
            return path
        reports.append(damage_report(path, problems))
        _warn(f"{reports[-1]}; skipping it, the run resumes from an older checkpoint (the "
              f"tracker is left as it is until a new save succeeds)")
    raise CheckpointDamaged("no intact checkpoint to resume from: " + " | ".join(reports))


def _load_dir_checkpoint(config: Config) -> tuple[str | None, bool]:
    """(checkpoint of checkpoint.load_dir, finetune), (None, False) for a run from scratch."""
    c = config.checkpoint
    if not c.load_dir or (c.save_dir and os.path.abspath(c.load_dir) ==
                          os.path.abspath(c.save_dir)):
        return None, False
    try:
        return resolve_checkpoint_dir(c.load_dir), c.finetune
    except ConfigError as err:
        raise ConfigError(f"checkpoint.load_dir={c.load_dir!r}: {err}") from None


def _start_point(path: str, finetune: bool) -> StartPoint:
    if finetune:
        return StartPoint(checkpoint=path, finetune=True)
    info = read_checkpoint_info(path)
    return StartPoint(info["step"], info["consumed_samples"], path)


def verify_checkpoint(checkpoint_dir: str, checksums: bool = True) -> None:
    """Raise CheckpointDamaged on every rank, naming the checkpoint, each damaged file and what
    is wrong, unless the checkpoint matches its manifest: every file present with its size, and
    with checksums its CRC-32 (each rank reads a share of the files). Call before megatron-core
    reads anything from it. Collective."""
    problems = checkpoint_problems(checkpoint_dir, checksums)
    if problems:
        raise CheckpointDamaged(damage_report(checkpoint_dir, problems))


def checkpoint_problems(checkpoint_dir: str, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint ([] when intact), the same list on every rank: rank 0
    reads the manifest and checks sizes; the checksums are spread over the ranks. Collective."""
    manifest, problems = _decided_on_rank0(_manifest_and_size_problems, checkpoint_dir)
    if problems or manifest is None or not checksums:
        return problems
    rank, world = _rank_and_world()
    return sorted(_gathered(checksum_problems(checkpoint_dir, manifest,
                                              share_of(sorted(manifest), rank, world))))


def _manifest_and_size_problems(checkpoint_dir: str) -> tuple[dict | None, list[str]]:
    manifest, problems = read_manifest(checkpoint_dir)
    if manifest is None or problems:
        return manifest, problems
    return manifest, size_problems(checkpoint_dir, manifest)


def load_for_training(config: Config, objects, start: StartPoint) -> None:
    """Load `start.checkpoint` into TrainingObjects: weights always; optimizer state when
    checkpoint.load_optimizer; scheduler position on resume; random states on resume into the
    same layout when checkpoint.load_rng. Collective."""
    from megatron.core import dist_checkpointing

    if start.checkpoint is None:
        return
    path, c = start.checkpoint, config.checkpoint
    info = read_checkpoint_info(path)
    same_layout = info["layout"] == parallel_layout(config)
    if c.load_optimizer:
        check_optimizer_state_fits(path, info, config, objects.optimizer)
    load_rng = c.load_rng and same_layout and not start.finetune
    metadata = _sharded_metadata(config.parallel.distributed_optimizer,
                                 dist_checkpointing.load_content_metadata(path))
    state = _model_sharded_state(objects.model, metadata)
    if c.load_optimizer:
        settings = param_group_settings(objects.optimizer)
        state["optimizer"] = objects.optimizer.sharded_state_dict(state, is_loading=True,
                                                                  metadata=metadata)
    if load_rng:
        state["rng_state"] = _rng_sharded_object(_rng_state())
    loaded = dist_checkpointing.load(state, path)
    _load_model(objects.model, loaded)
    if c.load_optimizer:
        match_schedule_keys(loaded["optimizer"], objects.optimizer)
        objects.optimizer.load_state_dict(loaded["optimizer"])
        # torch's load_state_dict takes every param-group entry from the checkpoint (max_lr,
        # min_lr, betas, ...); this config's values are the ones to train with.
        restore_param_group_settings(objects.optimizer, settings)
    else:
        objects.optimizer.reload_model_params()  # master copies from the loaded weights
    if not start.finetune:
        # this config's schedule (it may extend the run), the checkpoint's position in it
        objects.scheduler.override_opt_param_scheduler = True
        objects.scheduler.num_steps = 0  # load_state_dict advances by the saved count
        objects.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])


# ---------------------------------------------------------------------------------------------
# State-dict pieces
# ---------------------------------------------------------------------------------------------
def _sharded_metadata(distributed_optimizer: bool, saved: dict | None = None) -> dict:
    """megatron-core's sharded_state_dict metadata (as Megatron-LM builds it); on load, the one
    stored with the checkpoint plus this run's data-parallel group."""
    from megatron.core import parallel_state

    if saved is not None:
        metadata = dict(saved)
    else:
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        if distributed_optimizer:
            # reshardable over TP/PP/DP; megatron-core's dp_reshardable format (its internal
            # flat buffers) reshards over the data-parallel dimension only
            metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _unwrap(model_chunks: list) -> list:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    modules = []
    for chunk in model_chunks:
        while isinstance(chunk, (DistributedDataParallel, Float16Module)):
            chunk = chunk.module
        modules.append(chunk)
    return modules


def _model_keys(count: int) -> list[str]:
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]  # Megatron-LM's


def _model_sharded_state(model_chunks: list, metadata: dict) -> dict:
    modules = _unwrap(model_chunks)
    return {key: module.sharded_state_dict(metadata=metadata)
            for key, module in zip(_model_keys(len(modules)), modules)}


def _load_model(model_chunks: list, loaded: dict) -> None:
    modules = _unwrap(model_chunks)
    for key, module in zip(_model_keys(len(modules)), modules):
        module.load_state_dict(loaded[key], strict=True)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict):
    """One object per rank, addressed by its (pipeline, tensor, data) coordinates."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


# ---------------------------------------------------------------------------------------------
# Collective helpers
# ---------------------------------------------------------------------------------------------
def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    rank, world = _rank_and_world()
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def _warn(message: str) -> None:
    """A warning from rank 0 on stderr, where a job's log shows it."""
    if _is_rank0():
        print(f"megatron-ntp: WARNING: {message}", file=sys.stderr, flush=True)


def _decided_on_rank0(fn, *args):
    """fn(*args) on global rank 0, broadcast: every rank acts on the same answer even if a
    shared file system shows ranks different states for a moment. An exception on rank 0 is
    raised on every rank."""
    box = [None]
    if _is_rank0():
        try:
            box[0] = (True, fn(*args))
        except Exception as err:  # re-raised below, on every rank
            box[0] = (False, err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
