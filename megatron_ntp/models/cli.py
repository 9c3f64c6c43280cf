"""The `megatron-ntp plan` and `megatron-ntp presets` subcommands (added by megatron_ntp.cli)."""

import argparse

from megatron_ntp.config import config_help, load_config, validate_config


def add_commands(commands, add_config_arguments) -> None:
    plan = commands.add_parser(
        "plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print parameters, FLOPs/token and per-GPU memory of a config",
        description="Validate a config and print total/active parameters, training FLOPs per "
                    "token and the estimated per-GPU memory (weights, gradients, optimizer "
                    "state, activations) of its parallel layout, per pipeline stage. The "
                    "data-parallel size is parallel.data, else $WORLD_SIZE / (TP * PP), else 1.",
        epilog="config fields:\n\n" + config_help())
    add_config_arguments(plan)
    plan.set_defaults(run=_run_plan)
    presets = commands.add_parser(
        "presets", help="list the model presets and their counted parameters")
    presets.set_defaults(run=_run_presets)


def _run_plan(args):
    from megatron_ntp.models.plan import format_plan

    config = validate_config(load_config(args.config, args.overrides))
    print(format_plan(config), end="")


def _run_presets(args):
    from megatron_ntp.models.plan import format_presets

    print(format_presets(), end="")
