"""Counted parameters per rank equal the numel of megatron-core's built model, on layouts
that exercise every rule of the count: MoE with TP + SP + EP (router and norms replicated,
experts split over EP, vocabulary padded for TP), and tied embeddings under pipeline
parallelism (the last stage holds its own copy). The MoE model also runs forward/backward with
the alltoall dispatcher, which needs the CPU patches for its split sizes."""

import torch

from megatron_ntp.config import load_config, validate_config
from tests.compat.distributed import spawn

SEQ, BATCH = 16, 2


def _check_layout(rank, world_size, init_method, overrides, run_step):
    from megatron.core import parallel_state

    from megatron_ntp.models.counting import params_per_rank
    from megatron_ntp.models.gpt import build_gpt_model
    from megatron_ntp.parallel import initialize_parallel_from_config

    config = validate_config(load_config(None, [
        f"data.seq_length={SEQ}", "train.steps=1", "train.lr_warmup_steps=0",
        f"train.global_batch_tokens={SEQ * BATCH * world_size}",
        f"train.micro_batch_size={BATCH}"] + overrides), world_size=world_size)
    p = config.parallel
    initialize_parallel_from_config(config, rank=rank, world_size=world_size,
                                    init_method=init_method)
    model = build_gpt_model(config)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    counted = params_per_rank(config.model, p, stage)
    built_expert = sum(q.numel() for n, q in model.named_parameters() if "local_experts" in n)
    built = sum(q.numel() for q in model.parameters())
    assert (built, built_expert) == (counted.total, counted.expert), (overrides, stage, built,
                                                                      built_expert, counted)
    if run_step:
        generator = torch.Generator().manual_seed(rank)
        tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ), generator=generator)
        positions = torch.arange(SEQ).expand(BATCH, -1)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1).view(1, 1, SEQ, SEQ)
        loss = model(tokens, positions, causal, labels=tokens).mean()
        loss.backward()
        assert torch.isfinite(loss)
        experts = [q for n, q in model.named_parameters() if "local_experts" in n]
        assert all(q.grad is not None for q in experts)
    parallel_state.destroy_model_parallel()


def _ranks(rank, world_size, init_method):
    _check_layout(rank, world_size, init_method,
                  ["model.preset=tiny-moe", "model.vocab_size=8000", "parallel.tensor=2",
                   "parallel.expert=2", "parallel.sequence_parallel=true",
                   "model.moe_token_dispatcher=alltoall"], run_step=True)
    _check_layout(rank, world_size, init_method,
                  ["model.preset=tiny-dense", "model.tie_embeddings=true", "parallel.pipeline=2"],
                  run_step=False)


def test_counted_params_equal_built_model_per_rank():
    spawn(_ranks, 2)
