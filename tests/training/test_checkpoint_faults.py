"""Damaged checkpoints: detected against the manifest, named, skipped on resume.

The fault matrix runs in one spawned rank (tests/training/checkpoint_runs.py fault_matrix): an
uninterrupted run with checkpoints at steps 2, 4 and 6, then, for each fault, a copy of its
state after step 4 with the latest checkpoint or the tracker damaged, resumed by the same
command; each resumed run must end with the uninterrupted run's per-step losses. The TP=2
scenario runs under torchrun as a user would. SIGKILL during the rename is in test_checkpoint.py
(it reuses that module's reference run).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.training.checkpoint_runs import fault_matrix, verify_on_every_rank
from tests.training.test_checkpoint import (
    ENV,
    HANG,
    ROOT,
    assert_same,
    base,  # noqa: F401 (a fixture)
    checkpoints,
    cli,
    records,
    run,
    run_args,
    tracker,
)


@pytest.fixture(scope="module")
def faults(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    run_distributed(1, fault_matrix, base, str(folder))
    with open(folder / "faults.json") as f:
        return folder, json.load(f)


@pytest.mark.parametrize("fault, what", [
    ("truncated_shard", "is 1000 bytes, the manifest says"),
    ("missing_shard", "is missing"),
    ("corrupted_metadata", "has CRC-32"),
])
def test_a_damaged_latest_checkpoint_is_skipped(faults, fault, what):
    folder, r = faults
    got, damaged = r[fault], f"{folder}/{fault}/ckpt/iter_0000004"
    assert got["error"] is None
    # one loud warning naming the checkpoint, the file and what is wrong
    assert f"WARNING: checkpoint {damaged} is damaged: {got['file']} {what}" in got["warnings"]
    assert got["warnings"].count(" is damaged: ") == 1
    # resumed from iter_0000002: steps 3..6 redone, equal to the uninterrupted run
    assert [x["step"] for x in got["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert_same(got["metrics"], r["reference"])
    # the damaged folder is kept (set aside by the new save of step 4), nothing complete lost
    assert f"WARNING: the damaged {damaged} was renamed to {damaged}.damaged" in got["warnings"]
    assert got["entries"] == ["iter_0000002", "iter_0000004", "iter_0000004.damaged",
                              "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert got["tracker"] == "6\n"


@pytest.mark.parametrize("fault, what", [
    ("tracker_names_missing_step", "names step 5, but iter_0000005 is missing or incomplete"),
    ("tracker_garbage", "holds '\\x00\\x17garbage', not a step"),
])
def test_a_bad_tracker_falls_back_to_the_newest_checkpoint(faults, fault, what):
    folder, r = faults
    got = r[fault]
    assert got["error"] is None
    assert f"latest_checkpointed_iteration.txt {what}: ignored" in got["warnings"]
    assert_same(got["metrics"], r["reference"])  # resumed from iter_0000004
    assert got["entries"] == ["iter_0000002", "iter_0000004", "iter_0000006",
                              "latest_checkpointed_iteration.txt"]
    assert got["tracker"] == "6\n"


def test_a_full_disk_during_a_save_is_a_clear_error_and_loses_nothing(faults):
    folder, r = faults
    failed, rerun = r["enospc"], r["enospc_rerun"]
    ckpt = f"{folder}/enospc/ckpt"
    assert failed["error"].startswith(f"saving checkpoint {ckpt}/iter_0000006 failed (rank 0: ")
    assert failed["error"].endswith("the previous checkpoint stays the latest, and the next "
                                    "save removes iter_0000006.tmp")
    # megatron-core logs the cause (its exception keeps only the class)
    assert (f"[Errno 28] No space left on device: '{ckpt}/iter_0000006.tmp/"
            in failed["warnings"])
    assert failed["tracker"] == "4\n"  # the previous checkpoint stays the latest
    assert failed["entries"] == ["iter_0000002", "iter_0000004", "iter_0000006.tmp",
                                 "latest_checkpointed_iteration.txt"]
    assert rerun["error"] is None and "megatron-ntp: WARNING" not in rerun["warnings"]
    assert_same(rerun["metrics"], r["reference"])
    assert rerun["entries"] == ["iter_0000002", "iter_0000004", "iter_0000006",
                                "latest_checkpointed_iteration.txt"]


def verify_command(path, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "checkpoint", "verify",
                           path, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=HANG)


def test_verify_command_lists_each_iteration_and_its_state(faults):
    folder, r = faults
    ckpt = f"{folder}/truncated_shard/ckpt"
    result = verify_command(ckpt)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{'iter_0000002':<24} intact: ")
    assert lines[1].startswith(f"{'iter_0000004':<24} intact: ")
    assert lines[2] == f"{'iter_0000004.damaged':<24} DAMAGED (set aside)"
    shard = r["truncated_shard"]["file"]
    saved = _manifest_size(f"{ckpt}/iter_0000004.damaged", shard)
    assert lines[3] == f"    {shard} is 1000 bytes, the manifest says {saved} (truncated)"
    assert lines[4].startswith(f"{'iter_0000006':<24} intact: ")
    assert lines[-1] == "a resume starts from: iter_0000006"
    clean = verify_command(f"{folder}/pristine/ckpt", "--sizes-only")
    assert clean.returncode == 0 and "(sizes checked)" in clean.stdout
    assert verify_command(f"{folder}/absent").returncode == 2


def test_export_of_a_damaged_checkpoint_is_a_clear_error(faults, tmp_path):
    """Eval and export load weights through load_model_weights, which verifies first."""
    folder, r = faults
    damaged = f"{folder}/truncated_shard/ckpt/iter_0000004.damaged"
    result = subprocess.run([sys.executable, "-m", "megatron_ntp.cli", "export", "--checkpoint",
                             damaged, "--output", str(tmp_path / "hf")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert (f"megatron-ntp export: checkpoint {damaged} is damaged: "
            f"{r['truncated_shard']['file']} is 1000 bytes" in result.stderr)
    assert not os.path.exists(tmp_path / "hf" / "config.json")


def test_every_rank_raises_the_same_clear_error(faults, tmp_path):
    """Two ranks share the checksums: a same-size corruption found by one rank is reported by
    both, as is a truncation (found by rank 0's size check)."""
    folder, r = faults
    paths = [f"{folder}/{name}/ckpt/iter_0000004.damaged"
             for name in ("corrupted_metadata", "truncated_shard")] + [
             f"{folder}/pristine/ckpt/iter_0000006"]
    run_distributed(2, verify_on_every_rank, paths, str(tmp_path))
    ranks = [json.loads((tmp_path / f"verify_{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    corrupted, truncated, intact = ranks[0]
    assert corrupted.startswith(f"checkpoint {paths[0]} is damaged: metadata.json has CRC-32 ")
    assert truncated.startswith(f"checkpoint {paths[1]} is damaged: "
                                f"{r['truncated_shard']['file']} is 1000 bytes, the manifest "
                                f"says ")
    assert intact is None


def _manifest_size(checkpoint_dir, name):
    with open(os.path.join(checkpoint_dir, "checkpoint.json")) as f:
        return json.load(f)["files"][name]["bytes"]


def fake_checkpoint(root, step, shard=b"0123456789"):
    """An iter_ folder with one shard and checkpoint.json holding its manifest."""
    from megatron_ntp.training import checkpoint_files as files
    from megatron_ntp.training import checkpoint_manifest as manifest

    folder = root / f"iter_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(shard)
    entries = manifest.manifest_entries(str(folder), manifest.list_files(str(folder)))
    (folder / files.INFO_FILE).write_text(json.dumps(
        {"format": 2, "step": step, "consumed_samples": 4 * step, "files": entries}))
    return folder


def test_manifest_pruning_and_publishing_keep_damaged_checkpoints(tmp_path):
    """The file-level pieces alone: what counts as damaged, pruning leaves damaged folders alone
    (and does not count them), a new save of a damaged step sets the old folder aside."""
    from megatron_ntp.training import checkpoint_files as files
    from megatron_ntp.training import checkpoint_manifest as manifest

    def make(step):
        return fake_checkpoint(tmp_path, step)

    intact, truncated, changed = make(2), make(4), make(6)
    (truncated / "__0_0.distcp").write_bytes(b"012")
    (changed / "__0_0.distcp").write_bytes(b"0123456788")
    assert manifest.find_problems(str(intact)) == []
    assert manifest.find_problems(str(truncated)) == [
        "__0_0.distcp is 3 bytes, the manifest says 10 (truncated)"]
    assert manifest.find_problems(str(changed), checksums=False) == []
    assert manifest.find_problems(str(changed))[0].startswith("__0_0.distcp has CRC-32 ")
    (intact / files.INFO_FILE).write_text('{"format": 2}')
    assert manifest.find_problems(str(intact)) == ["checkpoint.json has no manifest ('files')"]
    (intact / files.INFO_FILE).write_text("{not json")
    assert manifest.find_problems(str(intact))[0].startswith("checkpoint.json cannot be read")

    make(8)
    files.prune_checkpoints(str(tmp_path), keep_last=2, newest=8,
                            damaged=lambda path: bool(manifest.find_problems(path)))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                            "iter_0000008"]  # all damaged but the newest
    for expected in ("iter_0000004.damaged", "iter_0000004.damaged.1"):
        (tmp_path / "iter_0000004.tmp").mkdir()
        set_aside = files.publish(str(tmp_path / "iter_0000004.tmp"), str(truncated),
                                  keep_existing=True)
        assert set_aside == str(tmp_path / expected) and os.path.isdir(set_aside)
    # no tracker: newest first; the empty iter_0000004 published last is no checkpoint
    assert files.resume_candidates(str(tmp_path)) == (
        [str(tmp_path / f"iter_{step:07d}") for step in (8, 6, 2)], [])


def test_checkpoint_verify_false_checks_sizes_only(tmp_path, capsys):
    """plan_start: a same-size corruption of the latest checkpoint is caught by the checksums
    (fallback to the older one), not with checkpoint.verify=false; a truncation is caught by
    both; with no intact checkpoint left, the error names them all."""
    from megatron_ntp.config import load_config
    from megatron_ntp.training import checkpoint

    fake_checkpoint(tmp_path, 2)
    latest = fake_checkpoint(tmp_path, 4)
    (tmp_path / checkpoint.TRACKER_FILE).write_text("4\n")
    (latest / "__0_0.distcp").write_bytes(b"0123456788")

    def start(verify):
        return checkpoint.plan_start(load_config(None, [
            f"checkpoint.save_dir={tmp_path}", f"checkpoint.verify={verify}"]))

    assert start("true") == checkpoint.StartPoint(2, 8, str(tmp_path / "iter_0000002"))
    assert f"checkpoint {latest} is damaged: __0_0.distcp has CRC-32" in capsys.readouterr().err
    assert start("false") == checkpoint.StartPoint(4, 16, str(latest))
    (latest / "__0_0.distcp").write_bytes(b"0")
    assert start("false").step == 2
    (tmp_path / "iter_0000002" / "__0_0.distcp").unlink()
    with pytest.raises(checkpoint.CheckpointDamaged, match=(
            r"no intact checkpoint to resume from: checkpoint .*iter_0000004 is damaged: "
            r"__0_0.distcp is 1 bytes, .* \| checkpoint .*iter_0000002 is damaged: "
            r"__0_0.distcp is missing")):
        start("true")
    assert (tmp_path / checkpoint.TRACKER_FILE).read_text() == "4\n"  # left as it was


# ---------------------------------------------------------------------------------------------
# The scenario of the issue, at TP=2 under torchrun
# ---------------------------------------------------------------------------------------------
def test_tp2_resume_skips_a_truncated_shard_and_tracks_the_uninterrupted_run(base, tmp_path):
    """Checkpoints at 2 and 4; one shard of iter_0000004 truncated to 1,000 bytes; the same
    command resumes from iter_0000002 with a warning naming the file and ends with the same
    per-step losses. Loading the damaged checkpoint explicitly is a clear error, no traceback
    from the trainer (torchrun prints its own when a worker fails)."""
    reference, damaged = tmp_path / "reference", tmp_path / "damaged"

    def args(folder, *extra):
        return run_args(base, folder, "parallel.tensor=2", "checkpoint.save_interval=2", *extra,
                        steps=4)

    run(args(reference), nproc=2)
    shutil.copytree(reference, damaged)
    latest = damaged / "ckpt" / "iter_0000004"
    shard = max((p for p in latest.iterdir() if p.suffix == ".distcp"),
                key=lambda p: p.stat().st_size)
    os.truncate(shard, 1000)
    resumed = run(args(damaged), nproc=2)
    assert (f"megatron-ntp: WARNING: checkpoint {latest} is damaged: {shard.name} is 1000 bytes"
            in resumed.stderr)
    assert f"resuming from {damaged}/ckpt/iter_0000002 at step 2/4" in resumed.stdout
    assert_same(records(damaged), records(reference))
    assert tracker(damaged) == "4"
    assert checkpoints(damaged) == ["iter_0000002", "iter_0000004", "iter_0000004.damaged",
                                    "latest_checkpointed_iteration.txt"]

    explicit = subprocess.run(
        cli(args(tmp_path / "other", f"checkpoint.load_dir={latest}.damaged"), nproc=2),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG)
    error = (f"megatron-ntp train: checkpoint {latest}.damaged is damaged: {shard.name} is "
             f"1000 bytes, the manifest says")
    assert explicit.returncode != 0 and error in explicit.stderr, explicit.stderr[-4000:]
    assert explicit.stderr.count("Traceback (most recent call last)") <= 1  # torchrun's own
