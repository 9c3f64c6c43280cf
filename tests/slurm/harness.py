"""Helpers of the Slurm tests: scontrol queries, waiting for jobs, a tiny training config."""

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "megatron_ntp.cli"]


class LocalSlurm:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.conf = os.path.join(state_dir, "slurm.conf")

    def run(self, *command, check=True, timeout=120, attempts=1) -> str:
        """Run a Slurm command; with attempts > 1 (queries only) a client that lost its
        connection to a busy slurmctld (killed by SIGPIPE; "Zero Bytes were transmitted" in
        slurmctld's log) is retried."""
        for attempt in range(attempts):
            result = subprocess.run(list(command), capture_output=True, text=True,
                                    timeout=timeout)
            if result.returncode >= 0 or attempt == attempts - 1:
                break
            time.sleep(1)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): "
                                 f"{result.stdout}{result.stderr}")
        return result.stdout

    def jobs(self, job_id: str = "") -> dict:
        """{job id: scontrol's fields (JobState, Restarts, ExitCode, ...)} of one job or all."""
        out = self.run("scontrol", "show", "job", "--oneliner", *([job_id] if job_id else []),
                       attempts=5)
        jobs = {}
        for line in out.splitlines():
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields.setdefault(key, value)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def job(self, job_id: str) -> dict:
        return self.jobs(job_id)[job_id]

    def wait_finished(self, job_ids, timeout=600) -> dict:
        """Wait until every job has left the queue for good; {job id: scontrol fields}. One
        scontrol call per poll, however many jobs."""
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        done = {}
        while pending:
            jobs = self.jobs()
            for job_id in sorted(pending):
                fields = jobs[job_id]
                if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                          "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                    done[job_id] = fields
                    pending.discard(job_id)
            if pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"jobs {sorted(pending)} did not finish in {timeout} s: "
                                         f"{[jobs[j]['JobState'] for j in sorted(pending)]}")
                time.sleep(1)
        return done


def tiny_overrides(prefix: str, tokenizer: str) -> dict:
    """A very small dense model on the tiny dataset: steps of a few milliseconds on one core."""
    return {
        "data.blend": prefix, "data.tokenizer_model": tokenizer, "data.seq_length": 32,
        "model.vocab_size": 1024, "model.num_layers": 1, "model.hidden_size": 32,
        "model.num_attention_heads": 2, "model.num_query_groups": 1, "model.kv_channels": 16,
        "model.ffn_hidden_size": 64, "train.global_batch_tokens": 128,
        "train.micro_batch_size": 4, "train.lr": 3.0e-3, "train.min_lr": 3.0e-4,
        "train.lr_warmup_steps": 2, "train.lr_decay_steps": 4, "logging.tensorboard": False,
        "logging.log_interval": 10,
    }


def as_args(overrides: dict) -> list[str]:
    return [f"{key}={value}" for key, value in overrides.items()]


def submit_training(overrides: dict, extra=(), env=None) -> str:
    """`megatron-ntp submit` of examples/configs/tiny_dense.yaml with overrides, as a one-CPU
    job; returns the job id (the first one of a chain, see submit_chain)."""
    return submit_chain(overrides, extra, env)[0]


def submit_chain(overrides: dict, extra=(), env=None) -> list[str]:
    """The job ids of `megatron-ntp submit` (several with --chain). The one-CPU jobs share the
    node: --oversubscribe overrides the batch script's --exclusive (as --mem its --mem=0)."""
    command = CLI + ["submit", "--gpus-per-node=0", "--nproc-per-node=1",
                     "--sbatch-arg=--cpus-per-task=1", "--sbatch-arg=--mem=1500",
                     "--sbatch-arg=--oversubscribe", *extra,
                     "--config", os.path.join(ROOT, "examples", "configs", "tiny_dense.yaml"),
                     *as_args(overrides)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    ids = result.stdout.split("submitted job ")[1].split(" (run ")[0]
    return [i.strip() for i in ids.split(",")]


def read_log(run_dir: str, job_id: str) -> str:
    with open(os.path.join(run_dir, "logs", f"slurm-{job_id}.out")) as f:
        return f.read()


def wait_for_step(run_dir: str, step: int, slurm, job_id: str, timeout=600) -> None:
    """Wait until <run_dir>/metrics.jsonl holds `step`, i.e. `step` optimizer steps are done
    (the job must still be running)."""
    from megatron_ntp.jobs.run_folder import last_step

    deadline = time.monotonic() + timeout
    polls = 0
    while last_step(run_dir) < step:
        if polls % 10 == 0:  # the job's state once a second, the metrics ten times
            state = slurm.job(job_id)["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"job {job_id} is {state} before step {step}:\n{read_log(run_dir, job_id)[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        polls += 1
        time.sleep(0.1)
