"""The per-node launcher of slurm/train.sbatch (megatron_ntp.jobs.launch), for real with
torchrun's machinery: exit code 75 survives torchrun, SIGTERM to the launcher reaches the
workers and the launcher waits for them instead of killing them, the workers' shutdown grace is
the launcher's, only options the installed torchrun accepts are passed, and a TP 2 training run
goes through it. The oldest-stack lane (tools/oldest_stack.sh) runs this file on torch 2.9, whose
torchrun lacks --signals-to-handle and --shutdown-timeout."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_ntp.jobs import launch
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    mode = sys.argv[1]
    ready = sys.argv[2]
    if mode == "exit":
        sys.exit(int(sys.argv[3 + rank]))
    if mode == "fail_first" and rank == 0:  # fails once rank 1 is ready; torchrun stops rank 1
        while not os.path.exists(f"{ready}.1"):
            time.sleep(0.05)
        sys.exit(3)
    save_seconds = float(sys.argv[3]) if mode == "fail_first" else 1.0
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    open(f"{ready}.{rank}", "w").close()
    deadline = time.time() + 60
    while not got and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(save_seconds)  # "finish the step and save" after the signal: the launcher waits
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


def test_the_shutdown_grace_is_the_launchers(tmp_path):
    """After rank 0 fails, torchrun sends SIGTERM to rank 1 and kills it after the grace: with
    --shutdown-timeout=1, a rank still saving 8 s later is killed (torchrun's own default, 30 s,
    would have let it save), wherever torchrun has the option or not."""
    ready = tmp_path / "ready"
    process = _launcher(tmp_path, "fail_first", ready, 8, options=["--shutdown-timeout=1"])
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 3, out  # rank 0's code; rank 1 was killed, not preempted
    assert os.path.exists(f"{ready}.1") and not os.path.exists(f"{ready}.1.saved"), out
    # a grace long enough: rank 1 saves (2 s) and exits 75, and rank 0's failure wins
    ready = tmp_path / "ready2"
    process = _launcher(tmp_path, "fail_first", ready, 2, options=["--shutdown-timeout=60"])
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 3 and os.path.exists(f"{ready}.1.saved"), out


def test_only_options_the_installed_torchrun_has_are_passed(monkeypatch):
    from torch.distributed.run import get_args_parser

    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "1")
    installed = launch.parser_options(get_args_parser())
    arguments = launch.torchrun_arguments(8, ["-m", "x"], installed)
    get_args_parser().parse_args(arguments)  # exits 2 on an option this torchrun lacks
    assert "--nnodes=2" in arguments and "--node-rank=1" in arguments
    assert arguments[-2:] == ["-m", "x"]
    old = installed - {"--signals-to-handle", "--signals_to_handle", "--shutdown-timeout",
                       "--shutdown_timeout"}
    assert not any(a.startswith(("--signals", "--shutdown"))
                   for a in launch.torchrun_arguments(8, [], old))
    new = launch.torchrun_arguments(8, [], old | {"--signals-to-handle", "--shutdown-timeout"},
                                    shutdown_timeout_s=42)
    assert "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT" in new and "--shutdown-timeout=42" in new


def test_the_slurm_launcher_trains_at_tp2(tmp_path):
    """slurm/train.sbatch's default launcher path: python -m megatron_ntp.jobs.launch torchrun,
    2 ranks, TP 2 with sequence parallelism, a few steps and a checkpoint."""
    run_dir, save_dir = tmp_path / "run", tmp_path / "ckpt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "OMP_NUM_THREADS": "1",
           "MEGATRON_NTP_SAMPLE_DIR": str(tmp_path / "sample")}
    command = [sys.executable, "-m", "megatron_ntp.jobs.launch", "torchrun", "--nproc-per-node=2",
               "--", "-m", "megatron_ntp.cli", "train",
               "--config", "examples/configs/tiny_dense.yaml", "parallel.tensor=2",
               "parallel.sequence_parallel=true", "loss.beta=-0.25", "loss.topk=100",
               "loss.lambda_tail=-0.1", "data.seq_length=64", "train.global_batch_tokens=256",
               "train.micro_batch_size=2", "train.steps=3", "train.lr_warmup_steps=1",
               "train.lr_decay_steps=1", f"logging.run_dir={run_dir}",
               f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=3"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 and all(r["ce"] > 0 and r["grad_norm"] > 0 for r in records)
    with open(save_dir / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "3"


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
