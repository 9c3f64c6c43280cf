"""`megatron-ntp eval`: per-token statistics and calibration of a checkpoint on a dataset split.

Runs on every rank of any layout (TP, PP with or without interleaving, DP, EP; torchrun or one
process) on megatron-core's forward-only pipeline schedule: each micro-batch's logits shard
([b, s, V_local] on the last pipeline stage) goes straight into
megatron_ntp.eval.metrics.accumulate_token_statistics, whose sums are added over micro-batches,
data-parallel ranks and pipeline stages. The scored positions are the loss positions of training
(GPTDataset's loss mask: all but, with data.eod_mask_loss, those after an end-of-document token).

Sequences: `sequences` samples of the split, in order from the first; data-parallel rank r takes
the r-th contiguous slice, in micro-batches of train.micro_batch_size. The result does not depend
on the layout (up to float rounding).
"""

import json
import os
import sys
from dataclasses import dataclass
from functools import partial

import torch

from megatron_ntp.config import ConfigError
from megatron_ntp.eval.metrics import EvalSums, accumulate_token_statistics
from megatron_ntp.files import write_atomic
from megatron_ntp.session import is_rank0, local_device, parallel_session

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class EvalOptions:
    split: str = "valid"
    """Dataset split: train, valid or test (data.split gives their proportions)."""
    sequences: int = 64
    """Sequences of data.seq_length tokens to score (a multiple of micro-batch size * DP)."""
    topk: int = 0
    """k of the top-k / tail mass; 0 = loss.topk when set, else 100 (the paper's k)."""
    top1_bins: int = 10
    """Equal-width bins of the top-1 reliability table."""
    output: str | None = None
    """JSON file for the results (default: print only)."""


def resolve_topk(config, options: EvalOptions) -> int:
    k = options.topk or config.loss.topk or 100
    if k < 1:
        raise ConfigError(f"--topk {options.topk} must be >= 1")
    return k


def build_eval_dataset(config, split: str, sequences: int):
    """The split's GPTDataset (first `sequences` samples used) and the tokenizer."""
    from megatron_ntp.data import build_datasets, build_tokenizer_from_config
    from megatron_ntp.training.data import resolve_data_config

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} must be one of {', '.join(SPLITS)}")
    data = resolve_data_config(config)
    try:
        tokenizer = build_tokenizer_from_config(data)
        counts = [1, None, None]  # only the asked split needs its samples; 1 keeps train cheap
        counts[SPLITS.index(split)] = sequences
        datasets = build_datasets(data, tokenizer, *counts)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        raise ConfigError(message if "data." in message else f"data: {message}") from err
    dataset = datasets[SPLITS.index(split)]
    if dataset is None:
        raise ConfigError(f"--split {split}: data.split={data.split!r} gives it no documents")
    if len(dataset) < sequences:
        raise ConfigError(f"--split {split} has {len(dataset)} samples, fewer than --sequences "
                          f"{sequences}")
    return dataset, tokenizer


def _forward_step(data_iterator, chunk, sums, topk, tp_group):
    batch = next(data_iterator)
    output = chunk(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

    def loss_func(logits):  # last stage only: [b, s, V_local]
        target = torch.where(batch["loss_mask"] > 0, batch["labels"], -1)
        accumulate_token_statistics(sums, logits.reshape(-1, logits.shape[-1]),
                                    target.reshape(-1).long(), topk, tp_group)
        return logits.new_zeros(()), torch.tensor(0, dtype=torch.int), {}

    return output, loss_func


@torch.no_grad()
def evaluate_chunks(config, chunks, dataset, sequences: int, topk: int,
                    top1_bins: int = 10) -> EvalSums:
    """Global sums over `sequences` samples of `dataset` (the same on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ntp.training import data as data_lib

    dp = parallel_state.get_data_parallel_world_size()
    mbs = config.train.micro_batch_size
    if sequences < 1 or sequences % (mbs * dp):
        raise ConfigError(f"--sequences {sequences} must be a positive multiple of "
                          f"train.micro_batch_size * data-parallel size = {mbs} * {dp}")
    per_rank = sequences // dp
    first = parallel_state.get_data_parallel_rank() * per_rank
    num_microbatches = per_rank // mbs
    if config.parallel.virtual_pipeline > 1 and num_microbatches % config.parallel.pipeline:
        raise ConfigError(f"the interleaved schedule needs the micro-batches per rank "
                          f"({num_microbatches}) to be a multiple of parallel.pipeline="
                          f"{config.parallel.pipeline}; change --sequences")
    sums = EvalSums(top1_bins, device=local_device())
    tp_group = parallel_state.get_tensor_model_parallel_group()
    step = partial(_forward_step, sums=sums, topk=topk, tp_group=tp_group)
    iterators = [data_lib.micro_batches(dataset, first, num_microbatches, mbs)
                 for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=num_microbatches, seq_length=config.data.seq_length,
        micro_batch_size=mbs, forward_only=True)
    if dist.is_initialized():
        # sums live on the last pipeline stage; TP ranks hold copies (not summed)
        sums.all_reduce(parallel_state.get_data_parallel_group())
        sums.all_reduce(parallel_state.get_pipeline_model_parallel_group())
    sums.flat = sums.flat.cpu()
    return sums


def format_results(results: dict) -> str:
    lines = [f"eval {results['split']}: {results['tokens']} tokens in {results['sequences']} "
             f"sequences (step {results['step']})",
             f"  ce {results['ce']:.4f}  ppl {results['ppl']:.3f}  entropy "
             f"{results['entropy']:.4f}  top{results['topk']} mass {results['topk_mass']:.4f}  "
             f"tail mass {results['tail_mass']:.4f}",
             f"  top-1 accuracy {results['top1_accuracy']:.4f}  mean p_max "
             f"{results['p_max_mean']:.4f}  mean p_target {results['p_target_mean']:.4f}  "
             f"ECE(top-1) {results['calibration']['top1']['ece']:.4f}"]

    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    lines.append("  top-1 calibration (p_max bin: count, predicted, observed)")
    for row in results["calibration"]["top1"]["bins"]:
        lines.append(f"    [{row['lo']:.2f}, {row['hi']:.2f})  {row['count']:>9d}  "
                     f"{fmt(row['predicted'])}  {fmt(row['observed'])}")
    lines.append("  vocabulary calibration (p bin: pairs, targets, predicted, observed)")
    for row in results["calibration"]["vocab"]["bins"]:
        predicted, observed = (("-", "-") if row["predicted"] is None else
                               (f"{row['predicted']:.3e}", f"{row['observed']:.3e}"))
        lines.append(f"    [{row['lo']:.0e}, {row['hi']:.0e})  {row['count']:>12d}  "
                     f"{row['targets']:>9d}  {predicted}  {observed}")
    return "\n".join(lines) + "\n"


def run_eval(config, checkpoint_dir: str | None, options: EvalOptions, stream=None) -> dict:
    """Evaluate on every rank of this launch; rank 0 prints and writes JSON. Returns results."""
    from megatron_ntp.config import check_environment
    from megatron_ntp.eval.loading import build_inference_model

    stream = stream or sys.stdout
    check_environment(config)
    topk = resolve_topk(config, options)
    if options.top1_bins < 1:
        raise ConfigError(f"--top1-bins {options.top1_bins} must be >= 1")
    with parallel_session(config):
        dataset, _ = build_eval_dataset(config, options.split, options.sequences)
        chunks, step = build_inference_model(config, checkpoint_dir)
        sums = evaluate_chunks(config, chunks, dataset, options.sequences, topk,
                               options.top1_bins)
        p = config.parallel
        results = {"checkpoint": os.path.abspath(checkpoint_dir) if checkpoint_dir else None,
                   "step": step, "split": options.split, "sequences": options.sequences,
                   "seq_length": config.data.seq_length, "topk": topk,
                   "layout": {"tensor": p.tensor, "pipeline": p.pipeline,
                              "virtual_pipeline": p.virtual_pipeline, "data": p.data,
                              "expert": p.expert},
                   **sums.to_dict()}
        if is_rank0():
            stream.write(format_results(results))
            stream.flush()
            if options.output:
                write_json(options.output, results)
        return results


def write_json(path: str, results: dict) -> None:
    """`results` as indented JSON at `path` (its folder created), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, json.dumps(results, indent=2))
