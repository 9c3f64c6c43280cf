"""The settings a GPU run gets, checked on CPU with CUDA faked where the builders branch on it:
the TransformerConfig, DDP config and optimizer config built for the H100 example configs carry
Megatron-LM's H100 settings (kernel fusions, overlapped data-parallel communication, FP8 amax
history and FP8 weights, recompute modules, NaN check), and a CPU run gets none of the GPU-only
ones (its losses are checked against the single-rank run in test_layouts.py)."""

import types

import pytest
import torch

from megatron_ntp.config import load_config, validate_config
from megatron_ntp.models import gpt
from megatron_ntp.training import build

H100_EXAMPLES = ("examples/configs/dense_4b.yaml", "examples/configs/moe_20b_a1b.yaml")


def example(path, *overrides):
    return validate_config(load_config(path, list(overrides)))


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA reported available, and the Transformer Engine kernels that megatron-core's
    TransformerConfig checks for (fused RoPE, fused MoE permutation) present as stand-ins; the
    configs are only built, never run."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.moe import moe_utils

    def kernel(*args, **kwargs):
        raise AssertionError("a faked kernel was called")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", kernel)
    for name in ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                 "fused_sort_chunks_by_index_with_probs", "fused_unpermute"):
        monkeypatch.setattr(moe_utils, name, kernel)
    monkeypatch.setattr(gpt, "te_version_at_least", lambda version: True)
    monkeypatch.setattr(gpt, "kernel_installed", lambda module: True)  # Apex's kernels


@pytest.mark.parametrize("path", H100_EXAMPLES)
def test_transformer_config_of_the_h100_examples_has_the_fusions(fake_gpu, path):
    config = example(path)
    mcore = gpt.transformer_config(config)
    assert mcore.bias_activation_fusion and mcore.masked_softmax_fusion
    assert mcore.bias_dropout_fusion and mcore.apply_rope_fusion
    assert mcore.gradient_accumulation_fusion
    assert not mcore.use_cpu_initialization
    # recompute: selective in both examples; TE's fused attention needs no core_attn recompute
    assert mcore.recompute_granularity == "selective" and mcore.recompute_modules == []
    if config.model.num_experts:
        assert mcore.moe_grouped_gemm and mcore.moe_permute_fusion and mcore.moe_router_fusion
    else:
        assert not mcore.moe_permute_fusion


def test_fp8_settings_of_the_dense_example(fake_gpu):
    mcore = gpt.transformer_config(example(H100_EXAMPLES[0], "model.fp8=hybrid"))
    assert (mcore.fp8, mcore.fp8_recipe) == ("hybrid", "delayed")
    assert (mcore.fp8_amax_history_len, mcore.fp8_amax_compute_algo) == (1024, "max")
    assert mcore.fp8_param  # all-gathered in FP8 by the distributed optimizer
    mcore = gpt.transformer_config(example(H100_EXAMPLES[0], "model.fp8=hybrid",
                                           "parallel.distributed_optimizer=false"))
    assert not mcore.fp8_param


def test_switches_turn_the_gpu_settings_off(fake_gpu, monkeypatch):
    monkeypatch.setattr(gpt, "kernel_installed", lambda module: False)  # no Apex
    config = example(H100_EXAMPLES[1], "model.kernel_fusions=false",
                     "parallel.recompute_modules=[core_attn]")
    mcore = gpt.transformer_config(config)
    assert not (mcore.bias_activation_fusion or mcore.apply_rope_fusion
                or mcore.moe_permute_fusion or mcore.gradient_accumulation_fusion)
    assert mcore.recompute_modules == ["core_attn"]
    mcore = gpt.transformer_config(example(H100_EXAMPLES[0]))
    assert not (mcore.gradient_accumulation_fusion or mcore.masked_softmax_fusion)  # no Apex
    assert mcore.bias_activation_fusion and mcore.apply_rope_fusion


@pytest.mark.parametrize("path", H100_EXAMPLES)
def test_ddp_and_optimizer_configs_of_the_h100_examples_overlap(fake_gpu, path):
    config = example(path)
    ddp = build.ddp_config(config)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.use_distributed_optimizer
    assert ddp.check_for_nan_in_grad
    assert not ddp.grad_reduce_in_fp32  # parallel.grad_reduce_in_bf16, as Megatron-LM's example
    assert build.ddp_config(example(path, "parallel.grad_reduce_in_bf16=false")).grad_reduce_in_fp32
    assert not ddp.align_param_gather  # no interleaved pipeline
    optimizer = build.optimizer_config(config, ddp)
    assert optimizer.overlap_param_gather and optimizer.use_distributed_optimizer
    assert optimizer.bf16 and optimizer.params_dtype == torch.bfloat16
    interleaved = example(path, "parallel.pipeline=2", "parallel.virtual_pipeline=2")
    assert build.ddp_config(interleaved).align_param_gather
    no_dist_opt = build.ddp_config(example(path, "parallel.distributed_optimizer=false"))
    assert no_dist_opt.overlap_grad_reduce and not no_dist_opt.overlap_param_gather


def test_cpu_gets_no_gpu_only_settings():
    config = example(H100_EXAMPLES[1], "model.transformer_impl=local",
                     "parallel.moe_a2a_overlap=false")  # the overlap needs TE layers
    mcore = gpt.transformer_config(config)
    assert mcore.use_cpu_initialization
    assert not (mcore.bias_activation_fusion or mcore.masked_softmax_fusion
                or mcore.apply_rope_fusion or mcore.moe_permute_fusion
                or mcore.gradient_accumulation_fusion)
    assert mcore.recompute_modules == ["core_attn"]  # local attention keeps its [s, s] scores
    ddp = build.ddp_config(config)
    assert not (ddp.overlap_grad_reduce or ddp.overlap_param_gather)
    assert ddp.check_for_nan_in_grad


def test_schedules_get_the_ddp_sync_functions(fake_gpu):
    """With overlapped gradient reduction the schedules must defer it to the last micro-batch
    (no_sync) and start it per chunk; with aligned all-gathers they start those too."""
    def chunk(ddp):
        return types.SimpleNamespace(ddp_config=ddp, no_sync=object(), start_grad_sync=object(),
                                     start_param_sync=object())

    config = example(H100_EXAMPLES[0], "parallel.pipeline=2", "parallel.virtual_pipeline=2")
    chunks = [chunk(build.ddp_config(config)) for _ in range(2)]
    mcore = types.SimpleNamespace(no_sync_func=None, grad_sync_func=None, param_sync_func=None)
    build.set_sync_functions(chunks, mcore)
    assert mcore.no_sync_func == [c.no_sync for c in chunks]
    assert mcore.grad_sync_func == [c.start_grad_sync for c in chunks]
    assert mcore.param_sync_func == [c.start_param_sync for c in chunks]
    single = [chunk(build.ddp_config(example(H100_EXAMPLES[0])))]
    mcore = types.SimpleNamespace(no_sync_func=None, grad_sync_func=None, param_sync_func=None)
    build.set_sync_functions(single, mcore)
    assert mcore.no_sync_func is single[0].no_sync and mcore.param_sync_func is None


def test_recompute_modules_validated():
    from megatron_ntp.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.recompute_modules\[0\]='core_attention' "
                                          r"must be one of 'core_attn', 'mlp'"):
        example(None, "parallel.recompute_modules=[core_attention, moe]")
    with pytest.raises(ConfigError) as err:
        example(None, "parallel.recompute_modules=[core_attn, moe]")
    text = str(err.value)
    assert "needs parallel.recompute='selective'" in text
    assert "['moe'] need an MoE model" in text
    with pytest.raises(ConfigError, match="parallel.distributed_timeout_minutes=0 must be"):
        example(None, "parallel.distributed_timeout_minutes=0")
    with pytest.raises(ConfigError, match="model.fp8_amax_compute_algo='mean'"):
        example(None, "model.fp8_amax_compute_algo=mean")


def test_no_dataloader_attention_mask_under_transformer_engine():
    from megatron_ntp.training.data import micro_batches, uses_attention_mask

    seq = 8
    sample = {"tokens": torch.arange(seq), "labels": torch.arange(seq),
              "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq),
              "attention_mask": torch.ones(1, seq, seq, dtype=torch.bool).triu(1)}
    dataset = [sample] * 4
    te = example(H100_EXAMPLES[0])
    (batch,) = micro_batches(dataset, 0, 1, 4, uses_attention_mask(te))
    assert "attention_mask" not in batch and batch["tokens"].shape == (4, seq)
    local = example(H100_EXAMPLES[0], "model.transformer_impl=local")
    (batch,) = micro_batches(dataset, 0, 1, 4, uses_attention_mask(local))
    assert batch["attention_mask"].shape == (4, 1, seq, seq)
