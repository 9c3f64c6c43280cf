"""Sweep specs and `megatron-ntp sweep plan`: the grid, budgets, validation, atomic and
idempotent run folders (no Slurm, no training)."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from megatron_ntp.config import ConfigError
from megatron_ntp.models.counting import count_params, flops_per_token
from megatron_ntp.sweep.plan import MANIFEST, plan_sweep, write_sweep
from megatron_ntp.sweep.spec import SpecError, load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "configs", "tiny_dense.yaml")
DATA = {"data.blend": "/data/corpus_text_document", "data.tokenizer_model": "/data/spm.model",
        "data.seq_length": 32, "train.global_batch_tokens": 128, "train.micro_batch_size": 4}


def _write(tmp_path, **fields) -> str:
    spec = {"name": "s", "root": "runs", "base_config": TINY, "overrides": dict(DATA),
            "models": {"a": {"model.num_layers": 1}, "b": {"model.num_layers": 2}},
            "settings": ["cross_entropy", "precision"], "budgets": {"tokens": [12800, 25600]},
            "schedule": {"warmup_fraction": 0.1, "decay_fraction": 0.2},
            "slurm": {"gpus_per_node": 0}}
    spec.update(fields)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_token_budgets_grid(tmp_path):
    spec = load_spec(_write(tmp_path))
    assert spec.root == str(tmp_path / "runs")  # relative to the spec file
    runs = plan_sweep(spec)
    assert len(runs) == 8
    by_name = {r.name: r for r in runs}
    run = by_name["s-b-precision-t2.56e4"]
    assert (run.model, run.setting, run.budget, run.steps, run.tokens) == \
        ("b", "precision", 25600, 200, 25600)
    config = yaml.safe_load(run.config_text)
    assert config["loss"]["beta"] == -0.25 and config["model"]["num_layers"] == 2
    assert config["train"]["steps"] == 200 and config["train"]["token_budget"] == 0
    assert config["train"]["lr_warmup_steps"] == 20 and config["train"]["lr_decay_steps"] == 40
    run_dir = str(tmp_path / "runs" / run.name)
    assert config["logging"]["run_dir"] == run_dir
    assert config["checkpoint"]["save_dir"] == os.path.join(run_dir, "checkpoints")
    assert config["data"]["cache_dir"] == os.path.join(run_dir, "data_cache")
    assert run.flops == run.tokens * run.flops_per_token


def test_flop_budgets_give_each_model_tokens_c_over_flops_per_token(tmp_path):
    spec = load_spec(_write(tmp_path, budgets={"flops": ["1e10"]}))  # YAML reads 1e10 as text
    for run in plan_sweep(spec):
        config = yaml.safe_load(run.config_text)
        from megatron_ntp.config.load import config_from_dict

        model = config_from_dict(config).model
        fpt = flops_per_token(model, 32).model
        assert run.flops_per_token == fpt
        assert run.steps == math.ceil(1e10 / fpt / 128)
        assert 1e10 <= run.flops < 1e10 + 128 * fpt
        assert run.params_non_embedding == count_params(model).active_non_embedding


def test_tokens_per_param(tmp_path):
    spec = load_spec(_write(tmp_path, budgets={"tokens_per_param": [2]}))
    for run in plan_sweep(spec):
        assert run.tokens >= 2 * run.params_active > run.tokens - 128


@pytest.mark.parametrize("fields, message", [
    ({"name": "a b"}, "name must be a word"),
    ({"budgets": {"tokens": [1], "flops": [1]}}, "exactly one of tokens, flops"),
    ({"budgets": {"tokens": [-5]}}, "budgets.tokens values must be positive numbers, got -5"),
    ({"settings": ["precise"]}, "'precise' is not one of the paper's settings"),
    ({"models": ["tiny-dens"]}, "'tiny-dens' is not a preset"),
    ({"slurm": {"launcher": "mpirun"}}, "slurm.launcher='mpirun' must be one of 'torchrun', 'srun'"),
    ({"slurm": {"nodes": 0}}, "slurm.nodes=0 must be >= 1"),
    ({"slurm": {"nodes": "two"}}, "slurm.nodes: expected an integer, got 'two'"),
    ({"slurm": {"gpus": 8}}, "unknown key 'slurm.gpus'; known keys: account"),
    ({"budgets": {"tokens": ["many"]}}, "budgets.tokens[0]: expected a number, got 'many'"),
    ({"schedule": {"warmup_fraction": 1.5}}, "schedule.warmup_fraction must be a fraction"),
    ({"overrides": {"lr": 1}}, "overrides must be a mapping of dotted keys"),
    ({"budget": {}}, "unknown key 'budget' (did you mean 'budgets'?)"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, fields, message):
    path = _write(tmp_path, **fields)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value) and path in str(err.value)


def test_invalid_runs_are_all_reported_before_anything_is_written(tmp_path):
    # 1 step for the small budget: warmup 10 + decay 20 steps of the base config do not fit
    path = _write(tmp_path, schedule={}, budgets={"tokens": [128, 1e6]})
    with pytest.raises(ConfigError) as err:
        plan_sweep(load_spec(path))
    text = str(err.value)
    assert text.count("train.lr_warmup_steps=10 + train.lr_decay_steps=20 exceed the 1 "
                      "training steps") == 4
    assert "run s-a-cross_entropy-t128:" in text
    assert not os.path.exists(tmp_path / "runs")


def test_layout_is_validated_at_the_world_size_of_the_jobs(tmp_path):
    path = _write(tmp_path, slurm={"gpus_per_node": 0, "nproc_per_node": 3},
                  overrides={**DATA, "parallel.tensor": 2})
    with pytest.raises(ConfigError, match="world size 3 must be a multiple of parallel.tensor"):
        plan_sweep(load_spec(path))


def test_write_is_idempotent_and_refuses_to_overwrite_a_different_run(tmp_path):
    spec = load_spec(_write(tmp_path))
    runs = plan_sweep(spec)
    assert len(write_sweep(spec, runs)) == 8
    assert write_sweep(spec, runs) == []  # same configs: nothing new
    with open(tmp_path / "runs" / MANIFEST) as f:
        manifest = json.load(f)
    assert [r["name"] for r in manifest["runs"]] == [r.name for r in runs]
    assert not [p for p in os.listdir(tmp_path / "runs") if p.startswith(".tmp")]

    changed = load_spec(_write(tmp_path, overrides={**DATA, "train.lr": 0.5}))
    with pytest.raises(SpecError, match=r"(?s)already holds a different sweep.*train\.lr: 0\.001 -> 0\.5"):
        write_sweep(changed, plan_sweep(changed))
    fewer = load_spec(_write(tmp_path, budgets={"tokens": [12800]}))
    with pytest.raises(SpecError, match="lists runs this spec does not plan"):
        write_sweep(fewer, plan_sweep(fewer))


def test_cli_dry_run_writes_nothing(tmp_path):
    path = _write(tmp_path)
    result = subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "sweep", "plan", path,
                             "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "s-a-cross_entropy-t1.28e4" in result.stdout and "8 runs (dry run" in result.stdout
    assert not os.path.exists(tmp_path / "runs")
    bad = _write(tmp_path, budgets={"tokens": []})
    result = subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "sweep", "plan", bad],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "budgets.tokens must be a non-empty list" in result.stderr


def test_example_specs_plan(tmp_path):
    for name in os.listdir(os.path.join(ROOT, "examples", "sweeps")):
        spec = load_spec(os.path.join(ROOT, "examples", "sweeps", name), root=str(tmp_path))
        runs = plan_sweep(spec, prepare_data=False)
        assert len(runs) == len(spec.models) * len(spec.settings) * len(spec.budgets)
