"""`megatron-ntp` command line: one subcommand per program, each a thin wrapper over the package.

    megatron-ntp plan --config FILE [section.field=value ...]
    megatron-ntp presets
    megatron-ntp train --config FILE [section.field=value ...]   (torchrun for several ranks)
    megatron-ntp eval|generate|passk --checkpoint DIR [options] [section.field=value ...]
    megatron-ntp export --checkpoint DIR --output DIR   (Hugging Face Qwen3 / Qwen3-MoE)
    megatron-ntp submit [Slurm options] --config FILE [section.field=value ...]   (Slurm job)
    megatron-ntp sweep plan|submit|collect|fit ...   (scaling-law sweeps on Slurm)
    megatron-ntp checkpoint verify DIR   (each checkpoint's state against its manifest)
"""

import argparse
import sys

from megatron_ntp.config import ConfigError, config_help, load_config, validate_config


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ConfigError as err:
        print(f"megatron-ntp {args.command}: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ntp", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan(commands)
    _add_presets(commands)
    _add_train(commands)
    from megatron_ntp.eval.cli import add_eval_commands  # eval, generate, passk, export

    add_eval_commands(commands, _add_config_arguments)
    from megatron_ntp.sweep.cli import add_commands as add_sweep_commands  # submit, sweep

    add_sweep_commands(commands)
    from megatron_ntp.training.checkpoint_cli import add_checkpoint_command

    add_checkpoint_command(commands)
    return parser


def _add_config_arguments(parser):
    parser.add_argument("--config", metavar="FILE", help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides, e.g. loss.beta=-0.25 parallel.tensor=2")


def _add_plan(commands):
    plan = commands.add_parser(
        "plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print parameters, FLOPs/token and per-GPU memory of a config",
        description="Validate a config and print total/active parameters, training FLOPs per "
                    "token and the estimated per-GPU memory (weights, gradients, optimizer "
                    "state, activations) of its parallel layout, per pipeline stage. The "
                    "data-parallel size is parallel.data, else $WORLD_SIZE / (TP * PP), else 1.",
        epilog="config fields:\n\n" + config_help())
    _add_config_arguments(plan)
    plan.set_defaults(run=_run_plan)


def _run_plan(args):
    from megatron_ntp.models.plan import format_plan

    config = validate_config(load_config(args.config, args.overrides))
    print(format_plan(config), end="")


def _add_presets(commands):
    presets = commands.add_parser(
        "presets", help="list the model presets and their counted parameters")
    presets.set_defaults(run=_run_presets)


def _run_presets(args):
    from megatron_ntp.models.plan import format_presets

    print(format_presets(), end="")


def _add_train(commands):
    train = commands.add_parser(
        "train", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model (launch with torchrun for several ranks)",
        description="Validate a config and train it: one process, or one per rank under "
                    "torchrun (`torchrun --nproc_per_node=N -m megatron_ntp.cli train ...`; "
                    "gloo on CPU, NCCL on GPU). Writes <logging.run_dir>/metrics.jsonl, "
                    "valid.jsonl, config.yaml and TensorBoard events.",
        epilog="config fields:\n\n" + config_help())
    _add_config_arguments(train)
    train.set_defaults(run=_run_train)


def _run_train(args):
    from megatron_ntp.config import check_environment

    config = validate_config(load_config(args.config, args.overrides))
    check_environment(config)  # before any process group or megatron-core import
    if config.train.steps <= 0:
        raise ConfigError("train.steps=0 and train.token_budget=0: nothing to train; set one")
    from megatron_ntp.training import run_training

    run_training(config)


if __name__ == "__main__":
    sys.exit(main())
