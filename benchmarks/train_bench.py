"""Training throughput with the shaped loss (k = 100) against plain cross-entropy, one run.

    python benchmarks/train_bench.py [--config examples/configs/tiny_dense.yaml] [--rounds 5]
        [--steps-per-round 3] [overrides ...]

One process, one model: the loss settings take turns step by step (ABCABC...), so they run on
the same weights, data and machine state; every step is a full optimizer step (forward,
backward, optimizer). Reported: tokens/s from the median and from the fastest step of each
setting, and the ratio to cross-entropy as the median over rounds of the ratio of adjacent
steps (robust to other load on a shared machine drifting over the run).
Target: shaped (k = 100) / cross-entropy >= 0.95. Data: the config's, or the built-in offline
sample when data.blend is unset.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/configs/tiny_dense.yaml"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)


    import torch

    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.loss import PAPER_SETTINGS, ShapedLossConfig
    from megatron_ntp.session import parallel_session
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.build import build_training_objects, loss_modules
    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.training.loop import micro_batch_iterators
    from megatron_ntp.training.step import train_step

    steps = 3 + 3 * args.rounds * args.steps_per_round  # one warm-up step per setting
    config = validate_config(load_config(args.config, [
        *args.overrides, f"train.steps={steps}", "train.lr_warmup_steps=1",
        "train.lr_decay_steps=0", "logging.run_dir=runs/train_bench"]), world_size=1)
    with parallel_session(config):  # one rank on a free local port
        layout = BatchLayout(config)
        train_data, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
        objects = build_training_objects(config)
        # beta alone (k = 0) shows what the top-k selection costs on top of the same passes
        settings = {"cross-entropy": ShapedLossConfig(),
                    "shaped k=100": PAPER_SETTINGS["tail_suppression"],
                    "beta=-0.25 k=0": ShapedLossConfig(beta=-0.25)}
        times = {name: [] for name in settings}
        step = 0

        def run(loss_config):
            nonlocal step
            for module in loss_modules(objects.model):
                module.set_loss_config(loss_config)
            start = time.perf_counter()
            train_step(objects, micro_batch_iterators(config, train_data, layout, step),
                       layout.num_microbatches, layout.micro_batch_size, layout.seq_length)
            step += 1
            return time.perf_counter() - start

        for loss_config in settings.values():  # warm-up, one step each
            run(loss_config)
        for _ in range(args.rounds):
            for name, loss_config in settings.items():
                times[name] += [run(loss_config) for _ in range(args.steps_per_round)]

    m = config.model
    print(f"model {m.preset or '(custom)'}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"vocab {m.vocab_size}; {config.train.global_batch_tokens} tokens/step "
          f"(seq {layout.seq_length}, micro-batch {layout.micro_batch_size}); "
          f"torch threads {torch.get_num_threads()}")
    tokens = config.train.global_batch_tokens
    for name, seconds in times.items():
        median, fastest = statistics.median(seconds), min(seconds)
        print(f"{name:>14}: {tokens / median:7.0f} tokens/s (median step {1000 * median:6.1f} "
              f"ms), {tokens / fastest:7.0f} tokens/s (fastest step) over {len(seconds)} steps")
    for name in list(settings)[1:]:
        ratios = [ce / other for ce, other in zip(times["cross-entropy"], times[name])]
        print(f"tokens/s ratio {name} / cross-entropy: {statistics.median(ratios):.3f} "
              f"(median of {len(ratios)} adjacent-step ratios; fastest steps: "
              f"{min(times['cross-entropy']) / min(times[name]):.3f})"
              + (" target >= 0.95" if name == "shaped k=100" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
