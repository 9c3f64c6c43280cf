"""Training throughput with the shaped loss (k = 100) against plain cross-entropy, one run.

    python benchmarks/train_bench.py [--config examples/configs/tiny_dense.yaml] [--rounds 5]
        [--steps-per-round 3] [overrides ...]

One process, one model: the loss settings are switched between rounds (ABAB...), so both
settings run on the same weights, data and machine state; each round times a few full
optimizer steps (forward, backward, optimizer) and the figure is tokens/s from the median step
time of each setting. Target: shaped / cross-entropy >= 0.95. Data: the config's, or the
built-in offline sample when data.blend is unset.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPED = dict(topk=100, lambda_tail=-0.1)  # METHOD.md's tail-suppression setting


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/configs/tiny_dense.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.loss import ShapedLossConfig
    from megatron_ntp.parallel import destroy_parallel, initialize_parallel_from_config
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.build import build_training_objects, loss_modules
    from megatron_ntp.training.loop import BatchLayout, _free_port, _iterators
    from megatron_ntp.training.step import train_step

    steps = 2 + 2 * args.rounds * args.steps_per_round  # 2 warm-up steps
    config = validate_config(load_config(args.config, [
        *args.overrides, f"train.steps={steps}", "train.lr_warmup_steps=1",
        "train.lr_decay_steps=0", "logging.run_dir=runs/train_bench"]), world_size=1)
    initialize_parallel_from_config(config, rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{_free_port()}")
    layout = BatchLayout(config)
    train_data, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
    objects = build_training_objects(config)
    # beta alone (k = 0) shows what the top-k selection costs on top of the same passes
    settings = {"cross-entropy": ShapedLossConfig(),
                "shaped k=100": dataclasses.replace(ShapedLossConfig(), **SHAPED),
                "beta=-0.25 k=0": ShapedLossConfig(beta=-0.25)}
    times = {name: [] for name in settings}
    step = 0

    def run(loss_config):
        nonlocal step
        for module in loss_modules(objects.model):
            module.set_loss_config(loss_config)
        start = time.perf_counter()
        train_step(objects, _iterators(config, train_data, layout, step),
                   layout.num_microbatches, layout.micro_batch_size, layout.seq_length)
        step += 1
        return time.perf_counter() - start

    for loss_config in settings.values():  # warm-up, one step each
        run(loss_config)
    for _ in range(args.rounds):
        for name, loss_config in settings.items():
            times[name] += [run(loss_config) for _ in range(args.steps_per_round)]
    destroy_parallel()

    m = config.model
    print(f"model {m.preset or '(custom)'}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"vocab {m.vocab_size}; {config.train.global_batch_tokens} tokens/step "
          f"(seq {layout.seq_length}, micro-batch {layout.micro_batch_size}); "
          f"torch threads {torch.get_num_threads()}")
    rates = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rates[name] = config.train.global_batch_tokens / median
        print(f"{name:>14}: median step {1000 * median:7.1f} ms  {rates[name]:9.0f} tokens/s "
              f"({len(seconds)} steps)")
    ratio = rates["shaped k=100"] / rates["cross-entropy"]
    print(f"ratio shaped / cross-entropy tokens/s: {ratio:.3f} (target >= 0.95)")
    print(f"ratio beta-only (k=0) / cross-entropy: "
          f"{rates['beta=-0.25 k=0'] / rates['cross-entropy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
