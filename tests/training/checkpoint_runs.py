"""In-process checkpoint scenarios, run inside one spawned gloo rank (tests/distributed.py) so
that megatron-core is imported once and the CPU patches stay out of the pytest process.

`crash_resume_finetune(rank, world_size, base, out_dir)` writes <out_dir>/results.json:
1. a run whose final save fails after its shards are written (dist_checkpointing.save patched
   to raise): the previous checkpoint must stay the latest;
2. the same run again: it resumes from that checkpoint, removes the stale temporary folder and
   redoes the lost steps exactly;
3. a mid-training start from the result (checkpoint.finetune) with a new sequence length,
   RoPE base, learning-rate schedule and data blend: weights and Adam state equal the saved
   ones, step 0;
4. load_model_weights of the saved run into freshly built model chunks.
"""

import json
import os


class InjectedSaveFailure(OSError):
    pass


def _config(overrides):
    from megatron_ntp.config import load_config, validate_config

    return validate_config(load_config(None, overrides), world_size=1)


def _train(overrides, keep=None):
    """Train `overrides` on this rank; returns (records or the raised CheckpointSaveFailed or
    CheckpointDamaged, snapshot)."""
    from megatron.core import parallel_state

    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training.build import build_training_objects
    from megatron_ntp.training.checkpoint import CheckpointDamaged, CheckpointSaveFailed
    from megatron_ntp.training.loop import train

    config = _config(overrides)
    initialize_parallel_from_config(config)
    try:
        objects = build_training_objects(config)
        with open(os.devnull, "w") as quiet:
            try:
                result = train(config, stream=quiet, objects=objects)
            except (CheckpointSaveFailed, CheckpointDamaged) as err:
                result = err
        return result, (keep(objects) if keep else None)
    finally:
        parallel_state.destroy_model_parallel()


def _weights(objects_or_chunks) -> dict:
    from megatron_ntp.training.build import loss_modules

    model = getattr(objects_or_chunks, "model", objects_or_chunks)
    (module,) = loss_modules(model)
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _adam_state(objects) -> dict:
    """{parameter name: (exp_avg, exp_avg_sq, step tensor)} of the (FP32) optimizer."""
    from megatron_ntp.training.build import loss_modules
    from megatron_ntp.training.checkpoint_optimizer import inner_optimizers

    (module,) = loss_modules(objects.model)
    names = {p: name for name, p in module.named_parameters()}
    state = {}
    for inner in inner_optimizers(objects.optimizer):
        for param, entry in inner.state.items():
            state[names[param]] = (entry["exp_avg"].clone(), entry["exp_avg_sq"].clone(),
                                   entry["step"])
    return state


def _snapshot(objects):
    return _weights(objects), _adam_state(objects)


def _read_steps(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def crash_resume_finetune(rank, world_size, base, out_dir):
    """A save that dies, the resume, a mid-training phase and load_model_weights, in turn;
    results.json collects what each phase saw."""
    results = {}
    ckpt, run_dir = os.path.join(out_dir, "ckpt"), os.path.join(out_dir, "run")
    pretrain = base + ["train.steps=4", "checkpoint.save_interval=2",
                       f"checkpoint.save_dir={ckpt}", f"logging.run_dir={run_dir}"]
    _crash_during_save(pretrain, ckpt, run_dir, results)
    weights, adam = _resume_after_crash(pretrain, ckpt, run_dir, results)
    _finetune_phase(base, ckpt, os.path.join(out_dir, "mid"), weights, adam, results)
    _load_weights_into_bare_chunks(pretrain, ckpt, weights, results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f)


def _crash_during_save(pretrain, ckpt, run_dir, results):
    """1. the save of step 4 dies after writing its shards, before it is published"""
    from megatron.core import dist_checkpointing

    from megatron_ntp.training import checkpoint

    real_save = dist_checkpointing.save

    def dying_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        if "iter_0000004" in str(directory):
            raise InjectedSaveFailure("injected: the job died while saving iter_0000004")

    dist_checkpointing.save = dying_save
    try:
        crashed, _ = _train(pretrain)
    finally:
        dist_checkpointing.save = real_save
    results["crash_raised"] = str(crashed)
    results["after_crash"] = {
        "tracker": open(os.path.join(ckpt, checkpoint.TRACKER_FILE)).read().strip(),
        "complete": sorted(checkpoint.complete_checkpoints(ckpt)),
        "entries": sorted(os.listdir(ckpt)),
        "latest": os.path.basename(checkpoint.latest_checkpoint(ckpt)),
    }
    results["crashed_metrics"] = _read_steps(os.path.join(run_dir, "metrics.jsonl"))


def _resume_after_crash(pretrain, ckpt, run_dir, results):
    """2. the same command again: resumes from iter_0000002; returns (weights, Adam state)"""
    from megatron_ntp.training import checkpoint

    resumed, (weights, adam) = _train(pretrain, keep=_snapshot)
    results["resumed_records"] = resumed
    results["resumed_metrics"] = _read_steps(os.path.join(run_dir, "metrics.jsonl"))
    results["after_resume"] = {
        "tracker": open(os.path.join(ckpt, checkpoint.TRACKER_FILE)).read().strip(),
        "entries": sorted(os.listdir(ckpt)),
    }
    return weights, adam


def _finetune_phase(base, ckpt, mid_dir, weights, adam, results):
    """3. mid-training: new sequence length, RoPE base, schedule and blend; weights and Adam
    state kept"""
    from megatron.core import parallel_state

    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training import checkpoint
    from megatron_ntp.training.build import build_training_objects

    prefix = next(o for o in base if o.startswith("data.blend=")).split("=", 1)[1]
    mid = base + [f"data.blend=0.7 {prefix} 0.3 {prefix}", "data.seed=7",
                  "data.seq_length=64", "train.global_batch_tokens=256", "model.rotary_base=1e6",
                  "train.steps=2", "train.lr=1e-3", "train.min_lr=1e-4",
                  "train.lr_warmup_steps=0", "train.lr_decay_steps=2",
                  f"checkpoint.load_dir={ckpt}", "checkpoint.finetune=true",
                  f"checkpoint.save_dir={mid_dir}/ckpt", f"logging.run_dir={mid_dir}/run"]
    config = _config(mid)
    initialize_parallel_from_config(config)
    try:
        objects = build_training_objects(config)
        start = checkpoint.plan_start(config)
        checkpoint.load_for_training(config, objects, start)
        loaded_adam = _adam_state(objects)
        results["finetune_start"] = [start.step, start.consumed_samples, start.finetune]
        results["finetune_weights_equal"] = _equal(_weights(objects), weights)
        results["finetune_adam_equal"] = all(
            _equal(dict(enumerate(loaded_adam[n][:2])), dict(enumerate(adam[n][:2])))
            for n in adam) and loaded_adam.keys() == adam.keys()
        steps = [entry[2] for entry in loaded_adam.values()]
        results["finetune_adam_steps"] = sorted({float(s) for s in steps})
        results["finetune_adam_steps_distinct"] = len({id(s) for s in steps}) == len(steps)
    finally:
        parallel_state.destroy_model_parallel()
    results["finetune_records"], _ = _train(mid)
    saved = checkpoint.read_checkpoint_config(f"{mid_dir}/ckpt")
    results["finetune_saved_config"] = {"rotary_base": saved.model.rotary_base,
                                        "seq_length": saved.data.seq_length,
                                        "blend": saved.data.blend}


def _load_weights_into_bare_chunks(pretrain, ckpt, weights, results):
    """4. load_model_weights into bare chunks of the pre-training config"""
    from megatron.core import parallel_state

    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training import checkpoint
    from megatron_ntp.training.build import build_model_chunks

    config = _config(pretrain)
    initialize_parallel_from_config(config)
    try:
        chunks, _ = build_model_chunks(config)
        results["load_model_weights_step"] = checkpoint.load_model_weights(chunks, ckpt)
        results["load_model_weights_equal"] = _equal(_weights(chunks), weights)
    finally:
        parallel_state.destroy_model_parallel()


# ---------------------------------------------------------------------------------------------
# The fault matrix: damage after a save, a full disk during one
# ---------------------------------------------------------------------------------------------
def _largest_shard(checkpoint_dir):
    shards = [n for n in os.listdir(checkpoint_dir) if n.endswith(".distcp")]
    return max(shards, key=lambda n: os.path.getsize(os.path.join(checkpoint_dir, n)))


def _truncate_shard(ckpt):
    folder = os.path.join(ckpt, "iter_0000004")
    name = _largest_shard(folder)
    os.truncate(os.path.join(folder, name), 1000)
    return name


def _remove_shard(ckpt):
    folder = os.path.join(ckpt, "iter_0000004")
    name = _largest_shard(folder)
    os.remove(os.path.join(folder, name))
    return name


def _corrupt_metadata(ckpt):
    """Same size, other bytes: only the checksum can tell."""
    path = os.path.join(ckpt, "iter_0000004", "metadata.json")
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2:len(data) // 2 + 8] = b"garbage!"
        f.seek(0)
        f.write(bytes(data))
    return "metadata.json"


def _write_tracker(text):
    def fault(ckpt):
        with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(text)
        return "latest_checkpointed_iteration.txt"
    return fault


FAULTS = {"truncated_shard": _truncate_shard, "missing_shard": _remove_shard,
          "corrupted_metadata": _corrupt_metadata,
          "tracker_names_missing_step": _write_tracker("5\n"),
          "tracker_garbage": _write_tracker("\x00\x17garbage")}


def _state_after_step4(pristine, folder):
    """A copy of the uninterrupted run as it was after saving step 4 (iter_0000006 gone)."""
    import shutil

    shutil.copytree(pristine, folder)
    shutil.rmtree(os.path.join(folder, "ckpt", "iter_0000006"))
    with open(os.path.join(folder, "ckpt", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("4\n")


def _outcome(args, folder):
    """Train; what a person would see: the error or the records, the warnings, the files."""
    import contextlib
    import io

    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        result, _ = _train(args)
    ckpt = os.path.join(folder, "ckpt")
    return {"error": None if isinstance(result, list) else str(result),
            "warnings": warnings.getvalue(),
            "metrics": _read_steps(os.path.join(folder, "run", "metrics.jsonl")),
            "entries": sorted(os.listdir(ckpt)),
            "tracker": open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read()}


def _enospc_during_save(args, folder):
    """A resume whose save of step 6 finds the disk full, then the same command again."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real_write = filesystem_async._write_item

    def full_disk(*args, **kwargs):
        stream = args[-4] if len(args) >= 4 else kwargs.get("stream")
        if "iter_0000006" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
        return real_write(*args, **kwargs)

    filesystem_async._write_item = full_disk
    try:
        failed = _outcome(args, folder)
    finally:
        filesystem_async._write_item = real_write
    return failed, _outcome(args, folder)


def fault_matrix(rank, world_size, base, out_dir):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6); for each fault, a copy of its state
    after step 4 with iter_0000004 (or the tracker) damaged, resumed with the same command; and
    a full disk while saving step 6. Writes <out_dir>/faults.json."""
    def args(folder):
        return base + ["train.steps=6", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
                       f"checkpoint.save_dir={folder}/ckpt", f"logging.run_dir={folder}/run"]

    pristine = os.path.join(out_dir, "pristine")
    _train(args(pristine))
    results = {"reference": _read_steps(os.path.join(pristine, "run", "metrics.jsonl"))}
    for name, fault in FAULTS.items():
        folder = os.path.join(out_dir, name)
        _state_after_step4(pristine, folder)
        damaged_file = fault(os.path.join(folder, "ckpt"))
        results[name] = {"file": damaged_file, **_outcome(args(folder), folder)}
    folder = os.path.join(out_dir, "enospc")
    _state_after_step4(pristine, folder)
    results["enospc"], results["enospc_rerun"] = _enospc_during_save(args(folder), folder)
    with open(os.path.join(out_dir, "faults.json"), "w") as f:
        json.dump(results, f)


def train_killed_after_rename(args, step):
    """`megatron-ntp train args` in this process, SIGKILLed by itself right after the rename of
    iter_<step>.tmp to iter_<step> (before the directory's fsync and the tracker update)."""
    import signal

    from megatron_ntp import cli

    real_rename, final = os.rename, f"iter_{step:07d}"

    def rename_then_die(source, target):
        real_rename(source, target)
        if str(target).endswith(final) and str(source).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
    cli.main(["train", *args])


def verify_on_every_rank(rank, world_size, checkpoint_dirs, out_dir):
    """verify_checkpoint of each folder on every rank (checksums spread over the ranks); each
    rank writes the messages it raised to <out_dir>/verify_<rank>.json."""
    from megatron_ntp.training.checkpoint import CheckpointDamaged, verify_checkpoint

    messages = []
    for path in checkpoint_dirs:
        try:
            verify_checkpoint(path)
            messages.append(None)
        except CheckpointDamaged as err:
            messages.append(str(err))
    with open(os.path.join(out_dir, f"verify_{rank}.json"), "w") as f:
        json.dump(messages, f)
