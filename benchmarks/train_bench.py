"""Training throughput with the shaped loss (k = 100) against plain cross-entropy, one run.

    python benchmarks/train_bench.py [--config examples/configs/tiny_dense.yaml] [--rounds 5]
        [--steps-per-round 3] [overrides ...]

One process, one model: the loss settings take turns step by step (ABCABC...), so they run on
the same weights, data and machine state; every step is a full optimizer step (forward,
backward, optimizer). Reported: tokens/s from the median and from the fastest step of each
setting, and the ratio to cross-entropy as the median over rounds of the ratio of adjacent
steps (robust to other load on a shared machine drifting over the run).
Target: shaped (k = 100) / cross-entropy >= 0.97. Data: the config's, or the built-in offline
sample when data.blend is unset.

    python benchmarks/train_bench.py --fused-head [...]

instead compares two models built from the same seed (the same initial weights), the unfused
output layer + loss and model.fused_output_loss=true, steps alternating, both at the paper's
tail-suppression setting (k = 100): tokens/s ratio fused / unfused (target >= 1.0) and the
largest per-step difference of the mean loss (target <= 5e-5).
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from machine import cpu_model  # noqa: E402  benchmarks/machine.py (this folder is sys.path[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "examples/configs/tiny_dense.yaml"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--fused-head", action="store_true",
                        help="compare model.fused_output_loss=true with the unfused head")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.fused_head:
        return compare_fused_head(args)
    return compare_loss_settings(args)


def _config(args, steps: int, *extra):
    """The benchmark's config: the given one with its overrides, then `extra` overrides."""
    from megatron_ntp.config import load_config, validate_config

    return validate_config(load_config(args.config, [
        *args.overrides, f"train.steps={steps}", "train.lr_warmup_steps=1",
        "train.lr_decay_steps=0", "logging.run_dir=runs/train_bench", *extra]), world_size=1)


def _stepper(config, objects, train_data, layout):
    """run(loss_config) -> (seconds, sums [5]) of one full optimizer step of `objects`."""
    from megatron_ntp.training.build import loss_modules
    from megatron_ntp.training.loop import micro_batch_iterators
    from megatron_ntp.training.step import train_step

    step = 0

    def run(loss_config):
        nonlocal step
        for module in loss_modules(objects.model):
            module.set_loss_config(loss_config)
        start = time.perf_counter()
        sums, _, _ = train_step(objects, micro_batch_iterators(config, train_data, layout, step),
                                layout.num_microbatches, layout.micro_batch_size,
                                layout.seq_length)
        step += 1
        return time.perf_counter() - start, sums

    return run


def _describe(config, layout, torch):
    m = config.model
    print(f"CPU: {cpu_model()}; model {m.preset or '(custom)'}: {m.num_layers} layers, hidden "
          f"{m.hidden_size}, vocab {m.vocab_size}; {config.train.global_batch_tokens} "
          f"tokens/step (seq {layout.seq_length}, micro-batch {layout.micro_batch_size}); "
          f"torch threads {torch.get_num_threads()}")


def compare_fused_head(args) -> int:
    import torch

    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.loss import PAPER_SETTINGS
    from megatron_ntp.parallel import set_seed
    from megatron_ntp.session import parallel_session
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.build import build_training_objects

    steps = 1 + args.rounds * args.steps_per_round
    heads = ("unfused", "fused")
    configs = {name: _config(args, steps, f"model.fused_output_loss={name == 'fused'}")
               for name in heads}
    config = configs["unfused"]
    loss_config = PAPER_SETTINGS["tail_suppression"]
    with parallel_session(config):  # one rank on a free local port
        layout = BatchLayout(config)
        train_data, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
        runs = {}
        for name in heads:
            set_seed(config.train.seed)  # the same initial weights for both heads
            objects = build_training_objects(configs[name])
            runs[name] = _stepper(configs[name], objects, train_data, layout)
        times = {name: [] for name in heads}
        losses = {name: [] for name in heads}
        for name in heads:  # warm-up, one step each (not compared: the models then differ)
            runs[name](loss_config)
        for _ in range(args.rounds * args.steps_per_round):
            for name in heads:
                seconds, sums = runs[name](loss_config)
                times[name].append(seconds)
                losses[name].append(sums[0].item() / max(sums[4].item(), 1.0))
    _describe(config, layout, torch)
    tokens = config.train.global_batch_tokens
    for name in heads:
        median = statistics.median(times[name])
        print(f"{name:>8} head: {tokens / median:7.0f} tokens/s (median step {1000 * median:6.1f} "
              f"ms) over {len(times[name])} steps")
    ratios = [u / f for u, f in zip(times["unfused"], times["fused"])]
    gap = max(abs(u - f) for u, f in zip(losses["unfused"], losses["fused"]))
    print(f"tokens/s ratio fused / unfused: {statistics.median(ratios):.3f} (median of "
          f"{len(ratios)} adjacent-step ratios) target >= 1.0")
    print(f"largest per-step difference of the mean loss: {gap:.2e} (losses "
          f"{losses['unfused'][0]:.5f} .. {losses['unfused'][-1]:.5f}) target <= 5e-5")
    return 0


def compare_loss_settings(args) -> int:

    import torch

    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.loss import PAPER_SETTINGS, ShapedLossConfig
    from megatron_ntp.session import parallel_session
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.build import build_training_objects

    steps = 3 + 3 * args.rounds * args.steps_per_round  # one warm-up step per setting
    config = _config(args, steps)
    with parallel_session(config):  # one rank on a free local port
        layout = BatchLayout(config)
        train_data, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
        run = _stepper(config, build_training_objects(config), train_data, layout)
        # beta alone (k = 0) shows what the top-k selection costs on top of the same passes
        settings = {"cross-entropy": ShapedLossConfig(),
                    "shaped k=100": PAPER_SETTINGS["tail_suppression"],
                    "beta=-0.25 k=0": ShapedLossConfig(beta=-0.25)}
        times = {name: [] for name in settings}
        for loss_config in settings.values():  # warm-up, one step each
            run(loss_config)
        for _ in range(args.rounds):
            for name, loss_config in settings.items():
                times[name] += [run(loss_config)[0] for _ in range(args.steps_per_round)]

    _describe(config, layout, torch)
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
              + (" target >= 0.97" if name == "shaped k=100" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
