"""slurm/train.sbatch's dry run (NTP_DRY_RUN=1, no Slurm needed): the container flags of
NTP_CONTAINER_IMAGE / NTP_CONTAINER_MOUNTS on the srun line, whole-node requests by default,
and each task's CPU share in one-task-per-GPU mode."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "slurm", "train.sbatch")


def dry_run(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "NTP_")) and k != "MASTER_PORT"}
    result = subprocess.run(["bash", SCRIPT, "--config", "examples/configs/dense_1b.yaml"],
                            env={**clean, "NTP_DRY_RUN": "1", "NTP_ROOT": ROOT, **env},
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def srun_line(lines) -> list[str]:
    (line,) = [line for line in lines if line.startswith("srun ")]
    return shlex.split(line)


def test_container_flags_on_the_srun_line():
    words = srun_line(dry_run(NTP_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3",
                              NTP_CONTAINER_MOUNTS="/lustre/data:/data",
                              NTP_PYTHON=f"{ROOT}/.venv/bin/python"))
    assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in words
    assert f"--container-mounts={ROOT}:{ROOT},/lustre/data:/data" in words
    assert f"--container-workdir={ROOT}" in words
    # srun options come before the program
    program = words.index(f"{ROOT}/.venv/bin/python")
    assert words.index(f"--container-workdir={ROOT}") < program


def test_no_container_flags_without_an_image():
    words = srun_line(dry_run())
    assert not [w for w in words if w.startswith("--container")]


def test_whole_nodes_requested_by_default():
    (line,) = [line for line in dry_run() if line.startswith("# sbatch requests:")]
    assert "--exclusive" in line.split() and "--mem=0" in line.split()


def test_each_task_gets_its_share_of_the_cpus():
    words = srun_line(dry_run(NTP_LAUNCHER="srun", SLURM_CPUS_ON_NODE="96",
                              SLURM_NTASKS_PER_NODE="8(x2)"))
    assert "--cpus-per-task=12" in words
    words = srun_line(dry_run(SLURM_CPUS_ON_NODE="96"))  # torchrun: one task owns the node
    assert "--cpus-per-task=96" in words
