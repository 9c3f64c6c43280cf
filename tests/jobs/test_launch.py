"""The per-node launcher of slurm/train.sbatch (megatron_ntp.jobs.launch), for real with
torchrun's machinery: exit code 75 survives torchrun, SIGTERM to the launcher reaches the
workers and the launcher waits for them instead of killing them."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_ntp.jobs import launch
from tests.distributed import free_port

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    mode = sys.argv[1]
    ready = sys.argv[2]
    if mode == "exit":
        sys.exit(int(sys.argv[3 + rank]))
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    open(f"{ready}.{rank}", "w").close()
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # "finish the step and save" after the signal: the launcher must wait
    open(f"{ready}.{rank}.saved", "w").close()
    sys.exit(75 if got else 9)
""")


def _launcher(tmp_path, *worker_args, options=()):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_ntp.jobs.launch", "torchrun", "--nproc-per-node=2",
         *options, "--", str(script), *map(str, worker_args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("codes, expected", [((75, 75), 75), ((0, 0), 0), ((3, 3), 3),
                                             ((0, 4), 4)])
def test_exit_codes_through_torchrun(tmp_path, codes, expected):
    process = _launcher(tmp_path, "exit", tmp_path / "ready", *codes)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == expected, out


def _wait_ready(process, ready):
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{ready}.{r}") for r in (0, 1)):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.05)


def test_sigterm_to_every_process_the_launcher_waits_for_the_checkpoint(tmp_path):
    """What Slurm does (--signal=TERM@T, scancel --signal=TERM): every process of the step."""
    import psutil

    ready = tmp_path / "ready"
    process = _launcher(tmp_path, "wait", ready)
    _wait_ready(process, ready)
    for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children()]:
        p.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 75, out
    assert "[launch] SIGTERM: waiting for the workers" in out
    assert all(os.path.exists(f"{ready}.{r}.saved") for r in (0, 1))  # not killed mid-save


def test_forward_sigterm_when_only_the_launcher_is_signalled(tmp_path):
    ready = tmp_path / "ready"
    process = _launcher(tmp_path, "wait", ready, options=["--forward-sigterm"])
    _wait_ready(process, ready)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 75, out
    assert "forwarded to 2 worker(s)" in out
    assert all(os.path.exists(f"{ready}.{r}.saved") for r in (0, 1))


def test_exit_code_mapping():
    assert launch.exit_code_of_failures([75, 75]) == 75
    # torchrun ends the other workers with SIGTERM once one exits: still a preemption
    assert launch.exit_code_of_failures([75, -15]) == 75
    assert launch.exit_code_of_failures([75, 1]) == 1
    assert launch.exit_code_of_failures([3, -15]) == 3
    assert launch.exit_code_of_failures([-15]) == 143
    assert launch.exit_code_of_failures([-9, 75]) == 137  # SIGKILL, as a shell reports it


def test_task_environment(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4,2")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    env = launch.task_environment(os.environ)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"],
            env["GROUP_RANK"], env["MASTER_ADDR"]) == ("5", "1", "6", "2", "1", "node001")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x3)")
    assert launch.local_world_size() == 8
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(SystemExit, match=r"\$SLURM_PROCID is not set"):
        launch.task_environment(os.environ)
