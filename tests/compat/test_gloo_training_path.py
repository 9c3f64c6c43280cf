"""The rest of megatron-core's training path on gloo, through the CPU patches:

- uneven all-gather / reduce-scatter along the first dimension (alltoall dispatcher with
  expert-TP > 1), against the same collectives computed by hand;
- the no-pipelining schedule (hard-coded device="cuda"), DDP, and the bf16 distributed
  optimizer with gradient clipping (asserts on 'torch.cuda.*Tensor' type names), whose reported
  gradient norm must equal the norm of the gradients it was given.
"""

import torch

from megatron_ntp.config import load_config, validate_config
from tests.compat.distributed import spawn

SEQ, BATCH = 16, 2


def _uneven_collectives(rank):
    from megatron.core.tensor_parallel import mappings

    group = torch.distributed.group.WORLD
    splits = [2, 3]  # rank 0 holds 2 rows, rank 1 holds 3
    mine = torch.arange(splits[rank] * 4, dtype=torch.float32).view(-1, 4) + 100 * rank
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=splits)
    expected = torch.cat([torch.arange(n * 4, dtype=torch.float32).view(-1, 4) + 100 * r
                          for r, n in enumerate(splits)])
    assert torch.equal(gathered, expected)
    full = torch.arange(5 * 4, dtype=torch.float32).view(5, 4) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=splits)
    total = torch.arange(5 * 4, dtype=torch.float32).view(5, 4) * 3  # (1 + 2) * x
    assert torch.equal(scattered, torch.split(total, splits)[rank])


def _optimizer_step(rank, world_size, init_method):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ntp.models.gpt import build_gpt_model, transformer_config
    from megatron_ntp.parallel import destroy_parallel, initialize_parallel_from_config

    config = validate_config(load_config(None, [
        "model.preset=tiny-dense", "model.bf16=true", f"data.seq_length={SEQ}",
        "train.steps=1", "train.lr_warmup_steps=0", "parallel.distributed_optimizer=true",
        f"train.global_batch_tokens={SEQ * BATCH * world_size}", f"train.micro_batch_size={BATCH}",
    ]), world_size=world_size)
    initialize_parallel_from_config(config, rank=rank, world_size=world_size,
                                    init_method=init_method)
    _uneven_collectives(rank)

    tconfig = transformer_config(config)
    model = DistributedDataParallel(
        tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=True),
        build_gpt_model(config))
    local_grads = []

    def finalize_and_record(*args, **kwargs):
        # Before the data-parallel reduction each rank's main_grad holds its own batch's grads.
        local_grads.extend(p.main_grad.detach().clone() for p in model.module.parameters())
        return finalize_model_grads(*args, **kwargs)

    tconfig.finalize_model_grads_func = finalize_and_record
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, clip_grad=1e-3,
                        use_distributed_optimizer=True), [model])

    generator = torch.Generator().manual_seed(rank)  # a different batch per data-parallel rank
    tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ)

    def forward_step(_, chunk):
        per_token = chunk(tokens[:, :-1], positions, causal, labels=tokens[:, 1:])
        return per_token, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    model.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
    assert local_grads, "the schedule did not call finalize_model_grads"
    mean_grads = torch.cat([g.flatten() for g in local_grads])
    torch.distributed.all_reduce(mean_grads)
    expected_norm = (mean_grads / world_size).norm().item()
    before = [p.detach().float().clone() for p in model.module.parameters()]
    ok, grad_norm, _ = optimizer.step()
    assert ok and abs(grad_norm - expected_norm) <= 1e-4 * expected_norm, (grad_norm, expected_norm)
    after = list(model.module.parameters())
    assert all(not torch.equal(b, a.float()) for b, a in zip(before, after)), "a param did not move"
    destroy_parallel()


def test_uneven_collectives_schedule_ddp_and_distributed_optimizer():
    spawn(_optimizer_step, 2)
