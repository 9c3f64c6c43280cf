"""`megatron-ntp` command line: one subcommand per program, each defined beside its package.

    megatron-ntp plan --config FILE [section.field=value ...]        (models/cli.py)
    megatron-ntp presets                                              (models/cli.py)
    megatron-ntp train --config FILE [section.field=value ...]       (training/cli.py; torchrun
                                                                       for several ranks)
    megatron-ntp eval|generate|passk --checkpoint DIR [options] [section.field=value ...]
                                                                      (eval/cli.py)
    megatron-ntp export --checkpoint DIR --output DIR                 (export/cli.py)
    megatron-ntp submit [Slurm options] --config FILE [overrides ...] (jobs/cli.py)
    megatron-ntp sweep plan|submit|collect|fit ...                    (sweep/cli.py)
    megatron-ntp checkpoint verify DIR                                (training/checkpoint_cli.py)
"""

import argparse
import os
import sys

from megatron_ntp.config import ConfigError


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ConfigError as err:
        # A config is validated alike on every rank: under torchrun rank 0 alone says why.
        if os.environ.get("RANK", "0") != "0":
            return 2
        return fail(args.command, err)


def fail(command: str, err, code: int = 2) -> int:
    """Print `megatron-ntp COMMAND: error` to stderr; the exit status `code`."""
    print(f"megatron-ntp {command}: {err}", file=sys.stderr)
    return code


def add_config_arguments(parser) -> None:
    """--config FILE and the dotted overrides, as every config-driven subcommand takes them."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="overrides, e.g. loss.beta=-0.25 parallel.tensor=2")


def add_config_command(commands, name: str, run, help: str, description: str):
    """A subcommand that takes --config and overrides, with every config field in its --help."""
    from megatron_ntp.config import config_help

    parser = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 help=help, description=description,
                                 epilog="config fields:\n\n" + config_help())
    add_config_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from megatron_ntp.eval import cli as eval_cli
    from megatron_ntp.export import cli as export_cli
    from megatron_ntp.jobs import cli as jobs_cli
    from megatron_ntp.models import cli as models_cli
    from megatron_ntp.sweep import cli as sweep_cli
    from megatron_ntp.training import checkpoint_cli
    from megatron_ntp.training import cli as training_cli

    parser = argparse.ArgumentParser(prog="megatron-ntp", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    models_cli.add_commands(commands)
    training_cli.add_commands(commands)
    eval_cli.add_commands(commands)
    export_cli.add_commands(commands)
    jobs_cli.add_commands(commands)
    sweep_cli.add_commands(commands)
    checkpoint_cli.add_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
