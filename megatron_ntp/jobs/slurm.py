"""Submitting training runs to Slurm through slurm/train.sbatch, and asking Slurm about them.

`sbatch_commands` builds the command lines (one per chained job); `submit_run` runs them and
records the job ids in <run_dir>/slurm_jobs.jsonl; `active_jobs` asks squeue which jobs are
still pending or running. Every run gets one log file per job, <run_dir>/logs/slurm-<job id>.out,
appended to across requeues of that job.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH_SCRIPT = os.path.join(REPO_ROOT, "slurm", "train.sbatch")
JOBS_FILE = "slurm_jobs.jsonl"
# squeue states of a job that will still run (or is running): not submitted again.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED",
                 "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    """A Slurm command failed; the message holds the command and its output."""


@dataclass(frozen=True)
class SlurmOptions:
    """How a run is submitted (the `slurm` section of a sweep spec, or `megatron-ntp submit`'s
    options)."""

    nodes: int = 1
    """Nodes per job."""

    gpus_per_node: int = 8
    """GPUs requested per node (--gpus-per-node); 0 = request none (CPU jobs)."""

    nproc_per_node: int = 0
    """Ranks per node; 0 = gpus_per_node (or 1 without GPUs)."""

    launcher: Literal["torchrun", "srun"] = "torchrun"
    """torchrun: one launcher task per node starting nproc_per_node ranks; srun: one Slurm task
    per rank (--ntasks-per-node=nproc_per_node)."""

    time: str = ""
    """Wall-time limit per job (--time, e.g. 04:00:00); "" = the partition's default."""

    signal_seconds: int = 300
    """SIGTERM to the trainer this many seconds before the time limit (--signal=TERM@s)."""

    partition: str = ""
    """--partition; "" = the cluster's default."""

    account: str = ""
    """--account; "" = the user's default."""

    chain: int = 1
    """Jobs submitted per run, each depending on the previous one (--dependency=afterany):
    for runs longer than the wall time on clusters that do not allow a job to requeue itself.
    Jobs after the run completed exit at once."""

    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, e.g. ["--exclusive", "--qos=high", "--cpus-per-task=1"]."""

    env: dict[str, str] = field(default_factory=dict)
    """Environment of the job (exported at submission), e.g. {NCCL_DEBUG: INFO}."""

    def __post_init__(self):
        # Types (and the launcher's choices) are checked by the config loader when the options
        # come from a file (megatron_ntp.config.load.build) and by argparse on the command line.
        errors = [f"slurm.{name}={getattr(self, name)!r} must be >= {least}"
                  for name, least in (("nodes", 1), ("chain", 1), ("gpus_per_node", 0),
                                      ("nproc_per_node", 0), ("signal_seconds", 0))
                  if getattr(self, name) < least]
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def job_environment(options: SlurmOptions) -> dict:
    """Variables the batch script reads (see slurm/train.sbatch), plus options.env."""
    # The job runs in the submitting folder, so relative paths in the config and the overrides
    # mean in the job what they meant when the config was validated here.
    env = {"NTP_ROOT": os.getcwd(), "NTP_PYTHON": sys.executable, "NTP_LAUNCHER": options.launcher,
           "NTP_NPROC_PER_NODE": str(options.ranks_per_node)}
    env.update({str(k): str(v) for k, v in options.env.items()})
    return env


def sbatch_commands(options: SlurmOptions, train_args: list[str], job_name: str, log_dir: str,
                    dependency: str = "") -> list[list[str]]:
    """sbatch command lines of one run: options.chain jobs, the k-th depending on the k-1-th
    (its id is filled in as {previous} when submitting). Environment: see job_environment."""
    base = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={options.nodes}",
            f"--output={os.path.join(log_dir, 'slurm-%j.out')}", "--open-mode=append",
            "--requeue", f"--chdir={os.getcwd()}", "--export=ALL"]
    if options.launcher == "srun":
        base.append(f"--ntasks-per-node={options.ranks_per_node}")
    else:
        base.append("--ntasks-per-node=1")
    if options.gpus_per_node:
        base.append(f"--gpus-per-node={options.gpus_per_node}")
    if options.signal_seconds:
        base.append(f"--signal=TERM@{options.signal_seconds}")
    if options.time:
        base.append(f"--time={options.time}")
    if options.partition:
        base.append(f"--partition={options.partition}")
    if options.account:
        base.append(f"--account={options.account}")
    base += list(options.sbatch_args)
    commands = []
    for k in range(options.chain):
        after = dependency if k == 0 else "{previous}"
        extra = [f"--dependency=afterany:{after}"] if after else []
        commands.append(base + extra + [BATCH_SCRIPT, *train_args])
    return commands


def format_command(command: list[str], env: dict | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(c) for c in command)


def _run(command: list[str], env: dict | None = None) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} not found: is Slurm installed and on PATH?") from None
    if result.returncode != 0:
        raise SlurmError(f"{format_command(command)} failed with exit code {result.returncode}: "
                         f"{(result.stderr or result.stdout).strip()}")
    return result.stdout


def submit_run(run_dir: str, options: SlurmOptions, train_args: list[str], job_name: str,
               dependency: str = "") -> list[str]:
    """Submit one run (options.chain jobs); returns the job ids and appends them to
    <run_dir>/slurm_jobs.jsonl."""
    log_dir = os.path.join(run_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, **job_environment(options)}
    ids = []
    for command in sbatch_commands(options, train_args, job_name, log_dir, dependency):
        command = [c.replace("{previous}", ids[-1]) if ids else c for c in command]
        job_id = _run(command, env).strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed {job_id!r}, not a job id")
        ids.append(job_id)
        with open(os.path.join(run_dir, JOBS_FILE), "a") as f:
            f.write(json.dumps({"job_id": job_id, "name": job_name}) + "\n")
    return ids


def recorded_jobs(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, JOBS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["job_id"] for line in f if line.strip()]


def active_jobs(attempts: int = 3) -> dict[str, tuple[str, str]]:
    """{job id: (job name, state)} of the jobs squeue lists as pending/running/requeued. A busy
    slurmctld may drop a query: it is retried (a query, unlike sbatch, is safe to repeat)."""
    for attempt in range(attempts):
        try:
            out = _run(["squeue", "--noheader", "--format=%i|%j|%T"])
            break
        except SlurmError as err:
            if "not found" in str(err) or attempt == attempts - 1:
                raise
            time.sleep(2)
    jobs = {}
    for line in out.splitlines():
        job_id, name, state = line.strip().split("|", 2)
        if state in ACTIVE_STATES:
            jobs[job_id] = (name, state)
    return jobs
