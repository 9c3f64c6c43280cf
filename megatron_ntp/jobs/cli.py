"""The `megatron-ntp submit` subcommand (registered by megatron_ntp.cli): one training run as a
Slurm job through slurm/train.sbatch."""

import os
import sys

from megatron_ntp.cli import fail as _fail


def add_commands(commands) -> None:
    _add_submit(commands)


def _add_slurm_options(parser):
    from megatron_ntp.jobs.slurm import SlurmOptions

    d = SlurmOptions()
    parser.add_argument("--nodes", type=int, default=d.nodes, help="nodes per job (%(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node,
                        help="GPUs per node, 0 for CPU jobs (%(default)s)")
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="ranks per node (default: --gpus-per-node, or 1)")
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default=d.launcher,
                        help="torchrun: one launcher per node; srun: one task per rank")
    parser.add_argument("--time", default="", help="wall time per job, e.g. 04:00:00")
    parser.add_argument("--signal-seconds", type=int, default=d.signal_seconds,
                        help="SIGTERM this long before the time limit (%(default)s)")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--chain", type=int, default=1,
                        help="jobs chained with --dependency=afterany (runs longer than the "
                             "wall time where jobs may not requeue themselves)")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                        help="extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)")


def _add_submit(commands):
    submit = commands.add_parser(
        "submit", help="submit one training run to Slurm (slurm/train.sbatch)",
        description="Submit `megatron-ntp train --config FILE overrides` as a Slurm job through "
                    "slurm/train.sbatch: resumable, requeued when the trainer checkpoints "
                    "before the time limit. The job's log is <logging.run_dir>/logs/"
                    "slurm-<job id>.out.")
    _add_slurm_options(submit)
    submit.add_argument("--job-name", default="", help="default: the run folder's name")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the sbatch command(s) instead of submitting")
    submit.add_argument("--config", metavar="FILE", required=True)
    submit.add_argument("overrides", nargs="*", metavar="section.field=value")
    submit.set_defaults(run=_run_submit)


def _options_from_args(args):
    from megatron_ntp.jobs.slurm import SlurmOptions

    return SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        nproc_per_node=args.nproc_per_node, launcher=args.launcher,
                        time=args.time, signal_seconds=args.signal_seconds,
                        partition=args.partition, account=args.account, chain=args.chain,
                        sbatch_args=list(args.sbatch_arg))


def _data_parallel_from_allocation(config, path, overrides, world_size) -> list[str]:
    """The overrides, with parallel.data set from the allocation (nodes x GPUs / (tensor x
    pipeline)) where the config file fixes another value and the command line does not: a
    file written for one cluster size is submitted at another's. A value given on the command
    line is kept (and checked against the allocation)."""
    p = config.parallel
    model_parallel = p.tensor * p.pipeline
    if any(o.startswith("parallel.data=") for o in overrides) or world_size % model_parallel:
        return list(overrides)
    derived = world_size // model_parallel
    if p.data in (0, derived):
        return list(overrides)
    print(f"megatron-ntp submit: parallel.data={p.data} of {path} replaced by the allocation's "
          f"{world_size} GPUs / (parallel.tensor * parallel.pipeline = {model_parallel}) = "
          f"{derived} (give parallel.data on the command line to keep a value)", file=sys.stderr)
    return [*overrides, f"parallel.data={derived}"]


def _run_submit(args):
    from megatron_ntp.config import load_config, validate_config
    from megatron_ntp.jobs.slurm import (
        SlurmError,
        format_command,
        job_environment,
        sbatch_commands,
        submit_run,
    )

    try:
        options = _options_from_args(args)
    except ValueError as err:
        return _fail("submit", err)
    overrides = _data_parallel_from_allocation(load_config(args.config, args.overrides),
                                               args.config, args.overrides, options.world_size)
    config = validate_config(load_config(args.config, overrides), world_size=options.world_size)
    run_dir = os.path.abspath(config.logging.run_dir)
    train_args = ["--config", os.path.abspath(args.config), *overrides]
    name = args.job_name or os.path.basename(run_dir)
    if not config.checkpoint.save_dir:
        print("megatron-ntp submit: warning: checkpoint.save_dir is not set: a requeued job "
              "starts over", file=sys.stderr)
    if args.dry_run:
        env = job_environment(options)
        for command in sbatch_commands(options, train_args, name, os.path.join(run_dir, "logs")):
            print(format_command(command, env))
        return 0
    try:
        ids = submit_run(run_dir, options, train_args, name)
    except SlurmError as err:
        return _fail("submit", err, 1)
    print(f"submitted job {', '.join(ids)} (run {run_dir}, log {run_dir}/logs/slurm-<id>.out)")
    return 0
