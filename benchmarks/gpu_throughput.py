"""Training tokens/s and MFU on one GPU: the shaped loss's two heads against megatron-core's own
cross-entropy head, in one run.

    python benchmarks/gpu_throughput.py [--warmup 2] [--rounds 10] [--peak-tflops T]
        [--config FILE] [overrides ...]

Default: dense-1b (20 layers, hidden 1536, vocabulary 151,936), bf16, Transformer Engine layers,
sequence 4096, 32,768 tokens a step (4 micro-batches of 2 sequences), one GPU, AdamW; the
built-in sample data unless data.blend is set. Overrides are the config's dotted fields
(`model.num_layers=4`, `train.micro_batch_size=1`, ...).

One model; the heads take turns step by step (ABCABC...), so they run on the same weights, data
and GPU state; every step is a full optimizer step (forward, backward, optimizer):

  megatron-core CE   GPTModel's own loss: the output layer's [s, b, V] logits, then
                     tensor_parallel.vocab_parallel_cross_entropy (its unfused path:
                     cross_entropy_loss_fusion off, the TransformerConfig default)
  shaped unfused     the output layer, then vocab_parallel_shaped_loss (k = 100,
                     lambda_tail = -0.1, the paper's tail-suppression setting)
  shaped fused       model.fused_output_loss: fused_linear_shaped_loss_sum, the same setting,
                     no logits tensor

`--warmup` rounds (torch.compile of the loss, allocator growth) are not timed. Reported per
head: tokens/s of the median step, MFU, peak GPU memory allocated, the last step's
cross-entropy; then each shaped head's tokens/s ratio to megatron-core's (median over rounds of
the ratio within a round). MFU = model FLOPs per token (megatron_ntp.models.counting.
flops_per_token: 6 x the matmul parameters, output layer included, plus causal attention; no
recompute) x tokens/s / the GPU's dense bf16 peak: by default from the device name
(megatron_ntp.training.metrics.PEAK_BF16_FLOPS, as training's MFU: 989 TFLOP/s for H100, the
SXM figure; an H100 PCIe's is 756, an H100 NVL's 835: pass --peak-tflops). Exit status 1 when a
loss is not finite; 2 without a CUDA GPU (nothing is run).
"""

import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

HEADS = ("megatron-core CE", "shaped unfused", "shaped fused")
DEFAULT_OVERRIDES = (
    "model.preset=dense-1b", "model.bf16=true", "model.transformer_impl=transformer_engine",
    "data.seq_length=4096", "train.global_batch_tokens=32768", "train.micro_batch_size=2",
    "logging.run_dir=runs/gpu_throughput", "logging.tensorboard=false")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="a YAML config (default: none)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: by device name)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.rounds < 1:
        parser.error("--warmup and --rounds must be at least 1")
    return args


def benchmark_config(args):
    """The validated config: the defaults, then --config and the overrides, then the step count
    (warm-up and timed rounds, one step per head each)."""
    from megatron_ntp.config import load_config, validate_config

    steps = (args.warmup + args.rounds) * len(HEADS)
    return validate_config(load_config(args.config, [
        *DEFAULT_OVERRIDES, *args.overrides, f"train.steps={steps}", "train.lr_warmup_steps=2",
        "train.lr_decay_steps=0", "train.eval_interval=0"]), world_size=1)


def peak_bf16_flops(device_name: str, tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one GPU or None, where the figure comes from)."""
    from megatron_ntp.training.metrics import PEAK_BF16_FLOPS

    if tflops is not None:
        return tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops, (f"PEAK_BF16_FLOPS[{key!r}] by device name: the dense bf16 peak of "
                           f"the SXM card; pass --peak-tflops for a PCIe or NVL card")
    return None, f"no peak known for {device_name!r}: pass --peak-tflops"


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None,
        gpus: int = 1) -> float:
    """Model FLOPs utilisation, as training computes it (megatron_ntp/training/loop.py); NaN
    without a peak."""
    if not peak_flops:
        return math.nan
    return flops_per_token * tokens_per_s / (gpus * peak_flops)


def require_gpu(config) -> None:
    """Exit with status 2 and the reason where this cannot run (before any work)."""
    import torch

    from megatron_ntp.config import ConfigError, check_environment

    problem = None
    if not torch.cuda.is_available():
        problem = ("needs a CUDA GPU, and none is available here (torch.cuda.is_available() is "
                   "False)")
    else:
        try:
            check_environment(config)  # Transformer Engine importable, FP8 capability
        except ConfigError as err:
            problem = str(err)
    if problem:
        print(f"benchmarks/gpu_throughput.py {problem}; nothing was run", file=sys.stderr)
        sys.exit(2)


def _megatron_core_loss(self, labels, logits):
    """GPTModel's own loss hook (megatron-core's cross-entropy head) on a ShapedLossGPTModel,
    leaving the statistics the training step's loss function reads (entropy and top-k mass are
    not computed by megatron-core: zeros). labels [b, s], logits [s, b, V] -> loss [b, s]."""
    import torch
    from megatron.core.models.gpt import GPTModel

    loss = GPTModel.compute_language_model_loss(self, labels, logits)
    zeros = torch.zeros_like(loss)  # on the loss's device; no host sync
    self.loss_stats = {"loss": loss.detach(), "ce": loss.detach(), "entropy": zeros,
                       "topk_mass": zeros}
    return loss


def select_head(module, head: str) -> None:
    """Make ShapedLossGPTModel `module` run `head` (one of HEADS) from its next forward."""
    import types

    module.fused_output_loss = head == "shaped fused"
    if head == "megatron-core CE":
        module.compute_language_model_loss = types.MethodType(_megatron_core_loss, module)
    else:
        module.__dict__.pop("compute_language_model_loss", None)  # the class's shaped loss


def _stepper(config, objects, train_data, layout):
    """run(head) -> (seconds, peak bytes allocated, global sums [5]) of one optimizer step."""
    import torch

    from megatron_ntp.loss import PAPER_SETTINGS
    from megatron_ntp.training.build import loss_modules
    from megatron_ntp.training.loop import micro_batch_iterators
    from megatron_ntp.training.step import train_step

    step = 0

    def run(head):
        nonlocal step
        for module in loss_modules(objects.model):
            module.set_loss_config(PAPER_SETTINGS["tail_suppression"])
            select_head(module, head)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        sums, _, _ = train_step(objects, micro_batch_iterators(config, train_data, layout, step),
                                layout.num_microbatches, layout.micro_batch_size,
                                layout.seq_length)
        torch.cuda.synchronize()  # after the step (its sums are on the host already)
        step += 1
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(), sums

    return run


def measure(config, args) -> dict:
    """{head: {"seconds": [...], "peak": bytes, "ce": last step's mean CE}} of the timed rounds."""
    from megatron_ntp.config.batch import BatchLayout
    from megatron_ntp.session import parallel_session
    from megatron_ntp.training import data as data_lib
    from megatron_ntp.training.build import build_training_objects

    results = {head: {"seconds": [], "peak": 0, "ce": math.nan} for head in HEADS}
    with parallel_session(config):  # one rank on a free local port (NCCL)
        layout = BatchLayout(config)
        train_data, _, _ = data_lib.build_train_valid(config, layout.global_sequences)
        run = _stepper(config, build_training_objects(config), train_data, layout)
        for _ in range(args.warmup):
            for head in HEADS:
                run(head)
        for _ in range(args.rounds):
            for head in HEADS:
                seconds, peak, sums = run(head)
                result = results[head]
                result["seconds"].append(seconds)
                result["peak"] = max(result["peak"], peak)
                result["ce"] = sums[1].item() / max(sums[4].item(), 1.0)
    return results


def report(config, args, results) -> int:
    """Print the table and the ratios; 1 when a loss is not finite."""
    import torch

    from megatron_ntp.models.counting import flops_per_token

    m, tokens = config.model, config.train.global_batch_tokens
    flops = flops_per_token(m, config.data.seq_length).model
    name = torch.cuda.get_device_name()
    peak, source = peak_bf16_flops(name, args.peak_tflops)
    print(f"GPU: {name}; torch {torch.__version__}; model {m.preset or '(custom)'}: "
          f"{m.num_layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}, "
          f"{m.transformer_impl}, {'bf16' if m.bf16 else 'fp32'}{', fp8 ' + m.fp8 if m.fp8 else ''}"
          f"; seq {config.data.seq_length}, {tokens} tokens/step (micro-batch "
          f"{config.train.micro_batch_size}); {args.rounds} timed rounds after {args.warmup}")
    print(f"model FLOPs per token {flops / 1e9:.2f} GFLOP; MFU against "
          + (f"{peak / 1e12:.0f} TFLOP/s ({source})" if peak else source))
    medians = {head: statistics.median(r["seconds"]) for head, r in results.items()}
    for head, r in results.items():
        speed = tokens / medians[head]
        print(f"{head:>16}: {speed:9.0f} tokens/s (median step {1000 * medians[head]:7.1f} ms), "
              f"MFU {100 * mfu(speed, flops, peak):5.1f}%, peak memory "
              f"{r['peak'] / 2**30:5.1f} GiB, last step's CE {r['ce']:.4f}")
    base = results[HEADS[0]]["seconds"]
    for head in HEADS[1:]:
        ratios = [b / s for b, s in zip(base, results[head]["seconds"])]
        print(f"tokens/s ratio {head} / {HEADS[0]}: {statistics.median(ratios):.3f} (median of "
              f"{len(ratios)} rounds; from the median steps "
              f"{medians[HEADS[0]] / medians[head]:.3f})")
    finite = all(math.isfinite(r["ce"]) for r in results.values())
    if not finite:
        print("a head's loss is not finite: see the CE column", file=sys.stderr)
    return 0 if finite else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    config = benchmark_config(args)
    require_gpu(config)
    return report(config, args, measure(config, args))


if __name__ == "__main__":
    sys.exit(main())
