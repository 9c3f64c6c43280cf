"""`plan` prints what a GPU run of the config gets, from any machine."""

from megatron_ntp.config import load_config, validate_config
from megatron_ntp.models.plan import format_plan


def plan_of(path, *overrides):
    return format_plan(validate_config(load_config(path, list(overrides))))


def test_plan_prints_the_gpu_settings():
    text = plan_of("examples/configs/dense_4b.yaml", "model.fp8=hybrid",
                   "parallel.distributed_timeout_minutes=45")
    fusions = next(line for line in text.splitlines() if line.startswith("on GPU"))
    for name in ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"):
        assert name in fusions
    assert "moe_permute_fusion" not in fusions  # dense
    assert ("overlap: overlap_grad_reduce, overlap_param_gather; recompute_modules: []; "
            "distributed timeout 45 min") in text
    assert "fp8: amax history 1024 (max), fp8_param on" in text


def test_plan_prints_switched_off_settings():
    text = plan_of("examples/configs/moe_20b_a1b.yaml", "model.kernel_fusions=false",
                   "parallel.overlap_grad_reduce=false", "parallel.distributed_optimizer=false",
                   "model.transformer_impl=local")
    assert "on GPU       fusions: none\n" in text
    assert "overlap: none; recompute_modules: ['core_attn']" in text
    assert "fp8:" not in text
