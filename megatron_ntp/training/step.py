"""One optimizer step (or one validation pass) on megatron-core's forward-backward schedules.

Loss normalisation: each micro-batch's loss function returns megatron-core's 3-tuple
(sum of masked per-token losses, number of loss tokens, reporting dict). With
calculate_per_token_loss the schedule leaves the sum alone (no division by the number of
micro-batches) and finalize_model_grads divides every gradient by the token count summed over
micro-batches and data-parallel ranks: the gradient of (sum of losses / total tokens) of the
global batch, whatever the layout.

Reporting: each micro-batch yields the masked sums [loss, ce, entropy, topk_mass, tokens]
(`STAT_NAMES`); `reduce_sums` adds them over micro-batches, data-parallel ranks and the pipeline
so that every rank ends with the global sums of the step.
"""

import math
from functools import partial

import torch
import torch.distributed as dist

from megatron_ntp.training.build import loss_modules
from megatron_ntp.session import local_device

STAT_NAMES = ("loss", "ce", "entropy", "topk_mass", "tokens")


def loss_function(loss_mask, module, output_tensor):
    """megatron-core loss function: per-token loss [b, s] (or the fused head's masked sum [])
    -> (sum, tokens, {"sums": [5]})."""
    mask = loss_mask.float()
    if module.loss_is_summed:  # the fused head weighted by the mask already
        loss_sum = output_tensor.float()
    else:
        loss_sum = (output_tensor.float() * mask).sum()
    stats = module.loss_stats  # left by this micro-batch's forward, [b, s] each
    sums = torch.stack([loss_sum.detach()] + [(stats[name].float() * mask).sum()
                                              for name in ("ce", "entropy", "topk_mass")]
                       + [mask.sum()])
    return loss_sum, mask.sum().to(torch.int), {"sums": sums}


def forward_step(data_iterator, chunk, module, return_schedule_plan=False):
    batch = next(data_iterator)
    # the fused head takes the loss mask, to form its gradients during the forward
    mask = {"loss_mask": batch["loss_mask"]} if module.fused_output_loss else {}
    # parallel.moe_a2a_overlap: megatron-core's combined 1F1B schedule asks for the model's
    # schedule plan, which it runs layer by layer beside another micro-batch's backward
    run = chunk.build_schedule_plan if return_schedule_plan else chunk
    output = run(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                 labels=batch["labels"], **mask)
    return output, partial(loss_function, batch["loss_mask"], module)


def run_schedule(objects, iterators, num_microbatches: int, micro_batch_size: int,
                 seq_length: int, forward_only: bool):
    """Forward (and backward) of all micro-batches; returns this rank's list of reporting dicts
    (empty off the last pipeline stage). `iterators`: one micro-batch iterator per chunk."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = objects.model
    modules = loss_modules(model)
    step_funcs = {id(chunk): partial(forward_step, module=module)
                  for chunk, module in zip(model, modules)}
    # the combined 1F1B schedule (parallel.moe_a2a_overlap) passes the unwrapped model
    step_funcs.update({id(module): partial(forward_step, module=module) for module in modules})

    def dispatch(data_iterator, chunk, return_schedule_plan=False):
        return step_funcs[id(chunk)](data_iterator, chunk,
                                     return_schedule_plan=return_schedule_plan)

    schedule = get_forward_backward_func()
    return schedule(
        forward_step_func=dispatch,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)


def reduce_sums(reports: list) -> torch.Tensor:
    """Global [loss, ce, entropy, topk_mass, tokens] sums of the step, on every rank."""
    from megatron.core import parallel_state

    # on the GPU where there is one: NCCL reduces CUDA tensors only
    sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=local_device())
    for report in reports:
        sums += report["sums"].double()
    if dist.is_initialized():
        # Only the last pipeline stage has reports; TP ranks hold copies (not summed).
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    return sums.cpu()


def per_token_metrics(sums: torch.Tensor) -> dict:
    """Means per loss token from the global sums, plus perplexity = exp(mean ce)."""
    tokens = max(sums[4].item(), 1.0)
    out = {name: sums[i].item() / tokens for i, name in enumerate(STAT_NAMES[:4])}
    out["ppl"] = math.exp(out["ce"])
    out["tokens"] = int(sums[4].item())
    return out


def train_step(objects, iterators, num_microbatches, micro_batch_size, seq_length):
    """One optimizer step; returns (global sums, grad_norm, update_successful)."""
    for chunk in objects.model:
        chunk.zero_grad_buffer()
    objects.optimizer.zero_grad()
    reports = run_schedule(objects, iterators, num_microbatches, micro_batch_size, seq_length,
                           forward_only=False)
    objects.scheduler.step(1)  # the rate of step t is the schedule's value at t + 1
    update_successful, grad_norm, _ = objects.optimizer.step()
    return reduce_sums(reports), grad_norm, update_successful


@torch.no_grad()
def eval_step(objects, iterators, num_microbatches, micro_batch_size, seq_length):
    """Forward-only pass over one global batch; returns the global sums."""
    for chunk in objects.model:
        chunk.eval()
    try:
        reports = run_schedule(objects, iterators, num_microbatches, micro_batch_size,
                               seq_length, forward_only=True)
    finally:
        for chunk in objects.model:
            chunk.train()
    return reduce_sums(reports)
