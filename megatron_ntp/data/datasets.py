"""Train/valid/test datasets through megatron-core's BlendedMegatronDatasetBuilder and GPTDataset.

Each sample is a dict of tensors from GPTDataset: tokens [s], labels [s], loss_mask [s],
position_ids [s] and, unless disabled, attention_mask [1, s, s] (s = seq_length).

Distributed behaviour (megatron-core's, relied on here): without an initialised process group every
call builds its datasets itself. Inside one, rank 0 builds first and writes the index caches, all
ranks meet at a barrier, then the other ranks build from the caches; so every rank must call
:func:`build_datasets`, and ``cache_dir`` should be a folder all ranks can read.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron_ntp.data.blend import Blend, check_prefixes_exist
from megatron_ntp.data.config import DataConfig


def build_tokenizer_from_config(cfg: DataConfig):
    """The tokenizer named by ``cfg.tokenizer_type`` and ``cfg.tokenizer_model``."""
    from megatron_ntp.data.tokenizer import build_tokenizer

    if not cfg.tokenizer_model:
        raise ValueError(f"data.tokenizer_model is not set (data.tokenizer_type is "
                         f"{cfg.tokenizer_type!r}); name the tokenizer model file")
    return build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)


def gpt_dataset_config(cfg: DataConfig, tokenizer) -> GPTDatasetConfig:
    """The GPTDatasetConfig for ``cfg`` (the tokenizer gives vocab_size, eod, pad, identifiers)."""
    cfg.validate()
    blends = cfg.blends()
    if blends is None:
        raise ValueError("data.blend is not set: name at least one preprocessed dataset prefix")
    per_split = not isinstance(blends, Blend)
    check_prefixes_exist(blends if per_split else [blends])
    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=None if per_split else blends.as_tuple(),
        blend_per_split=[b and b.as_tuple() for b in blends] if per_split else None,
        split=None if per_split else cfg.split,
        path_to_cache=cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
    )


def build_datasets(cfg: DataConfig, tokenizer, train_samples: Optional[int],
                   valid_samples: Optional[int], test_samples: Optional[int],
                   is_built_on_rank: Callable[[], bool] = lambda: True):
    """Build (train, valid, test) datasets; an entry is None when its split proportion is 0.

    Args:
        cfg: the data config (blend, split, seq_length, seed, cache_dir, GPTDataset flags).
        tokenizer: from :func:`megatron_ntp.data.tokenizer.build_tokenizer`.
        train_samples, valid_samples, test_samples: samples to draw from each split (documents
            are repeated in further shuffled epochs when a split is too small); None takes one
            epoch of that split.
        is_built_on_rank: whether this rank needs the datasets (megatron-core's convention, e.g.
            only the first tensor-parallel rank); ranks where it is False get None but must still
            call this function, because of the barrier.
    """
    for name, value in (("train_samples", train_samples), ("valid_samples", valid_samples),
                        ("test_samples", test_samples)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    config = gpt_dataset_config(cfg, tokenizer)
    if cfg.cache_dir:
        os.makedirs(cfg.cache_dir, exist_ok=True)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, test_samples], is_built_on_rank, config)
    train, valid, test = builder.build()
    return train, valid, test
