"""What would be submitted: sbatch command lines, `megatron-ntp submit --dry-run`, and the
batch script's own dry run (NTP_DRY_RUN=1), which prints the srun/torchrun command, the NCCL
settings and the rendezvous address (no Slurm needed)."""

import os
import subprocess
import sys

from megatron_ntp.jobs.slurm import BATCH_SCRIPT, SlurmOptions, sbatch_commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "configs", "tiny_dense.yaml")


def test_sbatch_commands():
    options = SlurmOptions(nodes=4, time="04:00:00", chain=3, partition="gpu",
                           sbatch_args=["--exclusive"])
    commands = sbatch_commands(options, ["--config", "c.yaml", "loss.beta=-0.25"], "run1", "/r/logs")
    assert len(commands) == 3
    first = commands[0]
    for option in ("--job-name=run1", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                   "--signal=TERM@300", "--time=04:00:00", "--partition=gpu", "--requeue",
                   "--open-mode=append", "--output=/r/logs/slurm-%j.out", "--exclusive"):
        assert option in first
    assert first[-4:] == [BATCH_SCRIPT, "--config", "c.yaml", "loss.beta=-0.25"]
    assert not any(c.startswith("--dependency") for c in first)
    assert "--dependency=afterany:{previous}" in commands[1]  # filled with the previous job id
    srun = sbatch_commands(SlurmOptions(launcher="srun", gpus_per_node=8), [], "r", "/l")[0]
    assert "--ntasks-per-node=8" in srun
    cpu = sbatch_commands(SlurmOptions(gpus_per_node=0, signal_seconds=0), [], "r", "/l")[0]
    assert not any(c.startswith(("--gpus", "--signal")) for c in cpu)


def test_submit_dry_run(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ntp.cli", "submit", "--dry-run", "--nodes=2",
         "--gpus-per-node=2", "--chain=2", "--time=01:00:00", "--config", TINY,
         f"logging.run_dir={tmp_path}/run", "parallel.tensor=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "NTP_LAUNCHER=torchrun" in lines[0] and "NTP_NPROC_PER_NODE=2" in lines[0]
    assert "--nodes=2" in lines[0] and f"--output={tmp_path}/run/logs/slurm-%j.out" in lines[0]
    assert lines[0].endswith(f"--config {TINY} logging.run_dir={tmp_path}/run parallel.tensor=2")
    assert "--dependency=afterany:{previous}" in lines[1]
    assert "checkpoint.save_dir is not set" in result.stderr
    assert not os.path.exists(tmp_path / "run")  # nothing submitted, nothing created

    # the layout is checked at the job's world size (nodes x GPUs) before submitting
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_ntp.cli", "submit", "--dry-run", "--nodes=1",
         "--gpus-per-node=3", "--config", TINY, "parallel.tensor=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2
    assert "world size 3 must be a multiple of parallel.tensor" in bad.stderr


def test_submit_derives_the_data_parallel_size_from_the_allocation(tmp_path):
    """dense_1b.yaml fixes parallel.data=64 (a 64-GPU layout); submitted on 4 x 8 GPUs it runs
    at data 32, saying so; a value on the command line is the user's and is checked."""
    base = [sys.executable, "-m", "megatron_ntp.cli", "submit", "--dry-run", "--nodes", "4",
            "--gpus-per-node", "8", "--time", "24:00:00", "--config",
            "examples/configs/dense_1b.yaml", f"checkpoint.save_dir={tmp_path}/ckpt",
            f"logging.run_dir={tmp_path}/run"]
    result = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "parallel.data=64 of examples/configs/dense_1b.yaml replaced by the allocation's " \
           "32 GPUs" in result.stderr
    assert result.stdout.strip().endswith("parallel.data=32")
    fixed = subprocess.run(base + ["parallel.data=16"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
    assert fixed.returncode == 2 and "parallel.data=16 disagrees with world size 32" in \
        fixed.stderr


def _script_dry_run(env, *args):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_"))}
    return subprocess.run(["bash", BATCH_SCRIPT, *args], capture_output=True, text=True,
                          env={**base, "NTP_DRY_RUN": "1", **env}, cwd=ROOT, timeout=60)


def test_batch_script_dry_run_torchrun():
    result = _script_dry_run({"SLURM_JOB_ID": "1234", "SLURM_JOB_NUM_NODES": "4",
                              "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96",
                              "SLURM_RESTART_COUNT": "2", "NCCL_DEBUG": "INFO"},
                             "--config", "x.yaml", "loss.beta=-0.25")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "4 node(s) x 8 rank(s) (torchrun)" in out
    assert "MASTER_PORT=" in out and f":{20000 + 234 * 20 + 2}" in out
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in out  # the trainer's, from the config
    assert "export NCCL_DEBUG=INFO" in out  # the environment wins over the defaults
    assert ("srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=96 --kill-on-bad-exit=0"
            in out)
    assert ("-m megatron_ntp.jobs.launch torchrun --nproc-per-node=8 -- -m megatron_ntp.cli "
            "train --config x.yaml loss.beta=-0.25") in out


def test_batch_script_dry_run_one_task_per_gpu_and_no_nccl_defaults():
    result = _script_dry_run({"NTP_LAUNCHER": "srun", "NTP_NCCL_DEFAULTS": "0"},
                             "--config", "x.yaml")
    assert result.returncode == 0, result.stderr
    assert "NCCL_" not in result.stdout.replace("NTP_NCCL", "")
    assert "-m megatron_ntp.jobs.launch task -- -m megatron_ntp.cli train --config x.yaml" \
        in result.stdout
    bad = _script_dry_run({"NTP_LAUNCHER": "mpirun"}, "--config", "x.yaml")
    assert bad.returncode == 2 and "NTP_LAUNCHER=mpirun must be torchrun or srun" in bad.stderr
    assert _script_dry_run({}).returncode == 2  # no arguments: usage


def test_a_bad_config_fails_the_job_before_srun(tmp_path, capsys):
    from megatron_ntp.jobs.run_folder import main

    assert main(["run-dir", "--config", TINY, "train.lr=-1"]) == 2
    assert "train.lr=-1.0 must be positive" in capsys.readouterr().err
    assert main(["run-dir", "--world-size", "3", "--config", TINY, "parallel.tensor=2"]) == 2
    assert "world size 3" in capsys.readouterr().err
    assert main(["run-dir", "--config", TINY, f"logging.run_dir={tmp_path}/r"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}/r"
