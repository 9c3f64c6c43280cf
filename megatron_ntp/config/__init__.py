"""One typed config tree for a run: model, loss, data, parallel, train, checkpoint, logging.

    from megatron_ntp.config import load_config, validate_config
    config = validate_config(load_config("run.yaml", ["loss.beta=-0.25", "parallel.tensor=2"]))

No megatron-core import: configs are loaded and validated before any process group starts.
"""

from megatron_ntp.config.help import config_help
from megatron_ntp.config.load import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override,
)
from megatron_ntp.config.schema import (
    CheckpointConfig,
    Config,
    KnobSchedule,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_ntp.config.validate import check_environment, validate_config

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "KnobSchedule", "LoggingConfig", "ModelConfig",
    "check_environment",
    "ParallelConfig", "TrainConfig", "config_from_dict", "config_help", "config_to_dict",
    "dump_yaml", "load_config", "parse_override", "validate_config",
]
