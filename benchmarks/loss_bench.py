"""Speed and peak memory of the shaped loss against megatron-core's cross-entropy, in one run.

For N tokens and a vocabulary of V (default 4096 x 151,936, float32 logits), at each tensor-
parallel size, forward+backward time and peak memory of:
  (a) megatron-core's vocab_parallel_cross_entropy                      (the baseline)
  (b) vocab_parallel_shaped_loss with the defaults (cross-entropy)
  (c) vocab_parallel_shaped_loss at beta=-0.25, lambda_tail=-0.1, k=100
  (d) fused_linear_shaped_loss (output layer + loss, hidden H)           vs output layer + (a)
  (d') fused_linear_shaped_loss_sum (gradients formed in the forward)   vs output layer + (a)
(b) and (c) run with overwrite_logits=True, the memory behaviour of (a); (c') without it.
--fused-chunk-mib sets the fused head's budget per token chunk (the CPU default: 64 MiB, what
keeps (d')'s peak within the weight gradient + 96 MiB); --fused picks (d), (d') or both.
Each variant's time per stage (the loss's torch.profiler labels, stages numbered as in
megatron_ntp/loss/vocab_parallel.py) comes from one more, profiled step (rank 0).
Peak memory is the process's resident-set high-water mark during the step (reset through
/proc/self/clear_refs) above its size before the step: for (a)-(c') the logits count (they are
the loss's memory), for (d) and its baseline the hidden states and the weight do not (the model
holds them anyway), while the weight gradient does. At TP > 1 the peak is the largest over
ranks and time the slowest rank's. Time: median of --repeats steps after a warm-up on small
inputs (torch.compile) and, for (a)-(c'), one step at full size (what a training step sees: the
first large call's one-time allocations, ~32 MiB, are not the loss's per-step memory).

    .venv/bin/python benchmarks/loss_bench.py [--tokens 4096] [--vocab 151936] [--hidden 2048]

The machine matters: it prints the CPU model; run it twice on a quiet machine.
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ntp.loss import (
    LossImpl,
    ShapedLossConfig,
    fused_linear_shaped_loss,
    fused_linear_shaped_loss_sum,
    vocab_parallel_shaped_loss,
)
from megatron_ntp.loss.fused import MATMUL_LABELS
from megatron_ntp.loss.impl import DEFAULT_FUSED_CHUNK_BYTES
from megatron_ntp.loss.vocab_parallel import STAGE_LABELS
from machine import cpu_model  # benchmarks/machine.py (this folder is sys.path[0])

SHAPED = ShapedLossConfig(beta=-0.25, topk=100, lambda_tail=-0.1)


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _megatron_ce(logits, target, group):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, target, tp_group=group)


def _loss_variants(group):
    return {
        "a": lambda z, t: _megatron_ce(z, t, group),
        "b": lambda z, t: vocab_parallel_shaped_loss(z, t, ShapedLossConfig(), group, overwrite_logits=True)[0],
        "c": lambda z, t: vocab_parallel_shaped_loss(z, t, SHAPED, group, overwrite_logits=True)[0],
        "c'": lambda z, t: vocab_parallel_shaped_loss(z, t, SHAPED, group)[0],
    }


def _linear_variants(group, args):
    """The output layer + loss variants: the baseline and those of --fused in args.fused."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    impl = LossImpl(fused_chunk_bytes=(args.fused_chunk_mib << 20) or None)

    def output_layer_plus_ce(h, w, t):
        # megatron-core's ColumnParallelLinear: identity forward, all-reduce of grad in backward
        logits = copy_to_tensor_model_parallel_region(h, group) @ w.t()
        return _megatron_ce(logits, t, group)

    fused = {
        "d": lambda h, w, t: fused_linear_shaped_loss(h, w, t, SHAPED, group, impl=impl)[0],
        "d'": lambda h, w, t: fused_linear_shaped_loss_sum(h, w, t, torch.ones(t.shape),
                                                           SHAPED, group, impl=impl)[0],
    }
    return {"a_linear": output_layer_plus_ce} | {name: fused[name] for name in args.fused}


def _measure(step, make_inputs, repeats, inputs_count):
    """(median seconds, peak MiB) of forward+backward of step(*inputs) on fresh inputs.

    The gradient is taken with torch.autograd.grad: accumulating it into a leaf's .grad would
    make autograd copy megatron-core's gradient (it aliases the logits), which a model's
    output layer never does. inputs_count: whether the inputs' memory counts in the peak.
    """
    times, peak = [], 0.0
    for _ in range(repeats):
        base = _status_mib("VmRSS")
        inputs = make_inputs()
        if not inputs_count:
            base = _status_mib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        leaves = [x for x in inputs if x.requires_grad]
        grads = torch.autograd.grad(step(*inputs).sum(), leaves)
        times.append(time.perf_counter() - start)
        peak = max(peak, _status_mib("VmHWM") - base)
        del inputs, leaves, grads
    return statistics.median(times), peak


def _stage_seconds(step, inputs):
    """{label: seconds} of one profiled forward+backward, per stage label of the loss."""
    leaves = [x for x in inputs if x.requires_grad]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(step(*inputs).sum(), leaves)
    seconds = {label: 0.0 for label in STAGE_LABELS + MATMUL_LABELS}
    for event in prof.key_averages():
        if event.key in seconds:
            seconds[event.key] = event.cpu_time_total / 1e6
    return seconds


def _worker(rank, world, port, args, results):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    vocab_local, n, hidden = args.vocab // world, args.tokens, args.hidden
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, args.vocab, (n,), generator=gen)
    logits = torch.randn(n, vocab_local, generator=gen) * 3
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab_local, hidden, generator=gen) / hidden**0.5
    small_t = target[:64] % (8 * 4096)

    measured, stages = {}, {}
    for name, fn in _loss_variants(group).items():
        fn(torch.randn(64, 4096, requires_grad=True), small_t % (4096 * world)).sum().backward()
        make = lambda: (logits.clone().requires_grad_(), target)  # noqa: E731
        _measure(fn, make, 1, inputs_count=True)  # one step at full size: the steady state
        measured[name] = _measure(fn, make, args.repeats, inputs_count=True)
        stages[name] = _stage_seconds(fn, make())
        dist.barrier()
    for name, fn in (_linear_variants(group, args) if args.linear else {}).items():
        fn(torch.randn(64, 32, requires_grad=True), torch.randn(4096, 32, requires_grad=True),
           small_t % (4096 * world)).sum().backward()
        make = lambda: (h.clone().requires_grad_(), w.clone().requires_grad_(), target)  # noqa: E731
        measured[name] = _measure(fn, make, args.linear_repeats, inputs_count=False)
        stages[name] = _stage_seconds(fn, make())
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, measured)
    if rank == 0:
        results.update(
            {name: (max(g[name][0] for g in gathered), max(g[name][1] for g in gathered))
             for name in measured}
        )
        results["stages"] = stages
    dist.destroy_process_group()


def _run(world, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, port, args, results), nprocs=world, join=True)
        return dict(results)


def _ratio(value, base):
    return f"{value / base:.2f}x" if base > 0 else "n/a"



def _print_stages(stages):
    """Per variant, the seconds of each stage label (rank 0's profiled step)."""
    labels = STAGE_LABELS + MATMUL_LABELS
    short = [label.split(".", 1)[1] for label in labels]
    print(f"\nseconds per stage (rank 0, one profiled step)")
    print("| variant | " + " | ".join(short) + " |")
    print("|---|" + "---|" * len(labels))
    for name, seconds in stages.items():
        print(f"| {name} | " + " | ".join(f"{seconds[label]:.3f}" for label in labels) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linear-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--linear", action=argparse.BooleanOptionalAction, default=True,
                        help="also the output-layer variants (d), (d'): minutes per step")
    parser.add_argument("--fused", nargs="+", choices=["d", "d'"], default=["d", "d'"],
                        help="which fused variants to run (default both)")
    parser.add_argument("--fused-chunk-mib", type=int, default=0,
                        help="the fused head's budget per token chunk, MiB "
                             "(LossImpl.fused_chunk_bytes; 0: the CPU default, 64)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, float32, "
          f"{args.threads} threads, torch {torch.__version__}, fused head chunks "
          f"{args.fused_chunk_mib or DEFAULT_FUSED_CHUNK_BYTES['cpu'] >> 20} MiB")
    rows = [
        ("(a) megatron-core vocab_parallel_cross_entropy", "a", "a"),
        ("(b) shaped loss, cross-entropy settings", "b", "a"),
        ("(c) shaped loss, beta=-0.25 lambda_tail=-0.1 k=100", "c", "a"),
        ("(c') as (c), overwrite_logits=False", "c'", "a"),
        ("output layer + (a)", "a_linear", "a_linear"),
        ("(d) fused output layer + shaped loss (c)", "d", "a_linear"),
        ("(d') as (d), gradients formed in the forward", "d'", "a_linear"),
    ]
    for world in args.tp:
        r = _run(world, args)
        print(f"\nTP = {world}: per rank V_local = {args.vocab // world}")
        print(f"| variant | time (s) | time ratio | peak (MiB) | peak ratio |")
        print(f"|---|---|---|---|---|")
        for label, key, base in rows:
            if key not in r:
                continue
            t, m = r[key]
            print(f"| {label} | {t:.3f} | {_ratio(t, r[base][0])} | {m:.0f} | "
                  f"{_ratio(m, r[base][1])} |")
        _print_stages(r["stages"])


if __name__ == "__main__":
    main()
