"""Model chunks, DDP, optimizer and learning-rate schedule for one rank (megatron-core's own).

- One ShapedLossGPTModel per virtual pipeline chunk, sharing one TransformerConfig (the
  schedules read it from the first chunk). calculate_per_token_loss is on: the loss function
  returns (sum of masked per-token losses, token count) and finalize_model_grads divides the
  gradients once by the global token count (all micro-batches, all data-parallel ranks).
- Each chunk is on this rank's device before anything wraps it (build_gpt_model moves it).
- bf16: Float16Module around each chunk (fp32 master weights in the optimizer), as
  Megatron-LM does; gradients reduced in fp32, or in bf16 with parallel.grad_reduce_in_bf16.
- On a GPU, Megatron-LM's H100 data-parallel settings: gradient reduction overlapped with the
  backward pass and, with the distributed optimizer, the parameter all-gather overlapped with
  the next forward (parallel.overlap_grad_reduce / overlap_param_gather); NaN/Inf gradients
  stop the step on every rank (megatron-core's check_for_nan_in_grad).
- AdamW (megatron-core's "adam" is torch AdamW or a fused equivalent: decoupled weight decay),
  no weight decay on norms and biases, gradient clipping; optionally the distributed optimizer.
- Warmup-stable-decay through OptimizerParamScheduler's WSD style.
"""

from dataclasses import dataclass

import torch

from megatron_ntp.models.gpt import build_gpt_model, transformer_config
from megatron_ntp.models.shaped_gpt import ShapedLossGPTModel
from megatron_ntp.parallel import overlap_settings


@dataclass
class TrainingObjects:
    model: list  # DDP-wrapped model chunks (one per virtual pipeline stage)
    optimizer: object  # megatron-core MegatronOptimizer
    scheduler: object  # OptimizerParamScheduler
    mcore_config: object  # the shared TransformerConfig


def build_model_chunks(config) -> tuple[list, object]:
    """Unwrapped ShapedLossGPTModel chunks of this rank and their shared TransformerConfig."""
    from megatron.core.distributed import finalize_model_grads

    mcore_config = transformer_config(config, calculate_per_token_loss=True)
    mcore_config.finalize_model_grads_func = finalize_model_grads
    chunks = config.parallel.virtual_pipeline
    model = []
    for vp_stage in range(chunks):
        model.append(build_gpt_model(
            config, vp_stage=vp_stage if chunks > 1 else None, model_class=ShapedLossGPTModel,
            mcore_config=mcore_config, loss_config=config.loss_at(0),
            fused_output_loss=config.model.fused_output_loss,
            fused_chunk_bytes=(config.model.fused_output_chunk_mib << 20) or None))
    return model, mcore_config


def ddp_config(config):
    """megatron-core DistributedDataParallelConfig of the run: the gradient buffer and its
    reduction in fp32, or in bf16 with parallel.grad_reduce_in_bf16 (as Megatron-LM's H100 FP8
    example runs); NaN check, and on a GPU the overlapped communication of parallel.overlap_*."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=not config.parallel.grad_reduce_in_bf16,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
        **overlap_settings(config))


def wrap_ddp(config, model: list, mcore_config) -> list:
    """Float16Module (bf16) and megatron-core DDP around each chunk."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    if config.model.bf16:
        model = [Float16Module(mcore_config, chunk) for chunk in model]
    settings = ddp_config(config)
    return [DistributedDataParallel(mcore_config, settings, chunk,
                                    # Megatron-LM buckets only the first chunk's gradients.
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(model)]


def optimizer_config(config, settings):
    """megatron-core OptimizerConfig: AdamW of the train section; `settings` is the DDP config,
    whose overlap_param_gather the optimizer must agree with."""
    from megatron.core.optimizer import OptimizerConfig

    t = config.train
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=config.model.bf16,
        params_dtype=torch.bfloat16 if config.model.bf16 else torch.float32,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
        overlap_param_gather=settings.overlap_param_gather)


def build_optimizer(config, model: list):
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(optimizer_config(config, model[0].ddp_config), model)


def set_sync_functions(model: list, mcore_config) -> None:
    """Hand the DDP chunks' communication hooks to the pipeline schedules, as Megatron-LM's
    training loop does: with overlapped gradient reduction the schedules must hold the
    reduction back until the last micro-batch (no_sync) and start it per chunk
    (start_grad_sync); aligned parameter all-gathers are started by the schedules too."""
    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    settings = model[0].ddp_config
    if settings.overlap_grad_reduce:
        mcore_config.no_sync_func = one_or_list([chunk.no_sync for chunk in model])
        mcore_config.grad_sync_func = one_or_list([chunk.start_grad_sync for chunk in model])
    if settings.overlap_param_gather and settings.align_param_gather:
        mcore_config.param_sync_func = one_or_list([chunk.start_param_sync for chunk in model])


def force_param_sync(objects) -> None:
    """Finish the parameter all-gather of the last optimizer step now (with
    overlap_param_gather it otherwise completes inside the next forward): before a checkpoint
    is saved or validation runs, as Megatron-LM does. No-op without the overlap."""
    if not objects.model[0].ddp_config.overlap_param_gather:
        return
    objects.optimizer.prepare_model_params_for_param_sync()
    for chunk in objects.model:
        chunk.start_param_sync(force_sync=True)


def build_scheduler(config, optimizer):
    """Warmup (linear from 0) -> stable at train.lr -> decay to train.min_lr over the last
    train.lr_decay_steps steps. The trainer advances it before each optimizer step, so step t
    (0-based) uses the rate at t + 1: no step runs at lr 0 and the last one ends the decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = config.train
    total = max(t.steps, t.lr_warmup_steps + 1)  # the scheduler wants warmup < total
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps, lr_decay_steps=total, lr_decay_style="WSD",
        wsd_decay_steps=t.lr_decay_steps, lr_wsd_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=total,
        wd_incr_style="constant")


def build_training_objects(config) -> TrainingObjects:
    model, mcore_config = build_model_chunks(config)
    model = wrap_ddp(config, model, mcore_config)
    set_sync_functions(model, mcore_config)
    optimizer = build_optimizer(config, model)
    return TrainingObjects(model, optimizer, build_scheduler(config, optimizer), mcore_config)


def loss_modules(model: list) -> list:
    """The ShapedLossGPTModel inside each (wrapped) chunk."""
    out = []
    for chunk in model:
        while not isinstance(chunk, ShapedLossGPTModel):
            chunk = chunk.module
        out.append(chunk)
    return out
