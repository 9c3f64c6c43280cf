"""`plan` prints what a GPU run of the config gets, from any machine, and where it departs from
Megatron-LM's H100 recipe (megatron_ntp.models.recipe)."""

import pytest

from megatron_ntp.config import load_config, validate_config
from megatron_ntp.models import gpt
from megatron_ntp.models.counting import memory_per_gpu
from megatron_ntp.models.plan import format_plan
from megatron_ntp.models.recipe import NVLINK_DOMAIN_GPUS, recipe_departures
from tests.training.test_gpu_settings import fake_gpu  # noqa: F401 (a fixture)

H100_EXAMPLES = ("examples/configs/dense_4b.yaml", "examples/configs/moe_20b_a1b.yaml")
GIB = 2**30


def config_of(path, *overrides):
    return validate_config(load_config(path, list(overrides), cuda_available=False))


def plan_of(path, *overrides):
    return format_plan(config_of(path, *overrides))


def line_of(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_plan_prints_the_gpu_settings():
    text = plan_of("examples/configs/dense_4b.yaml", "model.fp8=hybrid",
                   "parallel.distributed_timeout_minutes=45")
    fusions = line_of(text, "on GPU")
    for name in ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"):
        assert name in fusions
    assert "moe_" not in fusions  # dense: neither the permute nor the router fusion
    assert ("overlap: overlap_grad_reduce, overlap_param_gather; gradients reduced in bf16; "
            "recompute_modules: []; distributed timeout 45 min") in text
    assert "fp8: hybrid, delayed scaling, amax history 1024 (max), fp8_param on" in text


def test_plan_prints_the_expert_overlap():
    text = plan_of("examples/configs/moe_20b_a1b.yaml")
    assert ("overlap: overlap_grad_reduce, overlap_param_gather, "
            "overlap_moe_expert_parallel_comm, delay_wgrad_compute;") in text
    assert "moe_router_fusion with TE >= 2.7" in line_of(text, "on GPU")


def test_plan_prints_switched_off_settings():
    text = plan_of("examples/configs/moe_20b_a1b.yaml", "model.kernel_fusions=false",
                   "parallel.overlap_grad_reduce=false", "parallel.distributed_optimizer=false",
                   "parallel.moe_a2a_overlap=false", "model.transformer_impl=local")
    assert "on GPU       fusions: none\n" in text
    assert "overlap: none; gradients reduced in bf16; recompute_modules: ['core_attn']" in text
    assert not any(line.startswith("             fp8:") for line in text.splitlines())


def test_one_gpu_is_singular():
    layout = line_of(plan_of("examples/configs/tiny_dense.yaml"), "layout")
    assert "= 1 GPU;" in layout and "GPUs" not in layout
    assert "= 256 GPUs;" in line_of(plan_of(H100_EXAMPLES[0]), "layout")


@pytest.mark.parametrize("path", H100_EXAMPLES)
def test_h100_examples_fit_80_gb_with_ep_x_tp_within_a_node(path):
    """The acceptance of the layouts: every stage within 80 GB (plan's estimate plus its 20%
    margin), dense at TP 1, EP x TP at most one node's 8 GPUs, and no recipe departure in
    layout, numerics or communication overlap beyond the stated ones."""
    config = config_of(path)
    p, t = config.parallel, config.train
    stages = memory_per_gpu(config.model, p, t.micro_batch_size, config.data.seq_length)
    assert all(1.2 * s.total < 80e9 for s in stages), [s.total / GIB for s in stages]
    assert p.tensor == 1
    if config.model.num_experts:
        assert p.expert * p.tensor <= NVLINK_DOMAIN_GPUS and p.moe_a2a_overlap
        assert f"EP 8 x TP 1 = 8 (within one {NVLINK_DOMAIN_GPUS}-GPU node)" in plan_of(path)
    differing = {d.setting for d in recipe_departures(config)}
    assert differing <= {"fp8", "cross_entropy_loss_fusion", "manual_gc",
                         "gradient_accumulation_fusion", "moe_router_fusion"}, differing


def test_every_departure_is_printed_with_its_reason():
    config = config_of("examples/configs/moe_20b_a1b.yaml", "parallel.expert=16",
                       "parallel.grad_reduce_in_bf16=false", "parallel.moe_a2a_overlap=false",
                       "model.fp8=hybrid", "model.fp8_recipe=delayed")
    departures = {d.setting: d for d in recipe_departures(config)}
    assert departures["EP x TP"].ours == "16 x 1 = 16"
    assert "crosses nodes" in departures["EP x TP"].reason
    assert departures["grad_reduce_in_bf16"].recipe == "on"
    assert "blockwise on Hopper" in departures["fp8_recipe"].reason
    assert "all-to-all is exposed" in departures[
        "overlap_moe_expert_parallel_comm + delay_wgrad_compute"].reason
    assert "fp8" not in departures  # on, with another recipe
    text = format_plan(config)
    assert f"vs recipe    {len(departures)} settings differ" in text
    for d in departures.values():
        assert f"{d.setting}: {d.ours} (recipe: {d.recipe}): {d.reason}" in text


def test_cpu_defaults_are_departures_with_their_reason():
    departures = {d.setting: d for d in recipe_departures(config_of(None, "model.preset=dense-1b"))}
    for setting in ("transformer_impl", "bf16", "use_distributed_optimizer"):
        assert "default without CUDA" in departures[setting].reason, setting
    assert "grad_reduce_in_bf16" not in departures  # fp32 model: nothing to reduce in bf16
    tp2 = {d.setting for d in recipe_departures(config_of(
        None, "model.preset=dense-1b", "parallel.tensor=2"))}
    assert {"tensor_model_parallel_size", "sequence_parallel", "tp_comm_overlap"} <= tp2


def test_the_moe_example_builds_megatron_cores_overlap(fake_gpu):  # noqa: F811
    mcore = gpt.transformer_config(config_of(H100_EXAMPLES[1]))
    assert mcore.overlap_moe_expert_parallel_comm and mcore.delay_wgrad_compute
    assert not gpt.transformer_config(config_of(H100_EXAMPLES[0])).overlap_moe_expert_parallel_comm
