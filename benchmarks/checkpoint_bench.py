"""The cost of a checkpoint's manifest and its verification, against megatron-core's own save and
load of the same checkpoint, in one run.

save:      megatron_ntp.training.checkpoint.save_checkpoint (megatron-core dist_checkpointing.save
           of model and Adam state, then the manifest, rename, tracker); the manifest part is
           timed again on its own (manifest_entries over every file: read + zlib CRC-32) and
           subtracted to give megatron-core's part.
load:      load_for_training (megatron-core dist_checkpointing.load of model and optimizer state)
           against checkpoint_problems with checksums (checkpoint.verify=true) and sizes only
           (false).

One process (a one-rank gloo group); the files are in the page cache (written just before), as
they are for megatron-core's load too, so the ratios compare CPU work; on a cluster file system
both reads are bound by the storage bandwidth instead. Rounds alternate; the best time of each
part is reported, with the CPU model.

    python benchmarks/checkpoint_bench.py [--hidden 512] [--layers 8] [--rounds 3]
"""

import argparse
import os
import socket
import tempfile
import time
import warnings
from machine import cpu_model  # benchmarks/machine.py (this folder is sys.path[0])

warnings.filterwarnings("ignore")



def build(hidden: int, layers: int, save_dir: str):
    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.parallel import initialize_parallel_from_config
    from megatron_ntp.training.build import build_training_objects

    config = validate_config(load_config(None, [
        "model.preset=tiny-dense", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.ffn_hidden_size={3 * hidden}", f"model.kv_channels={hidden // 4}",
        "data.seq_length=32", "train.global_batch_tokens=32", "train.micro_batch_size=1",
        "train.steps=10", "train.lr_warmup_steps=1", "train.lr_decay_steps=1",
        f"checkpoint.save_dir={save_dir}", "checkpoint.keep_last=1"]),
        world_size=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    initialize_parallel_from_config(config, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{port}")
    objects = build_training_objects(config)
    with_adam_state(objects.optimizer)
    return config, objects


def with_adam_state(optimizer) -> None:
    """Adam moments and step as after a first step (the sizes of a real checkpoint; no data)."""
    import torch

    from megatron_ntp.training.checkpoint_optimizer import inner_optimizers

    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param] = {"exp_avg": torch.randn_like(param),
                                      "exp_avg_sq": torch.rand_like(param),
                                      "step": torch.tensor(1.0)}


def timed(fn, *args):
    begin = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - begin, result


def one_round(config, objects, step: int) -> dict:
    from megatron_ntp.training import checkpoint

    save, path = timed(checkpoint.save_checkpoint, config, objects, step, 0)
    names = checkpoint.list_files(path)
    manifest, _ = timed(checkpoint.manifest_entries, path, names)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    start = checkpoint.StartPoint(step, 0, path)
    load, _ = timed(checkpoint.load_for_training, config, objects, start)
    verify, problems = timed(checkpoint.checkpoint_problems, path, True)
    sizes, _ = timed(checkpoint.checkpoint_problems, path, False)
    assert not problems, problems
    return {"bytes": size, "files": len(names), "save": save - manifest, "manifest": manifest,
            "load": load, "verify": verify, "sizes": sizes}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config, objects = build(args.hidden, args.layers, folder)
        rounds = [one_round(config, objects, step) for step in range(1, args.rounds + 1)]
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    mib = best["bytes"] / 2**20
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); one rank; page cache")
    print(f"checkpoint: {mib:.0f} MiB in {best['files']} files (model + Adam state, fp32)")
    print(f"megatron-core save       {best['save']:7.2f} s")
    print(f"manifest (CRC-32)        {best['manifest']:7.2f} s  "
          f"{best['manifest'] / best['save']:.2f}x of the save  ({mib / best['manifest']:.0f} "
          f"MiB/s)")
    print(f"megatron-core load       {best['load']:7.2f} s")
    print(f"verify, checksums        {best['verify']:7.2f} s  {best['verify'] / best['load']:.2f}x "
          f"of the load")
    print(f"verify, sizes only       {best['sizes']:7.3f} s  {best['sizes'] / best['load']:.3f}x "
          f"of the load")


if __name__ == "__main__":
    main()
