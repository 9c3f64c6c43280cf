"""Run state (COMPLETE marker, metrics with re-run steps), `sweep submit`'s skip rules and
`sweep collect`'s table, on a planned sweep with hand-written metrics (no Slurm, no training)."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_ntp.sweep.collect import collect
from megatron_ntp.jobs.run_folder import (
    COMPLETE_MARKER,
    is_complete,
    mark_complete,
    read_jsonl_by_step,
)
from megatron_ntp.sweep.plan import plan_sweep, write_sweep
from megatron_ntp.sweep.spec import load_spec
from megatron_ntp.sweep.submit import run_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sweep(tmp_path):
    spec = {"name": "c", "root": "runs",
            "base_config": os.path.join(ROOT, "examples", "configs", "tiny_dense.yaml"),
            "overrides": {"data.blend": "/d/x_text_document", "data.tokenizer_model": "/d/t.model",
                          "data.seq_length": 32, "train.global_batch_tokens": 128,
                          "train.micro_batch_size": 4, "train.lr_warmup_steps": 1,
                          "train.lr_decay_steps": 1},
            "models": {"m": {}}, "settings": ["cross_entropy", "diversity"],
            "budgets": {"tokens": [640]}, "slurm": {"gpus_per_node": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(str(path))
    runs = plan_sweep(loaded)
    write_sweep(loaded, runs)
    return loaded.root, {r.setting: os.path.join(loaded.root, r.name) for r in runs}


def _write(path, records, torn=False):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn:
            f.write('{"step": 9, "ce": 1.')


def test_records_of_re_run_steps_keep_the_last_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1, "ce": 5.0}, {"step": 2, "ce": 4.0}, {"step": 2, "ce": 3.9},
                  {"step": 3, "ce": 3.5}], torn=True)
    assert [(r["step"], r["ce"]) for r in read_jsonl_by_step(str(path))] == \
        [(1, 5.0), (2, 3.9), (3, 3.5)]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl_by_step(str(path))


def test_mark_complete_needs_the_last_step(tmp_path):
    # steps are numbered 1..train.steps: a 4-step run is complete when step 4 is logged
    _write(tmp_path / "metrics.jsonl", [{"step": s} for s in range(1, 5)])
    with pytest.raises(RuntimeError, match="ends at step 4, not at the last step 5"):
        mark_complete(str(tmp_path), steps=5)
    assert not is_complete(str(tmp_path))
    mark_complete(str(tmp_path), steps=4, job_id="17")
    with open(tmp_path / COMPLETE_MARKER) as f:
        assert json.load(f)["job_id"] == "17"


def test_submit_skips_complete_and_queued_runs(sweep):
    root, dirs = sweep
    run_dir = dirs["cross_entropy"]
    name = os.path.basename(run_dir)
    assert run_state(run_dir, name, {}) == ("submit", [])
    with open(os.path.join(run_dir, "slurm_jobs.jsonl"), "w") as f:
        f.write(json.dumps({"job_id": "41", "name": name}) + "\n")
    assert run_state(run_dir, name, {"41": (name, "RUNNING")}) == ("queued", ["41"])
    assert run_state(run_dir, name, {"52": (name, "PENDING")}) == ("queued", ["52"])  # by name
    assert run_state(run_dir, name, {"41x": ("other", "RUNNING")}) == ("submit", [])  # failed
    _write(os.path.join(run_dir, "metrics.jsonl"), [{"step": s} for s in range(1, 6)])
    mark_complete(run_dir, 5)
    assert run_state(run_dir, name, {"41": (name, "COMPLETING")}) == ("complete", [])


def test_sweep_submit_dry_run_prints_the_jobs(sweep):
    root, dirs = sweep
    result = subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "sweep", "submit", root,
                             "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"})
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("NTP_ROOT=")]
    assert len(commands) == 2
    assert all(f"--config {d}/config.yaml" in "".join(commands) for d in dirs.values())
    assert "2 would be submitted, 0 already queued, 0 complete" in result.stdout


def test_collect_table(sweep, tmp_path):
    root, dirs = sweep
    ce_dir, div_dir = dirs["cross_entropy"], dirs["diversity"]
    # a run resumed from iter_0000003: steps 4-5 logged twice; the later records win
    _write(os.path.join(ce_dir, "metrics.jsonl"),
           [{"step": s, "ce": 6.0 - s, "entropy": 7.0 - s, "loss": 6.0 - s} for s in range(1, 6)]
           + [{"step": s, "ce": 5.5 - s, "entropy": 6.0, "loss": 5.5 - s} for s in (4, 5)])
    _write(os.path.join(ce_dir, "valid.jsonl"), [{"step": 5, "ce": 0.7, "entropy": 1.1}])
    mark_complete(ce_dir, 5)
    _write(os.path.join(div_dir, "metrics.jsonl"), [{"step": 1, "ce": 5.0, "entropy": 6.0}])

    path, rows, missing = collect(root, str(tmp_path / "table.csv"))
    assert missing == []
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    by_key = {(r["setting"], int(r["step"])): r for r in table}
    # step 5 is the last of 5 steps: 5 global batches of 128 tokens seen
    last = by_key[("cross_entropy", 5)]
    assert (last["final"], last["complete"], float(last["ce"]), float(last["valid_ce"])) == \
        ("1", "1", 0.5, 0.7)
    assert int(last["tokens_seen"]) == 5 * 128
    assert float(last["flops_seen"]) == pytest.approx(5 * 128 * float(last["flops_per_token"]))
    assert float(by_key[("cross_entropy", 4)]["ce"]) == 1.5
    assert by_key[("cross_entropy", 4)]["valid_ce"] == ""
    first = by_key[("diversity", 1)]
    assert (first["final"], first["complete"], float(first["beta"])) == ("0", "0", 0.5)
    assert int(first["tokens_seen"]) == 128
    assert list(table[0])[:3] == ["run", "model", "setting"]


def test_collect_reads_a_run_folder_numbered_from_zero(sweep, tmp_path):
    """A run logged before steps were numbered from 1 (metrics.jsonl from step 0, validations
    one low) is collected in today's numbering."""
    root, dirs = sweep
    old = dirs["cross_entropy"]
    _write(os.path.join(old, "metrics.jsonl"), [{"step": s, "ce": 5.0 - s} for s in range(5)])
    _write(os.path.join(old, "valid.jsonl"), [{"step": 4, "ce": 0.7}])
    mark_complete(old, 5)  # its last record, step 4 then, is step 5 now

    _, rows, _ = collect(root, str(tmp_path / "table.csv"))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["tokens_seen"] for row in rows] == [128 * s for s in range(1, 6)]
    assert [row["final"] for row in rows] == [0, 0, 0, 0, 1]
    assert rows[-1]["ce"] == 1.0 and rows[-1]["valid_ce"] == 0.7
