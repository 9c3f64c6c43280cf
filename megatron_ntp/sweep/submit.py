"""`megatron-ntp sweep submit`: submit every run of a planned sweep that still needs a job.

Idempotent: a run is skipped when it is complete (its COMPLETE marker exists: the trainer
exited 0 at the last step), or when a job of it is pending/running/requeued in squeue (by the
job ids recorded in <run_dir>/slurm_jobs.jsonl, or by its job name, the run name). Any other run
is submitted, including one whose earlier job failed or was cancelled: it resumes from its
latest checkpoint.
"""

import os
import sys

from megatron_ntp.jobs.run_folder import is_complete
from megatron_ntp.sweep.plan import CONFIG_FILE, load_manifest
from megatron_ntp.jobs.slurm import (
    SlurmError,
    SlurmOptions,
    active_jobs,
    format_command,
    job_environment,
    recorded_jobs,
    sbatch_commands,
    submit_run,
)


def run_state(run_dir: str, name: str, queue: dict) -> tuple[str, list[str]]:
    """('complete' | 'queued' | 'submit', active job ids) of one run."""
    if is_complete(run_dir):
        return "complete", []
    active = [j for j in recorded_jobs(run_dir) if j in queue]
    active += [j for j, (job_name, _) in queue.items() if job_name == name and j not in active]
    return ("queued", active) if active else ("submit", [])


def submit_sweep(root: str, dry_run: bool = False, stream=None) -> dict:
    """Submit what needs submitting; {state: [run names]} with state complete/queued/submitted
    (dry run: would-submit)."""
    stream = stream or sys.stdout
    manifest = load_manifest(root)
    options = SlurmOptions(**manifest["slurm"])
    try:
        queue = active_jobs()
    except SlurmError as err:
        if not dry_run:
            raise
        print(f"# squeue unavailable ({err}); assuming no queued jobs", file=stream)
        queue = {}
    summary = {"complete": [], "queued": [], "submitted": [], "would-submit": []}
    for run in manifest["runs"]:
        name = run["name"]
        run_dir = os.path.join(root, run["dir"])
        state, jobs = run_state(run_dir, name, queue)
        if state == "complete":
            summary["complete"].append(name)
            continue
        if state == "queued":
            summary["queued"].append(name)
            print(f"{name}: already queued (job {', '.join(jobs)})", file=stream)
            continue
        train_args = ["--config", os.path.join(run_dir, CONFIG_FILE)]
        if dry_run:
            env = job_environment(options)
            for command in sbatch_commands(options, train_args, name, os.path.join(run_dir, "logs")):
                print(format_command(command, env), file=stream)
            summary["would-submit"].append(name)
            continue
        ids = submit_run(run_dir, options, train_args, name)
        summary["submitted"].append(name)
        print(f"{name}: submitted job {', '.join(ids)}", file=stream)
    print(f"{len(summary['submitted']) or len(summary['would-submit'])} "
          f"{'would be submitted' if dry_run else 'submitted'}, {len(summary['queued'])} already "
          f"queued, {len(summary['complete'])} complete", file=stream)
    return summary
