"""A sweep of tiny models end to end on a real local Slurm: 2 sizes x 2 loss settings x 2 FLOP
budgets through `megatron-ntp sweep plan`, `submit` (twice more: nothing is submitted again),
`collect` and `fit`."""

import csv
import json
import os
import subprocess

import numpy as np
import pytest
import yaml

from tests.slurm.harness import CLI, ROOT, tiny_overrides

pytestmark = pytest.mark.slurm

BUDGETS = [1.0e9, 2.0e9]  # FLOPs: 9 to 60 steps of 128 tokens for these sizes


def _cli(*args, check=True):
    result = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _spec(tmp_path, data) -> str:
    base = tiny_overrides(*data)
    small = {k: base.pop(k) for k in list(base) if k.startswith("model.")}
    spec = {
        "name": "tiny",
        "root": str(tmp_path / "sweep"),
        "base_config": os.path.join(ROOT, "examples", "configs", "tiny_dense.yaml"),
        "overrides": {**base, "train.eval_interval": 5, "train.eval_steps": 2,
                      "checkpoint.save_interval": 1000},
        "models": {
            "small": small,
            "large": {**small, "model.num_layers": 2, "model.hidden_size": 64,
                      "model.num_attention_heads": 4, "model.num_query_groups": 2,
                      "model.ffn_hidden_size": 128},
        },
        "settings": ["cross_entropy", "precision"],
        "budgets": {"flops": BUDGETS},
        "schedule": {"warmup_fraction": 0.1, "decay_fraction": 0.2},
        # one-CPU jobs that share the node: --oversubscribe overrides the batch script's
        # --exclusive (as --mem its --mem=0), so two run at once on two cores
        "slurm": {"gpus_per_node": 0, "nproc_per_node": 1,
                  "sbatch_args": ["--cpus-per-task=1", "--mem=1500", "--oversubscribe"],
                  "env": {"OMP_NUM_THREADS": 1}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_plan_submit_collect_fit(slurm, tiny_data, tmp_path):
    spec = _spec(tmp_path, tiny_data)
    root = str(tmp_path / "sweep")

    out = _cli("sweep", "plan", spec).stdout
    assert "8 runs" in out and "8 new" in out
    with open(os.path.join(root, "sweep_manifest.json")) as f:
        manifest = json.load(f)
    runs = manifest["runs"]
    assert len(runs) == 8
    assert {(r["model"], r["setting"], r["budget"]) for r in runs} == {
        (m, s, b) for m in ("small", "large") for s in ("cross_entropy", "precision")
        for b in BUDGETS}
    for r in runs:
        with open(os.path.join(root, r["dir"], "config.yaml")) as f:
            config = yaml.safe_load(f)
        assert config["train"]["steps"] == r["steps"]
        assert config["loss"]["beta"] == (-0.25 if r["setting"] == "precision" else 0.0)
        # a FLOP budget: steps x tokens x FLOPs/token within one step of the budget
        assert abs(r["flops"] - r["budget"]) <= r["global_batch_tokens"] * r["flops_per_token"]

    first = _cli("sweep", "submit", root).stdout
    assert first.count("submitted job") == 8
    second = _cli("sweep", "submit", root).stdout  # everything pending or running
    assert "0 submitted, 8 already queued" in second, second

    job_ids = []
    for r in runs:
        with open(os.path.join(root, r["dir"], "slurm_jobs.jsonl")) as f:
            job_ids += [json.loads(line)["job_id"] for line in f]
    assert len(job_ids) == 8
    finished = slurm.wait_finished(job_ids, timeout=900)
    failed = {j: f["JobState"] for j, f in finished.items() if f["JobState"] != "COMPLETED"}
    assert not failed, failed
    third = _cli("sweep", "submit", root).stdout
    assert "0 submitted, 0 already queued, 8 complete" in third, third

    out = _cli("sweep", "collect", root).stdout
    assert "(8 complete)" in out
    with open(os.path.join(root, "sweep_metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["final"]) for r in rows) == 8
    assert len(rows) == sum(r["steps"] for r in runs)
    for row in rows:
        assert float(row["flops_seen"]) == pytest.approx(
            float(row["tokens_seen"]) * float(row["flops_per_token"]))
        assert float(row["tokens_seen"]) == int(row["step"]) * 128  # steps 1..train.steps
    finals = [r for r in rows if r["final"] == "1"]
    assert all(r["valid_ce"] != "" and r["valid_entropy"] != "" for r in finals)
    for r in rows:  # each run trained with its setting: the surrogate loss is ce only at beta=0
        if r["setting"] == "cross_entropy":
            assert float(r["loss"]) == pytest.approx(float(r["ce"]), rel=1e-5)
        else:
            assert float(r["beta"]) == -0.25 and abs(float(r["loss"]) - float(r["ce"])) > 1e-4

    result = _cli("sweep", "fit", root, "--points", "curve", "--bootstrap", "10")
    out = result.stdout
    assert "cross_entropy" in out and "precision" in out and "alpha" in out
    fit_dir = os.path.join(root, "fit")
    with open(os.path.join(fit_dir, "fits.json")) as f:
        fits = json.load(f)
    assert fits["metric"] == "valid_ce"
    for setting in ("cross_entropy", "precision"):
        entry = fits["settings"][setting]
        assert entry["fit"] is not None and entry["points"] >= 5
        # the fitted law reproduces the runs' final validation losses
        law = entry["fit"]
        for r in (r for r in finals if r["setting"] == setting):
            predicted = (law["E"] + law["A"] / float(r["params_non_embedding"]) ** law["alpha"]
                         + law["B"] / float(r["tokens_seen"]) ** law["b"])
            assert predicted == pytest.approx(float(r["valid_ce"]), rel=0.05)
        assert np.all(np.isfinite([law[p] for p in ("E", "A", "alpha", "B", "b")]))
    for name in ("loss_vs_compute.png", "entropy_vs_compute.png", "isoflop.png"):
        with open(os.path.join(fit_dir, name), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
