"""Per-node launchers for Slurm job steps (slurm/train.sbatch runs them under srun).

    python -m megatron_ntp.jobs.launch torchrun [--nproc-per-node=N] [--forward-sigterm] -- \
        -m megatron_ntp.cli train ...
        One launcher per node: torchrun (torch.distributed.run, in this process) with the node
        count, node rank and rendezvous address taken from Slurm (SLURM_JOB_NUM_NODES,
        SLURM_NODEID, $MASTER_ADDR:$MASTER_PORT), static rendezvous.
        --shutdown-timeout=S: the workers' grace after a failure or a signal, before SIGKILL
        (default 600 s).
    python -m megatron_ntp.jobs.launch task -- -m megatron_ntp.cli train ...
        One task per GPU: sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE from SLURM_PROCID,
        SLURM_LOCALID, SLURM_NTASKS and execs the trainer (srun returns the largest exit code).

Why torchrun is wrapped rather than called: two of its behaviours defeat preemption.
- Slurm's warning signal (--signal=TERM@T, or scancel --signal=TERM) reaches every process of
  the step, the workers included. torchrun would react to its own SIGTERM by killing the
  workers after a shutdown timeout and exiting with a SignalException, losing their exit codes.
  Here SIGTERM is removed from torchrun's handled signals: the launcher notes it and keeps
  waiting for the workers to checkpoint and exit. It does not pass the signal on by default:
  Slurm has signalled the workers already, and a second SIGTERM that arrives after a worker
  has saved and left the trainer's signal handling would kill it (exit -15 instead of 75).
  --forward-sigterm passes it on, for launchers run outside Slurm.
- torchrun gives the other workers 30 s after one exits non-zero before it kills them; a worker
  still writing its part of a checkpoint needs longer (SHUTDOWN_TIMEOUT_S, --shutdown-timeout).
- torchrun turns any non-zero worker exit into exit code 1. Here a run whose failed workers all
  exited with PREEMPTED_EXIT_CODE (checkpoint saved, stopped on request) exits with that code,
  which the batch script answers with `scontrol requeue`.
"""

import os
import signal
import sys
from argparse import ArgumentParser

PREEMPTED_EXIT_CODE = 75  # megatron_ntp.training.PREEMPTED_EXIT_CODE; tests check they agree

# Signals torchrun still handles (forwarding them to the workers and stopping): not SIGTERM.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
SHUTDOWN_TIMEOUT_S = 600  # torchrun's grace for the workers after a failure, before SIGKILL


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise SystemExit(f"megatron_ntp.jobs.launch: ${name} is not set (not inside a "
                             f"Slurm job step?)")
        return default
    return int(value)


def local_world_size() -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE are
    lists like "8(x2),4" in node order; pick this node's entry."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
    counts = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = _env_int("SLURM_NODEID", 0)
    return counts[node] if node < len(counts) else counts[-1]


def task_environment(env: dict) -> dict:
    """torchrun's variables for one Slurm task (one rank)."""
    env = dict(env)
    env.update(RANK=str(_env_int("SLURM_PROCID")), LOCAL_RANK=str(_env_int("SLURM_LOCALID")),
               WORLD_SIZE=str(_env_int("SLURM_NTASKS")),
               LOCAL_WORLD_SIZE=str(local_world_size()),
               GROUP_RANK=str(_env_int("SLURM_NODEID", 0)))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return env


def run_task(command: list[str]) -> int:
    os.execve(sys.executable, [sys.executable, *command], task_environment(os.environ))


def parser_options(parser: ArgumentParser) -> set[str]:
    """Every option string an argparse parser accepts (e.g. "--shutdown-timeout")."""
    return {option for action in parser._actions for option in action.option_strings}


def torchrun_arguments(nproc_per_node: int, command: list[str], options: set[str],
                       shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> list[str]:
    """torchrun's command line. `options`: what the installed torchrun's parser accepts; the
    recent --signals-to-handle and --shutdown-timeout are passed only where it has them
    (run_torchrun does their work by other means elsewhere)."""
    arguments = [f"--nnodes={_env_int('SLURM_JOB_NUM_NODES', 1)}",
                 f"--node-rank={_env_int('SLURM_NODEID', 0)}",
                 f"--nproc-per-node={nproc_per_node}",
                 f"--master-addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                 f"--master-port={os.environ.get('MASTER_PORT', '29500')}",
                 "--rdzv-backend=static", "--max-restarts=0"]
    if "--signals-to-handle" in options:
        arguments.append(f"--signals-to-handle={TORCHRUN_SIGNALS}")
    if "--shutdown-timeout" in options:
        arguments.append(f"--shutdown-timeout={shutdown_timeout_s}")
    return arguments + command


def _keep_sigterm(sigterm_handler):
    """Where torchrun's parser lacks --signals-to-handle (torch 2.9, the NGC 25.09 container's),
    its effect by other means, in this launcher process only: torchrun's process context
    installs one handler, api._terminate_process_handler, for SIGTERM, SIGINT, SIGHUP and
    SIGQUIT when it starts the workers; it is replaced by one that gives SIGTERM to
    `sigterm_handler` and the other signals to torchrun's."""
    from torch.distributed.elastic.multiprocessing import api

    torchrun_handler = api._terminate_process_handler

    def handler(signum, frame):
        if signum == signal.SIGTERM:
            return sigterm_handler(signum, frame)
        return torchrun_handler(signum, frame)

    api._terminate_process_handler = handler


def _give_workers_a_grace(shutdown_timeout_s: int):
    """The workers' grace before SIGKILL, on every torch: the process context's close() gets
    shutdown_timeout_s where its caller gives no timeout. Once one worker exits non-zero (75
    after its part of a checkpoint, say), torchrun's poll loop closes the others with close()'s
    default, 30 s, even where --shutdown-timeout exists (it reaches only the agent's own
    shutdown, and torch 2.9 has no such option): a rank still writing a large checkpoint would
    be killed mid-write."""
    from torch.distributed.elastic.multiprocessing import api

    close = api.PContext.close

    def close_with_grace(self, death_sig=None, timeout=shutdown_timeout_s):
        return close(self, death_sig, timeout)

    api.PContext.close = close_with_grace


def exit_code_of_failures(exit_codes: list[int]) -> int:
    """The launcher's exit code from its failed workers' exit codes (a worker killed by a signal
    reports -signum).

    PREEMPTED_EXIT_CODE when some worker stopped that way and every other failed worker either
    did too or was ended by SIGTERM: once one worker exits, torchrun sends SIGTERM to the rest,
    which by then have saved their part of the collective checkpoint (a worker still inside the
    trainer only notes the signal). Otherwise the first other code, a signal as 128 + signum
    (as a shell reports it).
    """
    killed_by_torchrun = -int(signal.SIGTERM)
    if PREEMPTED_EXIT_CODE in exit_codes and \
            all(c in (PREEMPTED_EXIT_CODE, killed_by_torchrun) for c in exit_codes):
        return PREEMPTED_EXIT_CODE
    other = [c for c in exit_codes if c not in (PREEMPTED_EXIT_CODE, killed_by_torchrun)]
    code = (other or exit_codes)[0]
    return 128 - code if code < 0 else (code or 1)


def _note_sigterm(signum, frame):
    print("[launch] SIGTERM: waiting for the workers to checkpoint and exit", file=sys.stderr,
          flush=True)


def _forward_sigterm(signum, frame):
    import psutil

    workers = psutil.Process().children(recursive=False)
    print(f"[launch] SIGTERM: forwarded to {len(workers)} worker(s); waiting for their checkpoint",
          file=sys.stderr, flush=True)
    for worker in workers:
        try:
            worker.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def run_torchrun(nproc_per_node: int, command: list[str], forward_sigterm: bool = False,
                 shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    sigterm_handler = _forward_sigterm if forward_sigterm else _note_sigterm
    signal.signal(signal.SIGTERM, sigterm_handler)
    parser = get_args_parser()
    options = parser_options(parser)
    if "--signals-to-handle" not in options:
        _keep_sigterm(sigterm_handler)
    _give_workers_a_grace(shutdown_timeout_s)
    args = parser.parse_args(torchrun_arguments(nproc_per_node, command, options,
                                                shutdown_timeout_s))
    try:
        run(args)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        code = exit_code_of_failures(codes)
        print(f"[launch] worker exit codes {codes}: exiting {code}", file=sys.stderr, flush=True)
        return code
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or not argv or argv[0] not in ("torchrun", "task"):
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    mode, options, command = argv[0], argv[1:split], argv[split + 1:]
    if mode == "task":
        if options:
            print(f"megatron_ntp.jobs.launch task: unexpected options {options}", file=sys.stderr)
            return 2
        return run_task(command)
    nproc, forward, grace = 1, False, SHUTDOWN_TIMEOUT_S
    for option in options:
        if option.startswith("--nproc-per-node="):
            nproc = int(option.split("=", 1)[1])
        elif option.startswith("--shutdown-timeout="):
            grace = int(option.split("=", 1)[1])
        elif option == "--forward-sigterm":
            forward = True
        else:
            print(f"megatron_ntp.jobs.launch torchrun: unknown option {option!r}",
                  file=sys.stderr)
            return 2
    return run_torchrun(nproc, command, forward, grace)


if __name__ == "__main__":
    sys.exit(main())
