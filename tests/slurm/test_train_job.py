"""slurm/train.sbatch on a real local Slurm: a tiny CPU training job is stopped mid-run and
finishes from its checkpoint with the same losses as an uninterrupted run.

- `scontrol requeue` (a hard stop: srun turns the SIGTERM it gets into SIGKILL of the trainer,
  racing the trainer's own save): the job runs again under the same id and resumes from the
  last checkpoint that was complete.
- `scancel --signal=TERM` (what --signal=TERM@300 sends before the time limit): the trainer
  finishes its step, saves, exits 75, and the batch script requeues the job itself.
- one task per rank (NTP_LAUNCHER=srun) with two data-parallel ranks, submitted as a chain of
  two jobs: the second one finds the run complete and exits at once.
"""

import json
import os
import re

import pytest
import yaml

from megatron_ntp.jobs.run_folder import COMPLETE_MARKER, read_jsonl_by_step
from tests.slurm.harness import (
    read_log,
    submit_chain,
    submit_training,
    tiny_overrides,
    wait_for_step,
)

pytestmark = pytest.mark.slurm

STEPS = 200
SAVE_INTERVAL = 20


def _run(tmp_path, name, data, **extra):
    run_dir = str(tmp_path / name)
    overrides = {**tiny_overrides(*data), "train.steps": STEPS,
                 "checkpoint.save_dir": f"{run_dir}/checkpoints",
                 "checkpoint.save_interval": SAVE_INTERVAL, "logging.run_dir": run_dir,
                 "data.cache_dir": f"{run_dir}/cache", **extra}
    return run_dir, overrides


def _losses(run_dir):
    records = read_jsonl_by_step(os.path.join(run_dir, "metrics.jsonl"))
    return [r["step"] for r in records], [r["loss"] for r in records], [r["ce"] for r in records]


@pytest.fixture(scope="module")
def reference(slurm, tiny_data, tmp_path_factory):
    """An uninterrupted run through the batch script (submitted first; it runs beside the
    interrupted ones on the second CPU)."""
    run_dir, overrides = _run(tmp_path_factory.mktemp("reference"), "run", tiny_data)
    job = submit_training(overrides)
    yield run_dir, job
    # the tests wait for it before comparing


def _finished_reference(slurm, reference):
    run_dir, job = reference
    fields = slurm.wait_finished([job])[job]
    assert fields["JobState"] == "COMPLETED", read_log(run_dir, job)[-3000:]
    steps, losses, ces = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))
    return losses, ces


def test_scontrol_requeue_resumes_from_the_checkpoint(slurm, tiny_data, tmp_path, reference):
    run_dir, overrides = _run(tmp_path, "requeued", tiny_data)
    job = submit_training(overrides)
    wait_for_step(run_dir, 2 * SAVE_INTERVAL + 5, slurm, job)  # past two checkpoints
    slurm.run("scontrol", "requeue", job)

    fields = slurm.wait_finished([job])[job]
    log = read_log(run_dir, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert fields["Restarts"] == "1", fields
    assert "restart 0:" in log and "restart 1:" in log  # one log per job, appended
    resumed = re.search(r"resuming from \S+ at step (\d+)/", log)
    assert resumed, log[-3000:]
    # the trainer had passed step 45: the latest periodic checkpoint (40 or later), or the one
    # it saved on the SIGTERM of the requeue when that save beat srun's SIGKILL
    assert int(resumed.group(1)) >= 2 * SAVE_INTERVAL
    assert os.path.isfile(os.path.join(run_dir, COMPLETE_MARKER))
    with open(os.path.join(run_dir, COMPLETE_MARKER)) as f:
        assert json.load(f)["job_id"] == job

    steps, losses, ces = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))  # every step once: redone steps replaced their records
    ref_losses, ref_ces = _finished_reference(slurm, reference)
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-6, abs=0)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    assert ces == pytest.approx(ref_ces, rel=1e-6, abs=0)


def test_sigterm_checkpoints_exits_75_and_the_job_requeues_itself(slurm, tiny_data, tmp_path,
                                                                  reference):
    run_dir, overrides = _run(tmp_path, "signalled", tiny_data)
    job = submit_training(overrides)
    wait_for_step(run_dir, SAVE_INTERVAL + 3, slurm, job)  # between two periodic checkpoints
    slurm.run("scancel", "--signal=TERM", job)  # the steps only, as --signal=TERM@300 does

    fields = slurm.wait_finished([job])[job]
    log = read_log(run_dir, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert fields["Restarts"] == "1", fields
    assert "preempted (SIGTERM) after step" in log, log[-3000:]
    assert "worker exit codes [75]: exiting 75" in log  # the launcher kept the trainer's code
    assert "requeueing job" in log
    stopped = int(log.split("preempted (SIGTERM) after step ")[1].split("/")[0])
    assert stopped < STEPS
    # it saved at the step it had reached, and the next start resumed exactly there
    assert re.search(rf"saved checkpoint \S+iter_{stopped:07d}", log), log[-3000:]
    assert re.search(rf"resuming from \S+iter_{stopped:07d} at step {stopped}/{STEPS}", log), \
        log[-3000:]

    steps, losses, _ = _losses(run_dir)
    assert steps == list(range(1, STEPS + 1))
    ref_losses, _ = _finished_reference(slurm, reference)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)


def test_one_task_per_rank_in_a_chain_of_two_jobs(slurm, tiny_data, tmp_path):
    """NTP_LAUNCHER=srun with two ranks, submitted as a chain of two jobs (--chain 2,
    --dependency=afterany): the first trains, the second finds the run complete and exits."""
    from megatron_ntp.training import PREEMPTED_EXIT_CODE

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "slurm", "train.sbatch")) as f:
        assert f"PREEMPTED={PREEMPTED_EXIT_CODE} " in f.read()  # the script and the trainer agree

    run_dir, overrides = _run(tmp_path, "two_tasks", tiny_data,
                              **{"train.steps": 6, "train.micro_batch_size": 2})
    first, second = submit_chain(overrides, extra=["--launcher=srun", "--nproc-per-node=2",
                                                   "--chain=2"])
    assert slurm.job(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    fields = slurm.wait_finished([first, second])
    log = read_log(run_dir, first)
    assert fields[first]["JobState"] == "COMPLETED", log[-3000:]
    assert "1 node(s) x 2 rank(s) (srun)" in log
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f)["parallel"]["data"] == 2  # the trainer saw two ranks
    steps, _, _ = _losses(run_dir)
    assert steps == list(range(1, 7))

    assert fields[second]["JobState"] == "COMPLETED"
    assert fields[second]["StartTime"] >= fields[first]["EndTime"]
    log = read_log(run_dir, second)
    assert "is complete" in log and "nothing to do" in log and "restart 0:" not in log
