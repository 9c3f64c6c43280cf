"""The `megatron-ntp train` subcommand (added by megatron_ntp.cli)."""

import os

from megatron_ntp.cli import add_config_command
from megatron_ntp.config import ConfigError, load_config, validate_config


def add_commands(commands) -> None:
    add_config_command(
        commands, "train", _run_train,
        help="train a model (launch with torchrun for several ranks)",
        description="Validate a config and train it: one process, or one per rank under "
                    "torchrun (`torchrun --nproc_per_node=N -m megatron_ntp.cli train ...`; "
                    "gloo on CPU, NCCL on GPU). Writes <logging.run_dir>/metrics.jsonl, "
                    "valid.jsonl, config.yaml and TensorBoard events.")


def _run_train(args):
    from megatron_ntp.config import check_environment
    from megatron_ntp.config.validate import cuda_device_max_connections

    config = validate_config(load_config(args.config, args.overrides))
    # read when CUDA creates its context: before any of it
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", cuda_device_max_connections(config))
    check_environment(config)  # before any process group or megatron-core import
    if config.train.steps <= 0:
        raise ConfigError("train.steps=0 and train.token_budget=0: nothing to train; set one")
    from megatron_ntp.training import run_training

    run_training(config)
