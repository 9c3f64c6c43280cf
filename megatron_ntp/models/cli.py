"""The `megatron-ntp plan` and `megatron-ntp presets` subcommands (added by megatron_ntp.cli)."""

from megatron_ntp.cli import add_config_command
from megatron_ntp.config import load_config, validate_config


def add_commands(commands) -> None:
    add_config_command(
        commands, "plan", _run_plan,
        help="print parameters, FLOPs/token and per-GPU memory of a config",
        description="Validate a config and print total/active parameters, training FLOPs per "
                    "token and the estimated per-GPU memory (weights, gradients, optimizer "
                    "state, activations) of its parallel layout, per pipeline stage, and every "
                    "setting where a GPU run of it departs from Megatron-LM's H100 recipe, with "
                    "the reason. The data-parallel size is parallel.data, else $WORLD_SIZE / "
                    "(TP * PP), else 1.")
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
