"""A tiny GPTModel on gloo: TP = 2 (with and without sequence parallelism, with selective and
full recomputation) gives TP = 1's loss and gradients; per-rank parameter counts match
megatron_ntp.models.counting."""

import torch

from megatron_ntp.config import load_config, validate_config
from tests.compat.distributed import spawn

SEQ, BATCH = 32, 2


def _config(*overrides, world_size=2):
    base = ["model.preset=tiny-dense", f"data.seq_length={SEQ}", "train.steps=1",
            "train.lr_warmup_steps=0", f"train.global_batch_tokens={SEQ * BATCH * 2}",
            f"train.micro_batch_size={BATCH}"]
    return validate_config(load_config(None, base + list(overrides)), world_size=world_size)


def _forward_backward(config, init_method, rank, world_size):
    """(loss, {name: (weight, grad, partitioning)}, parameters on this rank) for one batch on
    the layout of `config`; the parallel state is torn down afterwards."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_ntp.models.gpt import build_gpt_model, transformer_config
    from megatron_ntp.parallel import initialize_parallel_from_config

    initialize_parallel_from_config(config, rank=rank, world_size=world_size,
                                    init_method=init_method)
    # megatron-core's DDP and finalize_model_grads, as training uses them: they all-reduce over
    # TP the grads of replicated parameters computed on a shard (QK-norm weights; the norms
    # under sequence parallelism, tagged by the CPU patch) and average over data parallelism.
    model = DistributedDataParallel(transformer_config(config), DistributedDataParallelConfig(),
                                    build_gpt_model(config))
    generator = torch.Generator().manual_seed(0)  # the same batch on every rank
    tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, config.model.vocab_size, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ)
    model.zero_grad_buffer()
    loss = model(tokens, positions, causal, labels=labels).mean()  # per-token loss [b, s]
    loss.backward()
    finalize_model_grads([model])
    result = {name: (param.detach().clone(), param.main_grad.clone(), _partitioning(param))
              for name, param in model.module.named_parameters()}
    numel = sum(param.numel() for param in model.parameters())
    parallel_state.destroy_model_parallel()  # keep the process group for the next layout
    return loss.item(), result, numel


def _partitioning(param):
    """(dim, stride) of a tensor-parallel parameter, None for a replicated one."""
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, param.partition_stride
    return None


def _shard(full, partitioning, tp_rank, tp):
    """This TP rank's slice of an unsharded tensor, as megatron-core's CPU init slices it."""
    if partitioning is None:
        return full
    dim, stride = partitioning
    pieces = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)
    return torch.cat(pieces[tp_rank::tp], dim=dim)


def _tp_equivalence_rank(rank, world_size, init_method):
    from megatron_ntp.models.counting import params_per_rank

    ref_config = _config("parallel.tensor=1")
    ref_loss, ref, ref_numel = _forward_backward(ref_config, init_method, rank, world_size)
    assert ref_numel == params_per_rank(ref_config.model, ref_config.parallel).total
    for variant in (["parallel.sequence_parallel=false"],
                    ["parallel.sequence_parallel=true"],
                    ["parallel.recompute=selective"],  # recomputation restores RNG states
                    ["parallel.sequence_parallel=true", "parallel.recompute=full"]):
        config = _config("parallel.tensor=2", *variant)
        loss, sharded, numel = _forward_backward(config, init_method, rank, world_size)
        assert numel == params_per_rank(config.model, config.parallel).total, numel
        assert abs(loss - ref_loss) < 1e-5, (variant, loss, ref_loss)
        assert sharded.keys() == ref.keys()
        tp_rank = rank % 2  # TP groups are consecutive ranks
        for name, (param, grad, partitioning) in sharded.items():
            ref_param, ref_grad, _ = ref[name]
            expected_param = _shard(ref_param, partitioning, tp_rank, 2)
            expected_grad = _shard(ref_grad, partitioning, tp_rank, 2)
            assert torch.equal(param, expected_param), f"weights differ: {name}"
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} ({variant}): {m}")


def test_tp2_matches_tp1_loss_and_grads():
    spawn(_tp_equivalence_rank, 2)
