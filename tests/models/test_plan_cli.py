"""`megatron-ntp plan` and `megatron-ntp presets`, run as the user runs them (subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ntp.models.counting import count_params
from megatron_ntp.models.plan import billions
from megatron_ntp.models.presets import PRESETS, preset_model_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


def cli(*args, env=None):
    """Run the console entry point (the module, in case the venv's script is not installed)."""
    return subprocess.run([sys.executable, "-m", "megatron_ntp.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_plan_prints_params_flops_and_memory():
    result = cli("plan", "--config", "examples/configs/dense_4b.yaml", "parallel.data=128",
                 "loss.beta=0.5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    counts = count_params(preset_model_config("dense-4b"))
    assert f"total {billions(counts.total)}" in out and f"active {billions(counts.active)}" in out
    assert "loss         shaped: beta=0.5 topk=0" in out
    assert "FLOPs/token" in out and "TP 1 x PP 1 x DP 128 = 128 GPUs" in out
    header = next(line for line in out.splitlines() if "optimizer" in line and "stage" in line)
    assert header.split() == ["stage", "params/GPU", "weights", "grads", "optimizer",
                              "activations", "total"]
    row = out.splitlines()[out.splitlines().index(header) + 1].split()
    weights, grads, optimizer, activations, total = map(float, row[2:])
    assert total == pytest.approx(weights + grads + optimizer + activations, abs=0.02)
    assert grads == pytest.approx(weights, abs=0.01)  # bf16 grads (parallel.grad_reduce_in_bf16)
    fp32_grads = cli("plan", "--config", "examples/configs/dense_4b.yaml",
                     "parallel.grad_reduce_in_bf16=false").stdout.splitlines()[-1].split()
    assert float(fp32_grads[3]) == pytest.approx(2 * float(fp32_grads[2]), abs=0.01)


def test_plan_pipeline_stages_and_world_size_from_env():
    # with its all-to-all overlap, a pipelined MoE layout needs virtual stages
    result = cli("plan", "--config", "examples/configs/moe_20b_a1b.yaml", "parallel.pipeline=4",
                 "parallel.virtual_pipeline=2", env={"WORLD_SIZE": "512"})
    assert result.returncode == 0, result.stderr
    assert "DP 128" in result.stdout
    rows = [line.split()[0] for line in result.stdout.splitlines()[-4:]]
    assert rows == ["0", "1", "2", "3"]


def test_plan_rejects_bad_config_naming_field_and_value():
    result = cli("plan", "--config", "examples/configs/dense_1b.yaml", "parallel.tensor=5")
    assert result.returncode == 2
    assert "parallel.tensor=5" in result.stderr and "model.num_attention_heads=16" in result.stderr
    result = cli("plan", "model.preset=tiny-dense", "parallel.tensr=2")
    assert result.returncode == 2 and "parallel.tensor" in result.stderr


def test_plan_help_lists_config_fields():
    result = cli("plan", "--help")
    assert result.returncode == 0
    assert "loss.beta (float, default 0.0)" in result.stdout
    assert "parallel.sequence_parallel" in result.stdout


def test_presets_table_and_every_example_config_plans():
    result = cli("presets")
    assert result.returncode == 0
    for name in PRESETS:
        counts = count_params(preset_model_config(name))
        assert f"| {name} |" in result.stdout and billions(counts.total) in result.stdout
    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.models.plan import format_plan
    assert CONFIGS, "examples/configs/*.yaml missing"
    for path in CONFIGS:
        config = validate_config(load_config(path), world_size=None)
        assert "per-GPU memory" in format_plan(config), path
