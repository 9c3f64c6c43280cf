"""Configs and model weights for evaluation, generation and export, from a checkpoint.

The checkpoint format belongs to megatron_ntp.training.checkpoint (megatron-core
dist_checkpointing, resharded on load): `read_checkpoint_config(dir)` gives the run's Config and
`load_model_weights(chunks, dir)` fills model chunks of the current layout. This module adds what
inference needs on top of them:

- `inference_config`: the checkpoint's config with command-line overrides (typically the layout,
  parallel.tensor=... for the ranks at hand), with the vocabulary padding pinned to the
  checkpoint's. megatron-core pads the vocabulary to a multiple of
  make_vocab_size_divisible_by * TP, so a checkpoint trained at TP=8 has more embedding rows than
  a TP=1 model of the same config would build; the global shapes must match for dist_checkpointing
  to reshard, so make_vocab_size_divisible_by is set to padded / TP_new, which gives the same
  padded size at the new TP.
- `build_inference_model`: model chunks for the current layout with the checkpoint's weights,
  in eval mode.
"""

import dataclasses
import os

from megatron_ntp.config import ConfigError, Config, config_from_dict, config_to_dict
from megatron_ntp.config.load import parse_override, set_dotted
from megatron_ntp.models.counting import padded_vocab_size


def trained_padded_vocab(config: Config) -> int:
    """The embedding rows of the model the checkpoint was trained as."""
    m = config.model
    return padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, config.parallel.tensor)


def with_overrides(config: Config, overrides) -> Config:
    """`config` with dotted `section.field=value` overrides applied (not validated)."""
    if not overrides:
        return config
    tree = config_to_dict(config)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def pin_padded_vocab(config: Config, padded: int) -> Config:
    """`config` with make_vocab_size_divisible_by chosen so that its layout pads to `padded`."""
    tensor = config.parallel.tensor
    if padded % tensor:
        raise ConfigError(f"parallel.tensor={tensor} does not divide the checkpoint's padded "
                          f"vocabulary of {padded} rows; choose a tensor-parallel size that does")
    model = dataclasses.replace(config.model, make_vocab_size_divisible_by=padded // tensor)
    pinned = dataclasses.replace(config, model=model)
    assert trained_padded_vocab(pinned) == padded
    return pinned


def read_config(checkpoint_dir: str) -> Config:
    """The run config stored with the checkpoint (training.checkpoint.read_checkpoint_config)."""
    if not os.path.isdir(checkpoint_dir):
        raise ConfigError(f"--checkpoint {checkpoint_dir!r}: no such directory")
    from megatron_ntp.training.checkpoint import read_checkpoint_config

    return read_checkpoint_config(checkpoint_dir)


def inference_config(checkpoint_dir: str | None, config_file: str | None, overrides,
                     world_size: int | None = None) -> tuple[Config, str]:
    """(validated config for this launch, checkpoint folder) from --checkpoint / --config.

    With --checkpoint the stored config is the base, laid out on TP=PP=EP=1 (every rank of the
    launch a data-parallel replica: the training layout rarely suits an evaluation launch), and
    overrides apply on top (for example parallel.tensor=2 under torchrun); with only --config,
    the file's layout is used and the weights come from its checkpoint.load_dir. The vocabulary
    padding of the checkpoint is kept whatever the new layout.
    """
    from megatron_ntp.config import load_config, validate_config

    if checkpoint_dir:
        base = read_config(checkpoint_dir)
        if config_file:
            raise ConfigError("give --checkpoint or --config, not both (overrides on the command "
                              "line apply to the checkpoint's config)")
        config = with_overrides(single_rank_config(base), overrides)
    elif config_file:
        base = config = load_config(config_file, overrides)
        checkpoint_dir = config.checkpoint.load_dir
        if not checkpoint_dir:
            raise ConfigError(f"{config_file}: checkpoint.load_dir is not set; name the "
                              f"checkpoint with --checkpoint DIR or checkpoint.load_dir=DIR")
    else:
        raise ConfigError("name a checkpoint: --checkpoint DIR (or --config FILE with "
                          "checkpoint.load_dir)")
    # data.parallel is derived per launch: the checkpoint's value would pin the old world size
    config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, data=0))
    config = pin_padded_vocab(config, trained_padded_vocab(base))
    return validate_config(_inference_batch(config, world_size), world_size=world_size), \
        checkpoint_dir


def _inference_batch(config: Config, world_size: int | None) -> Config:
    """train.global_batch_tokens set to one micro-batch per data-parallel rank and pipeline
    stage: the training batch of the checkpoint need not divide over this launch's ranks, and
    inference does not use it (eval sizes its work with --sequences)."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    p, t = config.parallel, config.train
    data = max(1, world // max(1, p.tensor * p.pipeline))
    tokens = t.micro_batch_size * config.data.seq_length * data * p.pipeline
    train = dataclasses.replace(t, global_batch_tokens=tokens, token_budget=0,
                                steps=max(t.steps, t.lr_warmup_steps + t.lr_decay_steps, 1))
    return dataclasses.replace(config, train=train)


def single_rank_config(config: Config) -> Config:
    """`config` laid out on one rank (TP=PP=EP=DP=1), vocabulary padding kept."""
    padded = trained_padded_vocab(config)
    parallel = dataclasses.replace(
        config.parallel, tensor=1, pipeline=1, virtual_pipeline=1, expert=1, expert_tensor=1,
        data=1, sequence_parallel=False, distributed_optimizer=False, recompute="none")
    return pin_padded_vocab(dataclasses.replace(config, parallel=parallel), padded)


def build_inference_model(config: Config, checkpoint_dir: str | None):
    """(model chunks of this rank in eval mode, checkpoint step) after initialize_parallel.

    checkpoint_dir None keeps the initialisation (tests of the machinery; step -1).
    """
    from megatron_ntp.models.gpt import build_gpt_model, transformer_config
    from megatron_ntp.models.shaped_gpt import ShapedLossGPTModel

    # The checkpoint overwrites every weight: skip the random initialisation (minutes for a
    # large model on CPU). Without a checkpoint the model is initialised as for training.
    mcore_config = transformer_config(config, calculate_per_token_loss=True,
                                      perform_initialization=not checkpoint_dir)
    chunks = [build_gpt_model(config, vp_stage=vp if config.parallel.virtual_pipeline > 1
                              else None, model_class=ShapedLossGPTModel,
                              mcore_config=mcore_config, loss_config=config.loss_at(0))
              for vp in range(config.parallel.virtual_pipeline)]
    step = -1
    if checkpoint_dir:
        from megatron_ntp.training.checkpoint import load_model_weights

        step = load_model_weights(chunks, checkpoint_dir, verify=config.checkpoint.verify)
    for chunk in chunks:
        chunk.eval()
    return chunks, step

